export * from "./admin-socket.js";
export * from "./agent-lifecycle.js";
export * from "./atomic-file.js";
export * from "./backoff.js";
export * from "./ca-file.js";
export * from "./cli-support.js";
export * from "./clock.js";
export * from "./config.js";
export * from "./doctor-report.js";
export * from "./dsn.js";
export * from "./errors.js";
export * from "./gc-pacer.js";
export * from "./group-commit.js";
export * from "./handshake.js";
export * from "./keys.js";
export * from "./log.js";
export * from "./mux.js";
export {
  CipherState,
  generateKeyPair,
  type HandshakeOptions,
  type HandshakePattern,
  HandshakeState,
  type KeyPair,
  keyPairFromPrivateKey,
  MAX_NOISE_MESSAGE,
  REKEY_AFTER_MESSAGES,
  TAG_LENGTH,
  x25519,
} from "./noise.js";
export * from "./protocol.js";
export * from "./proxy-header.js";
export * from "./secure-channel.js";
export * from "./smtp-greeting.js";
export * from "./smtp-guard.js";
export * from "./splice.js";
export * from "./spool-file.js";
export * from "./token.js";
export * from "./token-bucket.js";
export * from "./transport.js";
export * from "./version.js";
export * from "./wire.js";
export * from "./ws-transport.js";
