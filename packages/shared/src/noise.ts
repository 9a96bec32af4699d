// The Noise Protocol Framework (revision 34), cut down to the two patterns mxtunnel speaks:
// Noise_IK_25519_ChaChaPoly_SHA256 (tunnel) and Noise_IKpsk2_25519_ChaChaPoly_SHA256 (pairing).
// Every primitive comes from node:crypto; the edge must shrug off handshake floods, so key objects
// are built once per static key and the hot path avoids copies.
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  createPrivateKey,
  createPublicKey,
  diffieHellman,
  type KeyObject,
  randomFillSync,
  timingSafeEqual,
} from "node:crypto";
import { CryptoError, HandshakeError } from "./errors.js";

/** Raw X25519 keys, 32 bytes each. */
export interface KeyPair {
  publicKey: Uint8Array;
  privateKey: Uint8Array;
}

export type HandshakePattern = "IK" | "IKpsk2";

export interface HandshakeOptions {
  pattern: HandshakePattern;
  initiator: boolean;
  prologue: Uint8Array;
  staticKeyPair: KeyPair;
  /** The responder's static public key; the initiator must know it in IK. */
  remoteStaticPublicKey?: Uint8Array;
  /** 32 bytes; may instead be supplied later with setPsk (the responder looks it up from message 1). */
  psk?: Uint8Array;
  /** Fixed ephemeral key, for test vectors only: reusing one breaks every security property. */
  ephemeralKeyPair?: KeyPair;
}

export interface ReadMessageHooks {
  /** Runs once the initiator's static key is decrypted and before the `ss` DH: throw to abort cheaply. */
  onRemoteStatic?: (remoteStatic: Uint8Array) => void;
}

/** Reconnect (a fresh handshake) before either transport counter reaches this. */
export const REKEY_AFTER_MESSAGES = 2 ** 48;
/** The largest Noise message, handshake or transport, including its 16-byte tag. */
export const MAX_NOISE_MESSAGE = 65535;
export const TAG_LENGTH = 16;
export const KEY_LENGTH = 32;

/** n = 2^64-1 is reserved by the spec: a cipher state that reaches it refuses further use. */
const MAX_NONCE = 2n ** 64n - 1n;
const DH_LENGTH = 32;
const HASH_LENGTH = 32;
const EMPTY = Buffer.alloc(0);
const PKCS8_X25519_PREFIX = Buffer.from("302e020100300506032b656e04220420", "hex");
const HKDF_ONE = Buffer.of(1);
const HKDF_TWO = Buffer.of(2);
const HKDF_THREE = Buffer.of(3);

// ---------------------------------------------------------------------------------------------
// X25519

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A copy in its own memory (not Node's shared buffer pool), so that wiping it wipes the only copy. */
function copyKey(key: Uint8Array): Buffer {
  const copy = Buffer.alloc(key.byteLength);
  copy.set(key);
  return copy;
}

function requireKeyLength(bytes: Uint8Array, what: string): void {
  if (bytes.byteLength !== DH_LENGTH) {
    throw new RangeError(`${what} must be ${DH_LENGTH} bytes, got ${bytes.byteLength}`);
  }
}

// No generateKeyPairSync here: in Node 20 exporting a freshly generated key can deadlock, because the
// key-generation job's destructor takes the key's mutex when the GC collects it, and export() holds that
// mutex while allocating (which can run the GC). Keys are drawn as random bytes and imported instead.
//
// Two import paths. PKCS#8 DER goes through OpenSSL's decoder registry (~350 µs), acceptable once per
// static key, and is what the cache below holds. A JWK import is ~10x faster and serves per-handshake
// ephemeral keys; Node ignores `x` on a private JWK (the public half is derived from `d`) but insists
// it be present, so a placeholder goes there, and should a Node version start checking it, we fall
// back to DER for good.
const JWK_PLACEHOLDER_X = Buffer.alloc(DH_LENGTH).toString("base64url");
let jwkPrivateImport = true;

function importPrivateKeyDer(privateKey: Uint8Array): KeyObject {
  const der = Buffer.alloc(PKCS8_X25519_PREFIX.length + DH_LENGTH);
  PKCS8_X25519_PREFIX.copy(der, 0);
  der.set(privateKey, PKCS8_X25519_PREFIX.length);
  try {
    return createPrivateKey({ key: der, format: "der", type: "pkcs8" });
  } finally {
    der.fill(0);
  }
}

function importPrivateKeyFast(privateKey: Buffer): KeyObject {
  if (jwkPrivateImport) {
    try {
      return createPrivateKey({
        key: { kty: "OKP", crv: "X25519", d: privateKey.toString("base64url"), x: JWK_PLACEHOLDER_X },
        format: "jwk",
      });
    } catch {
      jwkPrivateImport = false;
    }
  }
  return importPrivateKeyDer(privateKey);
}

/** A fresh ephemeral (or long-term) key: its key object and raw public key. */
function freshKey(): { privateKey: Buffer; key: KeyObject; publicKey: Buffer } {
  const privateKey = randomFillSync(Buffer.alloc(DH_LENGTH));
  const key = importPrivateKeyFast(privateKey);
  return { privateKey, key, publicKey: rawPublicKey(createPublicKey(key)) };
}

// Static keys are imported once: the cache is keyed by the caller's array and re-checks the bytes, so a
// key overwritten in place is re-imported rather than served stale.
interface CachedKey {
  bytes: Buffer;
  key: KeyObject;
}
const privateKeyCache = new WeakMap<Uint8Array, CachedKey>();
const publicKeyCache = new WeakMap<Uint8Array, CachedKey>();

function privateKeyObject(privateKey: Uint8Array): KeyObject {
  requireKeyLength(privateKey, "an X25519 private key");
  const cached = privateKeyCache.get(privateKey);
  if (cached && timingSafeEqual(cached.bytes, privateKey)) return cached.key;
  const key = importPrivateKeyDer(privateKey);
  privateKeyCache.set(privateKey, { bytes: copyKey(privateKey), key });
  return key;
}

/** A public key from raw bytes. JWK import is ~10x faster than SPKI DER in Node 20's OpenSSL 3. */
function importPublicKey(publicKey: Uint8Array): KeyObject {
  requireKeyLength(publicKey, "an X25519 public key");
  return createPublicKey({
    key: { kty: "OKP", crv: "X25519", x: asBuffer(publicKey).toString("base64url") },
    format: "jwk",
  });
}

function publicKeyObject(publicKey: Uint8Array): KeyObject {
  const cached = publicKeyCache.get(publicKey);
  if (cached?.bytes.equals(publicKey)) return cached.key;
  const key = importPublicKey(publicKey);
  publicKeyCache.set(publicKey, { bytes: Buffer.from(publicKey), key });
  return key;
}

// Peers' static keys recur (a home reconnects with the same key), so their key objects are kept: a
// handshake then imports only the peer's ephemeral key. Bounded, oldest out first, since a pairing
// handshake admits any key; the tunnel only ever adds keys its onRemoteStatic hook let through.
const PEER_KEY_CACHE_SIZE = 256;
const peerKeyCache = new Map<string, KeyObject>();

function peerStaticKeyObject(publicKey: Buffer): KeyObject {
  const id = publicKey.toString("base64");
  let key = peerKeyCache.get(id);
  if (key === undefined) {
    key = importPublicKey(publicKey);
    if (peerKeyCache.size >= PEER_KEY_CACHE_SIZE) {
      const oldest = peerKeyCache.keys().next();
      if (!oldest.done) peerKeyCache.delete(oldest.value);
    }
    peerKeyCache.set(id, key);
  }
  return key;
}

function rawPublicKey(key: KeyObject): Buffer {
  const { x } = key.export({ format: "jwk" });
  if (x === undefined) throw new Error("node:crypto exported an X25519 public key without its bytes");
  return Buffer.from(x, "base64url");
}

function dh(privateKey: KeyObject, publicKey: KeyObject): Buffer {
  let shared: Buffer;
  try {
    shared = diffieHellman({ privateKey, publicKey });
  } catch (error) {
    // OpenSSL refuses to derive an all-zero secret, i.e. a low-order public key.
    if ((error as { code?: unknown }).code === "ERR_OSSL_FAILED_DURING_DERIVATION") {
      throw new CryptoError("LOW_ORDER_KEY", undefined, { cause: error });
    }
    throw error;
  }
  // Belt and braces should a build ever return the zeros instead of failing.
  let bits = 0;
  for (const byte of shared) bits |= byte;
  if (bits === 0) throw new CryptoError("LOW_ORDER_KEY");
  return shared;
}

export function generateKeyPair(): KeyPair {
  const { publicKey, privateKey, key } = freshKey();
  // Most new pairs become static keys: spare their first handshake the slow DER import.
  privateKeyCache.set(privateKey, { bytes: copyKey(privateKey), key });
  return { publicKey, privateKey };
}

/** The key pair for a stored private key (the public half is derived, not trusted from storage). */
export function keyPairFromPrivateKey(privateKey: Uint8Array): KeyPair {
  const key = privateKeyObject(privateKey);
  return { publicKey: rawPublicKey(createPublicKey(key)), privateKey };
}

/**
 * X25519(privateKey, publicKey); a low-order public key throws CryptoError("LOW_ORDER_KEY"). Both
 * key objects are kept per array, so a recurring key (a spool key sealed to per message) is imported once.
 */
export function x25519(privateKey: Uint8Array, publicKey: Uint8Array): Uint8Array {
  return dh(privateKeyObject(privateKey), publicKeyObject(publicKey));
}

// ---------------------------------------------------------------------------------------------
// CipherState: ChaCha20-Poly1305 with the Noise nonce (4 zero bytes, then the 64-bit counter LE).

export class CipherState {
  #key: Buffer | undefined;
  #nonce: bigint;
  readonly #iv = Buffer.alloc(12);

  /** `nonce` other than 0 is for tests that need a counter near exhaustion. */
  constructor(key: Uint8Array, nonce = 0n) {
    requireKeyLength(key, "a cipher key");
    if (nonce < 0n || nonce > MAX_NONCE) throw new RangeError("a Noise nonce is a 64-bit unsigned integer");
    this.#key = copyKey(key);
    this.#nonce = nonce;
  }

  /** Messages processed so far (the next nonce). */
  get nonce(): number {
    return Number(this.#nonce);
  }

  encrypt(plaintext: Uint8Array, ad: Uint8Array = EMPTY): Uint8Array {
    return this.encryptParts([plaintext], ad);
  }

  /**
   * Encrypts the concatenation of `parts` as one message without joining them first: the ciphertext
   * of each part and then the tag are written into one buffer. node:crypto has no update-into-buffer
   * and no nonce reset, so a cipher per message and one copy of its output remain.
   */
  encryptParts(parts: readonly Uint8Array[], ad: Uint8Array = EMPTY): Buffer {
    const key = this.#prepare();
    let length = 0;
    for (const part of parts) length += part.byteLength;
    const cipher = createCipheriv("chacha20-poly1305", key, this.#iv, { authTagLength: TAG_LENGTH });
    // No AAD is the same as empty AAD for ChaCha20-Poly1305 (RFC 8439); transport messages have none.
    if (ad.byteLength > 0) cipher.setAAD(ad, { plaintextLength: length });
    const out = Buffer.allocUnsafe(length + TAG_LENGTH);
    let offset = 0;
    for (const part of parts) {
      if (part.byteLength === 0) continue;
      const body = cipher.update(part);
      out.set(body, offset);
      offset += body.byteLength;
    }
    cipher.final();
    out.set(cipher.getAuthTag(), offset);
    this.#nonce++;
    return out;
  }

  /**
   * Like encryptParts, but returns the message as pieces (the ciphertext of each part, then the tag)
   * for a transport that writes pieces without joining them (WebSocketTransport.sendParts): this
   * saves the copy of every ciphertext into one buffer.
   */
  encryptToParts(parts: readonly Uint8Array[]): Buffer[] {
    const key = this.#prepare();
    const cipher = createCipheriv("chacha20-poly1305", key, this.#iv, { authTagLength: TAG_LENGTH });
    const out: Buffer[] = [];
    for (const part of parts) if (part.byteLength > 0) out.push(cipher.update(part));
    cipher.final();
    out.push(cipher.getAuthTag());
    this.#nonce++;
    return out;
  }

  /** Throws CryptoError("DECRYPT_FAILED") and leaves the nonce unchanged if the message does not authenticate. */
  decrypt(ciphertext: Uint8Array, ad: Uint8Array = EMPTY): Uint8Array {
    const key = this.#prepare();
    if (ciphertext.byteLength < TAG_LENGTH) {
      throw new CryptoError("DECRYPT_FAILED", "a transport message is shorter than its 16-byte tag");
    }
    const end = ciphertext.byteLength - TAG_LENGTH;
    const decipher = createDecipheriv("chacha20-poly1305", key, this.#iv, { authTagLength: TAG_LENGTH });
    decipher.setAuthTag(ciphertext.subarray(end));
    if (ad.byteLength > 0) decipher.setAAD(ad, { plaintextLength: end });
    const body = decipher.update(ciphertext.subarray(0, end));
    try {
      decipher.final();
    } catch (error) {
      body.fill(0);
      throw new CryptoError("DECRYPT_FAILED", undefined, { cause: error });
    }
    this.#nonce++;
    return body;
  }

  /** Zero the key; any later encrypt or decrypt throws. */
  wipe(): void {
    this.#key?.fill(0);
    this.#key = undefined;
  }

  #prepare(): Buffer {
    const key = this.#key;
    if (key === undefined) {
      throw new CryptoError(
        "NONCE_EXHAUSTED",
        "this cipher state was wiped and cannot be used again; reconnect",
      );
    }
    if (this.#nonce >= MAX_NONCE) throw new CryptoError("NONCE_EXHAUSTED");
    this.#iv.writeBigUInt64LE(this.#nonce, 4);
    return key;
  }
}

// ---------------------------------------------------------------------------------------------
// SymmetricState (spec §5.2), kept inside HandshakeState.

/** HKDF as Noise defines it (RFC 5869 with an empty info), returning two or three 32-byte outputs. */
function hkdf(chainingKey: Buffer, inputKeyMaterial: Uint8Array, outputs: 2 | 3): Buffer[] {
  const tempKey = createHmac("sha256", chainingKey).update(inputKeyMaterial).digest();
  const first = createHmac("sha256", tempKey).update(HKDF_ONE).digest();
  const second = createHmac("sha256", tempKey).update(first).update(HKDF_TWO).digest();
  if (outputs === 2) {
    tempKey.fill(0);
    return [first, second];
  }
  const third = createHmac("sha256", tempKey).update(second).update(HKDF_THREE).digest();
  tempKey.fill(0);
  return [first, second, third];
}

class SymmetricState {
  chainingKey: Buffer;
  hash: Buffer;
  cipher: CipherState | undefined;

  constructor(protocolName: string) {
    const name = Buffer.from(protocolName, "ascii");
    if (name.length <= HASH_LENGTH) {
      this.hash = Buffer.alloc(HASH_LENGTH);
      name.copy(this.hash);
    } else {
      this.hash = createHash("sha256").update(name).digest();
    }
    this.chainingKey = Buffer.from(this.hash);
  }

  mixHash(data: Uint8Array): void {
    this.hash = createHash("sha256").update(this.hash).update(data).digest();
  }

  mixKey(inputKeyMaterial: Uint8Array): void {
    const [chainingKey, key] = hkdf(this.chainingKey, inputKeyMaterial, 2) as [Buffer, Buffer];
    this.#rekey(chainingKey, key);
  }

  mixKeyAndHash(inputKeyMaterial: Uint8Array): void {
    const [chainingKey, hash, key] = hkdf(this.chainingKey, inputKeyMaterial, 3) as [Buffer, Buffer, Buffer];
    this.mixHash(hash);
    this.#rekey(chainingKey, key);
  }

  encryptAndHash(plaintext: Uint8Array): Uint8Array {
    const ciphertext = this.cipher ? this.cipher.encrypt(plaintext, this.hash) : plaintext;
    this.mixHash(ciphertext);
    return ciphertext;
  }

  /** Throws CryptoError("DECRYPT_FAILED"). */
  decryptAndHash(ciphertext: Uint8Array): Uint8Array {
    const plaintext = this.cipher ? this.cipher.decrypt(ciphertext, this.hash) : ciphertext;
    this.mixHash(ciphertext);
    return plaintext;
  }

  split(): [CipherState, CipherState] {
    const [first, second] = hkdf(this.chainingKey, EMPTY, 2) as [Buffer, Buffer];
    const pair: [CipherState, CipherState] = [new CipherState(first), new CipherState(second)];
    first.fill(0);
    second.fill(0);
    this.wipe();
    return pair;
  }

  wipe(): void {
    this.chainingKey.fill(0);
    this.cipher?.wipe();
    this.cipher = undefined;
  }

  #rekey(chainingKey: Buffer, key: Buffer): void {
    this.chainingKey.fill(0);
    this.chainingKey = chainingKey;
    this.cipher?.wipe();
    this.cipher = new CipherState(key);
    key.fill(0);
  }
}

// ---------------------------------------------------------------------------------------------
// HandshakeState for IK and IKpsk2:
//   <- s
//   ...
//   -> e, es, s, ss
//   <- e, ee, se          (IKpsk2: e, ee, se, psk)

interface LocalKey {
  publicKey: Buffer;
  key: KeyObject;
}

const PROTOCOL_NAMES: Record<HandshakePattern, string> = {
  IK: "Noise_IK_25519_ChaChaPoly_SHA256",
  IKpsk2: "Noise_IKpsk2_25519_ChaChaPoly_SHA256",
};

// Smallest messages: message 1 is e + encrypted s + a tag on the payload; message 2 is e + a tag.
const MIN_MESSAGE_1 = DH_LENGTH + DH_LENGTH + TAG_LENGTH + TAG_LENGTH;
const MIN_MESSAGE_2 = DH_LENGTH + TAG_LENGTH;

type Phase = "message1" | "message2" | "complete" | "split" | "failed";

function failed(message: string, cause?: unknown): HandshakeError {
  return new HandshakeError("HANDSHAKE_FAILED", message, cause === undefined ? undefined : { cause });
}

export class HandshakeState {
  readonly pattern: HandshakePattern;
  readonly initiator: boolean;
  readonly #symmetric: SymmetricState;
  readonly #static: LocalKey;
  #ephemeral: LocalKey | undefined;
  #remoteStatic: Buffer | undefined;
  #remoteStaticKey: KeyObject | undefined;
  #remoteEphemeralKey: KeyObject | undefined;
  #psk: Buffer | undefined;
  #phase: Phase = "message1";

  constructor(options: HandshakeOptions) {
    const { pattern, initiator, staticKeyPair } = options;
    if (pattern !== "IK" && pattern !== "IKpsk2")
      throw failed(`unsupported handshake pattern ${String(pattern)}`);
    this.pattern = pattern;
    this.initiator = initiator;
    requireKeyLength(staticKeyPair.publicKey, "a static public key");
    this.#static = {
      publicKey: Buffer.from(staticKeyPair.publicKey),
      key: privateKeyObject(staticKeyPair.privateKey),
    };
    if (options.ephemeralKeyPair) {
      const { publicKey, privateKey } = options.ephemeralKeyPair;
      requireKeyLength(publicKey, "an ephemeral public key");
      this.#ephemeral = { publicKey: Buffer.from(publicKey), key: privateKeyObject(privateKey) };
    }
    if (options.psk !== undefined) this.setPsk(options.psk);

    this.#symmetric = new SymmetricState(PROTOCOL_NAMES[pattern]);
    this.#symmetric.mixHash(options.prologue);
    if (initiator) {
      const remote = options.remoteStaticPublicKey;
      if (remote === undefined) throw failed("the IK initiator must know the responder's static public key");
      requireKeyLength(remote, "the remote static public key");
      this.#remoteStatic = Buffer.from(remote);
      this.#remoteStaticKey = publicKeyObject(remote);
      this.#symmetric.mixHash(remote);
    } else {
      this.#symmetric.mixHash(this.#static.publicKey);
    }
  }

  /** Supply the 32-byte pre-shared key of an IKpsk2 handshake, before it is needed. */
  setPsk(psk: Uint8Array): void {
    if (this.pattern !== "IKpsk2") throw failed(`the ${this.pattern} pattern takes no pre-shared key`);
    if (psk.byteLength !== KEY_LENGTH) throw failed(`a pre-shared key must be ${KEY_LENGTH} bytes`);
    this.#psk?.fill(0);
    this.#psk = copyKey(psk);
  }

  get remoteStaticPublicKey(): Uint8Array | undefined {
    return this.#remoteStatic && Buffer.from(this.#remoteStatic);
  }

  get isComplete(): boolean {
    return this.#phase === "complete" || this.#phase === "split";
  }

  get handshakeHash(): Uint8Array {
    return Buffer.from(this.#symmetric.hash);
  }

  writeMessage(payload: Uint8Array): Uint8Array {
    const step = this.#expect(true);
    try {
      const message = step === "message1" ? this.#writeMessage1(payload) : this.#writeMessage2(payload);
      this.#phase = step === "message1" ? "message2" : "complete";
      return message;
    } catch (error) {
      this.#fail();
      throw error instanceof HandshakeError ? error : failed(`could not write handshake ${step}`, error);
    }
  }

  readMessage(message: Uint8Array, hooks?: ReadMessageHooks): Uint8Array {
    const step = this.#expect(false);
    let hookError: { error: unknown } | undefined;
    try {
      if (message.byteLength > MAX_NOISE_MESSAGE) {
        throw failed(
          `handshake ${step} is ${message.byteLength} bytes, over the ${MAX_NOISE_MESSAGE}-byte limit`,
        );
      }
      let payload: Uint8Array;
      if (step === "message1") {
        payload = this.#readMessage1(message, (remoteStatic) => {
          try {
            hooks?.onRemoteStatic?.(remoteStatic);
          } catch (error) {
            hookError = { error };
            throw error;
          }
        });
      } else {
        payload = this.#readMessage2(message);
      }
      this.#phase = step === "message1" ? "message2" : "complete";
      return payload;
    } catch (error) {
      this.#fail();
      if (hookError) throw hookError.error;
      if (error instanceof HandshakeError) throw error;
      const reason =
        error instanceof CryptoError && error.code === "LOW_ORDER_KEY"
          ? "carries a low-order public key"
          : "failed authentication (wrong keys, wrong pre-shared key, or a tampered message)";
      throw failed(`handshake ${step} ${reason}`, error);
    }
  }

  /** The transport cipher states, oriented for this side. Callable once, after the handshake completed. */
  split(): { send: CipherState; receive: CipherState } {
    if (this.#phase !== "complete") {
      throw failed(
        this.#phase === "split"
          ? "split() was already called"
          : "split() called before the handshake completed",
      );
    }
    this.#phase = "split";
    const [initiatorToResponder, responderToInitiator] = this.#symmetric.split();
    this.#ephemeral = undefined;
    this.#remoteEphemeralKey = undefined;
    this.#psk?.fill(0);
    this.#psk = undefined;
    return this.initiator
      ? { send: initiatorToResponder, receive: responderToInitiator }
      : { send: responderToInitiator, receive: initiatorToResponder };
  }

  #expect(writing: boolean): "message1" | "message2" {
    const phase = this.#phase;
    if (phase === "failed") throw failed("this handshake already failed and cannot continue");
    if (phase !== "message1" && phase !== "message2") throw failed("the handshake is already complete");
    const initiatorWrites = phase === "message1";
    if (writing !== (initiatorWrites === this.initiator)) {
      const side = this.initiator ? "initiator" : "responder";
      throw failed(`the ${side} cannot ${writing ? "write" : "read"} handshake ${phase}`);
    }
    return phase;
  }

  #fail(): void {
    this.#phase = "failed";
    this.#symmetric.wipe();
    this.#ephemeral = undefined;
    this.#psk?.fill(0);
    this.#psk = undefined;
  }

  #checkPayload(payload: Uint8Array, overhead: number, step: string): void {
    if (payload.byteLength + overhead > MAX_NOISE_MESSAGE) {
      throw failed(`a ${payload.byteLength}-byte payload does not fit in handshake ${step}`);
    }
  }

  /** Token "e"; in a psk handshake the ephemeral key also feeds the chaining key (spec §9.2). */
  #writeEphemeral(): LocalKey {
    let ephemeral = this.#ephemeral;
    if (ephemeral === undefined) {
      const fresh = freshKey();
      fresh.privateKey.fill(0);
      ephemeral = { publicKey: fresh.publicKey, key: fresh.key };
      this.#ephemeral = ephemeral;
    }
    this.#symmetric.mixHash(ephemeral.publicKey);
    if (this.pattern === "IKpsk2") this.#symmetric.mixKey(ephemeral.publicKey);
    return ephemeral;
  }

  #readEphemeral(message: Uint8Array): KeyObject {
    const publicKey = message.subarray(0, DH_LENGTH);
    this.#symmetric.mixHash(publicKey);
    if (this.pattern === "IKpsk2") this.#symmetric.mixKey(publicKey);
    const key = importPublicKey(publicKey);
    this.#remoteEphemeralKey = key;
    return key;
  }

  #mixPsk(): void {
    if (this.pattern !== "IKpsk2") return;
    if (this.#psk === undefined) throw failed("the pre-shared key is needed now but was never set (setPsk)");
    this.#symmetric.mixKeyAndHash(this.#psk);
  }

  // -> e, es, s, ss
  #writeMessage1(payload: Uint8Array): Uint8Array {
    this.#checkPayload(payload, MIN_MESSAGE_1, "message1");
    const remoteStatic = this.#remoteStaticKey!;
    const ephemeral = this.#writeEphemeral();
    this.#symmetric.mixKey(dh(ephemeral.key, remoteStatic));
    const encryptedStatic = this.#symmetric.encryptAndHash(this.#static.publicKey);
    this.#symmetric.mixKey(dh(this.#static.key, remoteStatic));
    const encryptedPayload = this.#symmetric.encryptAndHash(payload);
    return Buffer.concat([ephemeral.publicKey, encryptedStatic, encryptedPayload]);
  }

  #readMessage1(message: Uint8Array, onRemoteStatic: (remoteStatic: Uint8Array) => void): Uint8Array {
    if (message.byteLength < MIN_MESSAGE_1) {
      throw failed(`handshake message1 is ${message.byteLength} bytes; it needs at least ${MIN_MESSAGE_1}`);
    }
    const remoteEphemeral = this.#readEphemeral(message);
    this.#symmetric.mixKey(dh(this.#static.key, remoteEphemeral));
    const staticEnd = DH_LENGTH + DH_LENGTH + TAG_LENGTH;
    const remoteStatic = asBuffer(this.#symmetric.decryptAndHash(message.subarray(DH_LENGTH, staticEnd)));
    this.#remoteStatic = remoteStatic;
    onRemoteStatic(Buffer.from(remoteStatic));
    const remoteStaticKey = peerStaticKeyObject(remoteStatic);
    this.#remoteStaticKey = remoteStaticKey;
    this.#symmetric.mixKey(dh(this.#static.key, remoteStaticKey));
    return this.#symmetric.decryptAndHash(message.subarray(staticEnd));
  }

  // <- e, ee, se (, psk)
  #writeMessage2(payload: Uint8Array): Uint8Array {
    this.#checkPayload(payload, MIN_MESSAGE_2, "message2");
    if (this.pattern === "IKpsk2" && this.#psk === undefined) {
      throw failed("the pre-shared key is needed now but was never set (setPsk)");
    }
    const ephemeral = this.#writeEphemeral();
    this.#symmetric.mixKey(dh(ephemeral.key, this.#remoteEphemeralKey!));
    this.#symmetric.mixKey(dh(ephemeral.key, this.#remoteStaticKey!));
    this.#mixPsk();
    const encryptedPayload = this.#symmetric.encryptAndHash(payload);
    return Buffer.concat([ephemeral.publicKey, encryptedPayload]);
  }

  #readMessage2(message: Uint8Array): Uint8Array {
    if (message.byteLength < MIN_MESSAGE_2) {
      throw failed(`handshake message2 is ${message.byteLength} bytes; it needs at least ${MIN_MESSAGE_2}`);
    }
    if (this.pattern === "IKpsk2" && this.#psk === undefined) {
      throw failed("the pre-shared key is needed now but was never set (setPsk)");
    }
    const remoteEphemeral = this.#readEphemeral(message);
    this.#symmetric.mixKey(dh(this.#ephemeral!.key, remoteEphemeral));
    this.#symmetric.mixKey(dh(this.#static.key, remoteEphemeral));
    this.#mixPsk();
    return this.#symmetric.decryptAndHash(message.subarray(DH_LENGTH));
  }
}
