// The encrypted transport: after a completed Noise handshake, every inner message is exactly one Noise
// transport message. Nonces are implicit counters (the inner transport is ordered), so a lost, reordered,
// replayed or forged message fails authentication and ends the channel: there is no resync.
import { EventEmitter } from "node:events";
import { ProtocolError } from "./errors.js";
import { defaultGcPacer, type GcPacer } from "./gc-pacer.js";
import { type CipherState, MAX_NOISE_MESSAGE, REKEY_AFTER_MESSAGES, TAG_LENGTH } from "./noise.js";
import {
  CLOSE_GOING_AWAY,
  CLOSE_NORMAL,
  CLOSE_PROTOCOL_ERROR,
  type MessageTransport,
  type TransportEvents,
} from "./transport.js";

/** The largest plaintext one transport message carries: 65535 bytes less the 16-byte tag. */
export const MAX_SECURE_PLAINTEXT = MAX_NOISE_MESSAGE - TAG_LENGTH;

export interface SecureChannelOptions {
  /** Close with CLOSE_GOING_AWAY "rekey" once either counter reaches this (default 2^48). */
  rekeyAfter?: number;
  /** Told the size of every message sent and received (default: the process-wide defaultGcPacer). */
  gcPacer?: GcPacer;
}

export class SecureChannel extends EventEmitter<TransportEvents> implements MessageTransport {
  readonly #inner: MessageTransport;
  readonly #send: CipherState;
  readonly #receive: CipherState;
  readonly #rekeyAfter: number;
  readonly #gcPacer: GcPacer;
  #sent = 0;
  #received = 0;
  #closing = false;
  #closeEmitted = false;

  readonly #onMessage = (message: Uint8Array): void => this.#receiveMessage(message);
  readonly #onClose = (code: number, reason: string): void => this.#finish(code, reason);
  readonly #onDrain = (): void => {
    this.emit("drain");
  };

  constructor(
    inner: MessageTransport,
    ciphers: { send: CipherState; receive: CipherState },
    options: SecureChannelOptions = {},
  ) {
    super();
    const rekeyAfter = options.rekeyAfter ?? REKEY_AFTER_MESSAGES;
    if (!Number.isSafeInteger(rekeyAfter) || rekeyAfter < 1 || rekeyAfter > REKEY_AFTER_MESSAGES) {
      throw new RangeError(`rekeyAfter must be an integer from 1 to 2^48, got ${rekeyAfter}`);
    }
    this.#inner = inner;
    this.#send = ciphers.send;
    this.#receive = ciphers.receive;
    this.#rekeyAfter = rekeyAfter;
    this.#gcPacer = options.gcPacer ?? defaultGcPacer;
    inner.on("message", this.#onMessage);
    inner.on("close", this.#onClose);
    inner.on("drain", this.#onDrain);
  }

  get messagesSent(): number {
    return this.#sent;
  }

  get messagesReceived(): number {
    return this.#received;
  }

  get bufferedAmount(): number {
    return this.#inner.bufferedAmount;
  }

  /** The inner transport's preference less the tag each message gains here. */
  get preferredMessageSize(): number | undefined {
    const inner = this.#inner.preferredMessageSize;
    return inner === undefined ? undefined : Math.min(MAX_SECURE_PLAINTEXT, inner - TAG_LENGTH);
  }

  get closed(): boolean {
    return this.#closing || this.#inner.closed;
  }

  /** Encrypts and sends one message; ignored once the channel is closed, like the transports beneath. */
  send(plaintext: Uint8Array): void {
    this.sendParts([plaintext]);
  }

  /** Encrypts the concatenation of `parts` as one message, straight from the parts (no joined copy). */
  sendParts(parts: readonly Uint8Array[]): void {
    let size = 0;
    for (const part of parts) size += part.byteLength;
    if (size > MAX_SECURE_PLAINTEXT) {
      throw new ProtocolError(
        "FRAME_TOO_LARGE",
        `a ${size}-byte message exceeds the ${MAX_SECURE_PLAINTEXT}-byte limit of one Noise transport message`,
      );
    }
    if (this.closed) return;
    const inner = this.#inner;
    if (inner.sendParts) inner.sendParts(this.#send.encryptToParts(parts));
    else inner.send(this.#send.encryptParts(parts));
    this.#sent++;
    this.#gcPacer.note(size + TAG_LENGTH);
    if (this.#send.nonce >= this.#rekeyAfter) this.#shutDown(CLOSE_GOING_AWAY, "rekey");
  }

  close(code = CLOSE_NORMAL, reason = ""): void {
    this.#shutDown(code, reason);
  }

  #receiveMessage(ciphertext: Uint8Array): void {
    if (this.closed) return;
    let plaintext: Uint8Array;
    try {
      plaintext = this.#receive.decrypt(ciphertext);
    } catch {
      // Whatever the cause (tampering, loss, replay, truncation), the peer's stream is no longer trusted.
      this.#shutDown(CLOSE_PROTOCOL_ERROR, "decrypt failed");
      return;
    }
    this.#received++;
    this.#gcPacer.note(ciphertext.byteLength);
    this.emit("message", plaintext);
    if (this.#receive.nonce >= this.#rekeyAfter) this.#shutDown(CLOSE_GOING_AWAY, "rekey");
  }

  #shutDown(code: number, reason: string): void {
    if (this.#closing) return;
    this.#closing = true;
    this.#send.wipe();
    this.#receive.wipe();
    this.#inner.close(code, reason);
    // The inner transport may report its close late (a WebSocket waits for the peer's close frame) or
    // not at all if it was already closed: report ours asynchronously, whichever comes first wins.
    setImmediate(() => this.#finish(code, reason));
  }

  #finish(code: number, reason: string): void {
    if (this.#closeEmitted) return;
    this.#closeEmitted = true;
    this.#closing = true;
    this.#send.wipe();
    this.#receive.wipe();
    this.#inner.off("message", this.#onMessage);
    this.#inner.off("close", this.#onClose);
    this.#inner.off("drain", this.#onDrain);
    this.emit("close", code, reason);
  }
}
