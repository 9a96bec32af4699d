// The error catalogue: every failure mxtunnel reports has a class and a stable `code`.
// docs/errors.md lists the codes; operators and scripts match on `code`, never on message text.

export const ERROR_CODES = {
  // pairing tokens
  TOKEN_MALFORMED: "the text is not an mxtunnel pairing token",
  TOKEN_CHECKSUM: "the token's checksum does not match: it was mistyped or cut short",
  TOKEN_VERSION: "the token was made by a newer mxtunnel",
  TOKEN_EXPIRED: "the token has expired; make a new one with `mxtunnel-edge pair`",
  TOKEN_USED: "the token has already enrolled a different home key",
  TOKEN_UNKNOWN: "the edge does not know this token (never issued, pruned, or for another edge)",
  // handshake and peers
  VERSION_MISMATCH: "the two agents speak different tunnel protocol versions",
  HANDSHAKE_FAILED: "the Noise handshake failed",
  UNKNOWN_PEER: "the peer's static key is not paired",
  LOW_ORDER_KEY: "a Diffie-Hellman result was all zeros (low-order public key)",
  DECRYPT_FAILED: "a transport message failed authentication",
  NONCE_EXHAUSTED: "a cipher state ran out of nonces; reconnect",
  RATE_LIMITED: "too many handshakes; try again later",
  // wire format and streams
  FRAME_TOO_LARGE: "a frame exceeds the 65519-byte limit",
  FRAME_MALFORMED: "a frame could not be decoded",
  FRAME_UNKNOWN_TYPE: "a frame has a type this version does not know",
  META_TOO_LARGE: "stream metadata exceeds 8 KiB",
  STREAM_ID_REUSED: "a stream id was opened twice in one tunnel",
  STREAM_ID_PARITY: "a stream id has the wrong parity for its opener",
  STREAM_UNKNOWN: "a frame names a stream that is not open",
  CREDIT_OVERFLOW: "a peer sent more data than its credit allowed, or granted credit past 2^31",
  TOO_MANY_STREAMS: "a peer opened more streams than allowed",
  TUNNEL_CLOSED: "the tunnel closed",
  // services and paths
  SERVICE_UNKNOWN: "the edge named a service home does not list",
  CLIENT_ADDRESS_REFUSED: "the client address is private, loopback or malformed",
  PROXY_HEADER_MALFORMED: "a PROXY protocol header could not be parsed",
  // configuration and state
  CONFIG_INVALID: "the configuration is invalid",
  STATE_LOCKED: "another mxtunnel command holds the state directory",
  STATE_MISSING: "the state directory has not been initialised",
  STATE_EXISTS: "the state directory is already initialised",
  STATE_CORRUPT: "a state file is unreadable or damaged",
  STATE_INSECURE: "a key file is readable by other users",
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class MxtunnelError extends Error {
  override readonly name: string = "MxtunnelError";
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message?: string, options?: { cause?: unknown }) {
    super(message ?? ERROR_CODES[code], options);
    this.code = code;
  }
}

export class TokenError extends MxtunnelError {
  override readonly name = "TokenError";
}

export class HandshakeError extends MxtunnelError {
  override readonly name = "HandshakeError";
}

/** A breach of the wire protocol by the peer: the tunnel carrying it is closed. */
export class ProtocolError extends MxtunnelError {
  override readonly name = "ProtocolError";
}

export class CryptoError extends MxtunnelError {
  override readonly name = "CryptoError";
}

export class ServiceError extends MxtunnelError {
  override readonly name = "ServiceError";
}

export class ConfigError extends MxtunnelError {
  override readonly name = "ConfigError";
  /** One line per problem: "key.path: what was expected". */
  readonly problems: readonly string[];

  constructor(problems: readonly string[], message?: string) {
    super("CONFIG_INVALID", message ?? `invalid configuration:\n  ${problems.join("\n  ")}`);
    this.problems = problems;
  }
}

export class StateError extends MxtunnelError {
  override readonly name = "StateError";
}

export function isMxtunnelError(error: unknown): error is MxtunnelError {
  return error instanceof MxtunnelError;
}
