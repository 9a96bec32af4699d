// Enrolment of this home with an edge, from a pairing token: Noise IKpsk2 on /pair, then ENROL
// (our spool key) as the first transport message; the edge burns the token only after that.
import {
  AGENT_VERSION,
  CloseCode,
  decodeKey,
  decodePairingToken,
  ERROR_CODES,
  type ErrorCode,
  encodeKey,
  HandshakeError,
  initiateHandshake,
  keyFingerprint,
  type Logger,
  PAIR_PATH,
  PAIR_PROLOGUE,
  pairingPsk,
  TokenError,
  tokenId,
} from "@mxtunnel/shared";
import { connectToEdge } from "./connect.js";
import type { EdgeRecord, HomeState } from "./state.js";

export interface PairOptions {
  token: string;
  state: HomeState;
  /** How this home is named on the edge. */
  name: string;
  logger?: Logger;
  timeoutMs?: number;
}

export async function pairWithEdge(options: PairOptions): Promise<EdgeRecord> {
  const token = decodePairingToken(options.token);
  const timeoutMs = options.timeoutMs ?? 10_000;
  const transport = await connectToEdge(token.url, PAIR_PATH, timeoutMs);
  const channel = await initiateHandshake(
    transport,
    {
      pattern: "IKpsk2",
      prologue: PAIR_PROLOGUE,
      staticKeyPair: options.state.keyPair,
      remoteStaticPublicKey: token.edgePublicKey,
      psk: pairingPsk(token.secret, token.edgePublicKey),
      payload: { tokenId: tokenId(token.secret), version: AGENT_VERSION },
      timeoutMs,
      describeClose: (code, reason) => closeToError(code, reason),
    },
    (secure) => secure,
  );

  const reply = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new HandshakeError("HANDSHAKE_FAILED", "the edge did not confirm the enrolment")),
      timeoutMs,
    );
    channel.once("message", (message) => {
      clearTimeout(timer);
      try {
        resolve(JSON.parse(new TextDecoder().decode(message)) as Record<string, unknown>);
      } catch {
        reject(new HandshakeError("HANDSHAKE_FAILED", "the edge sent an unreadable enrolment reply"));
      }
    });
    channel.once("close", (code, reason) => {
      clearTimeout(timer);
      reject(closeToError(code, reason));
    });
    channel.send(
      new TextEncoder().encode(
        JSON.stringify({
          type: "enrol",
          spoolPublicKey: encodeKey(options.state.spoolKeyPair.publicKey),
          name: options.name,
        }),
      ),
    );
  });
  channel.close(1000, "done");

  if (reply.type === "error") {
    const code = (
      typeof reply.code === "string" && reply.code in ERROR_CODES ? reply.code : "HANDSHAKE_FAILED"
    ) as ErrorCode;
    throw new TokenError(code, typeof reply.message === "string" ? reply.message : ERROR_CODES[code]);
  }
  const home = reply.home as { name: string; domains: string[] };
  const edge = reply.edge as { hostname: string; publicKey: string };
  if (reply.type !== "enrolled" || !home || !edge || edge.publicKey !== encodeKey(token.edgePublicKey)) {
    throw new HandshakeError(
      "HANDSHAKE_FAILED",
      "the edge's enrolment reply is not what this version expects",
    );
  }
  const record: EdgeRecord = {
    url: token.url,
    publicKey: edge.publicKey,
    fingerprint: keyFingerprint(decodeKey(edge.publicKey, "edge key")),
    hostname: edge.hostname,
    domains: home.domains,
    homeName: home.name,
    pairedAt: new Date().toISOString(),
  };
  await options.state.addEdge(record);
  options.logger?.info(
    { edge: record.hostname, fingerprint: record.fingerprint, domains: record.domains },
    "paired with edge",
  );
  return record;
}

function closeToError(code: number, reason: string): Error {
  if (code === CloseCode.TOKEN_REFUSED) {
    const match = /^([A-Z_]+): (.*)$/s.exec(reason);
    const errorCode = match?.[1];
    if (errorCode && errorCode in ERROR_CODES)
      return new TokenError(errorCode as ErrorCode, match?.[2] ?? reason);
    return new TokenError("TOKEN_UNKNOWN", reason || "the edge refused the token");
  }
  if (code === 1006)
    return new HandshakeError("HANDSHAKE_FAILED", "the connection to the edge dropped during pairing");
  return new HandshakeError(
    "HANDSHAKE_FAILED",
    `the edge closed the connection during pairing (${code} ${reason})`,
  );
}
