// Drives a Noise handshake over a raw MessageTransport and hands back a SecureChannel.
// The `established` callback runs synchronously in the same tick the handshake completes, so the
// caller attaches its consumer (the Mux) before any transport message can arrive and be missed.
import { HandshakeError, isMxtunnelError, type MxtunnelError } from "./errors.js";
import { type HandshakePattern, HandshakeState, type KeyPair } from "./noise.js";
import { SecureChannel } from "./secure-channel.js";
import { CLOSE_PROTOCOL_ERROR, type MessageTransport } from "./transport.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export type HandshakePayload = Record<string, unknown>;

export function encodePayload(payload: HandshakePayload): Uint8Array {
  return encoder.encode(JSON.stringify(payload));
}

export function decodePayload(bytes: Uint8Array): HandshakePayload {
  try {
    const value: unknown = JSON.parse(decoder.decode(bytes));
    if (value && typeof value === "object" && !Array.isArray(value)) return value as HandshakePayload;
  } catch {
    // fall through
  }
  throw new HandshakeError("HANDSHAKE_FAILED", "handshake payload is not a JSON object");
}

export type Established<T> = (
  channel: SecureChannel,
  remotePayload: HandshakePayload,
  remoteStatic: Uint8Array,
) => T;

/**
 * Waits for the next message on a transport, or rejects when it closes or the deadline passes
 * (`timeoutMs` undefined: no deadline here, the caller enforces one).
 */
function nextMessage(
  transport: MessageTransport,
  timeoutMs: number | undefined,
  onMessage: (message: Uint8Array) => void,
  describeClose: (code: number, reason: string) => Error,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      clearTimeout(timer);
      transport.off("message", handler);
      transport.off("close", closed);
    };
    const handler = (message: Uint8Array) => {
      cleanup();
      try {
        onMessage(message);
        resolve();
      } catch (error) {
        reject(error);
      }
    };
    const closed = (code: number, reason: string) => {
      cleanup();
      reject(describeClose(code, reason));
    };
    const timer =
      timeoutMs === undefined
        ? undefined
        : setTimeout(() => {
            cleanup();
            reject(new HandshakeError("HANDSHAKE_FAILED", `no handshake reply within ${timeoutMs} ms`));
          }, timeoutMs);
    transport.on("message", handler);
    transport.on("close", closed);
  });
}

export interface InitiatorOptions {
  pattern: HandshakePattern;
  prologue: Uint8Array;
  staticKeyPair: KeyPair;
  remoteStaticPublicKey: Uint8Array;
  psk?: Uint8Array;
  payload: HandshakePayload;
  timeoutMs: number;
  /** Turns a close during the handshake into the error the user should see. */
  describeClose?: (code: number, reason: string) => Error;
}

export async function initiateHandshake<T>(
  transport: MessageTransport,
  options: InitiatorOptions,
  established: Established<T>,
): Promise<T> {
  const state = new HandshakeState({
    pattern: options.pattern,
    initiator: true,
    prologue: options.prologue,
    staticKeyPair: options.staticKeyPair,
    remoteStaticPublicKey: options.remoteStaticPublicKey,
    ...(options.psk ? { psk: options.psk } : {}),
  });
  transport.send(state.writeMessage(encodePayload(options.payload)));
  let result: T | undefined;
  await nextMessage(
    transport,
    options.timeoutMs,
    (message) => {
      const payload = decodePayload(state.readMessage(message));
      const channel = new SecureChannel(transport, state.split());
      result = established(channel, payload, options.remoteStaticPublicKey);
    },
    options.describeClose ??
      ((code, reason) =>
        new HandshakeError(
          "HANDSHAKE_FAILED",
          `the peer closed the connection during the handshake (${code} ${reason})`,
        )),
  ).catch((error: unknown) => {
    transport.close(CLOSE_PROTOCOL_ERROR, "handshake failed");
    throw error;
  });
  return result as T;
}

export interface ResponderOptions {
  pattern: HandshakePattern;
  prologue: Uint8Array;
  staticKeyPair: KeyPair;
  /** How long to wait for message 1; leave it out when the caller closes the transport at its own deadline. */
  timeoutMs?: number;
  /** Runs after the initiator's static key is decrypted and before the `ss` DH: throw to refuse cheaply. */
  onRemoteStatic: (remoteStatic: Uint8Array) => void;
  /** Sees message 1's payload; returns the reply payload and, for psk patterns, the PSK. */
  onPayload: (
    remoteStatic: Uint8Array,
    payload: HandshakePayload,
  ) => { reply: HandshakePayload; psk?: Uint8Array };
}

export async function respondHandshake<T>(
  transport: MessageTransport,
  options: ResponderOptions,
  established: Established<T>,
): Promise<T> {
  const state = new HandshakeState({
    pattern: options.pattern,
    initiator: false,
    prologue: options.prologue,
    staticKeyPair: options.staticKeyPair,
  });
  let result: T | undefined;
  await nextMessage(
    transport,
    options.timeoutMs,
    (message) => {
      const payload = decodePayload(state.readMessage(message, { onRemoteStatic: options.onRemoteStatic }));
      const remoteStatic = state.remoteStaticPublicKey;
      if (!remoteStatic) throw new HandshakeError("HANDSHAKE_FAILED", "no remote static key after message 1");
      const { reply, psk } = options.onPayload(remoteStatic, payload);
      if (psk) state.setPsk(psk);
      transport.send(state.writeMessage(encodePayload(reply)));
      const channel = new SecureChannel(transport, state.split());
      result = established(channel, payload, remoteStatic);
    },
    (code, reason) =>
      new HandshakeError("HANDSHAKE_FAILED", `connection closed during the handshake (${code} ${reason})`),
  );
  return result as T;
}

/** Errors raised inside handshake hooks keep their identity; anything else becomes HANDSHAKE_FAILED. */
export function asHandshakeError(error: unknown): MxtunnelError {
  if (isMxtunnelError(error)) return error;
  return new HandshakeError("HANDSHAKE_FAILED", error instanceof Error ? error.message : String(error), {
    cause: error,
  });
}
