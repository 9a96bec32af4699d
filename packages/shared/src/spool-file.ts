// The spool file (DESIGN.md "Inbound, spool"): a message the edge accepted while home was away, its
// body sealed to home's *spool* key. This module owns the format and its durable write, so the edge
// can list, age and check spool files (length + hash) without ever being able to read a body.
//
// File = preamble ‖ sealed chunks ‖ trailer
//   preamble: "MXSPOOL1" ‖ u32 BE header length ‖ header (canonical JSON, UTF-8, ≤ 64 KiB)
//   chunks:   secretbox(plaintext[i], K, noncePrefix(16) ‖ i (u56 BE) ‖ final flag (1 byte)), STREAM
//   trailer:  "MXSPEND1" ‖ u64 BE cipher length ‖ SHA-256 of the cipher section
// K = HKDF-SHA256(ikm = box.before(spool public key, ephemeral secret), salt = SHA-256(header bytes),
// info = "mxtunnel/1 spool body"), so every header field is bound into the body key: a changed
// recipient makes the first chunk fail authentication. box.before is NaCl's: HSalsa20 (zero nonce)
// of the X25519 result; the X25519 part runs in node:crypto.
import { createHash, hkdfSync, randomBytes, timingSafeEqual } from "node:crypto";
import { createReadStream } from "node:fs";
import { type FileHandle, link, open, unlink } from "node:fs/promises";
import { isIP } from "node:net";
import { join } from "node:path";
import type { Readable } from "node:stream";
import nacl from "tweetnacl";
import { DescriptorFile, fsyncDirectory } from "./atomic-file.js";
import { CryptoError, StateError } from "./errors.js";
import { GroupCommit } from "./group-commit.js";
import { encodeKey, keyFingerprint } from "./keys.js";
import { generateKeyPair, x25519 } from "./noise.js";

export const SPOOL_CHUNK_SIZE = 65536;
export const SPOOL_MAX_HEADER_LENGTH = 65536;
export const SPOOL_FILE_SUFFIX = ".spool";

const MAGIC = Buffer.from("MXSPOOL1", "ascii");
const MAGIC_FAMILY = Buffer.from("MXSPOOL", "ascii");
const TRAILER_MAGIC = Buffer.from("MXSPEND1", "ascii");
const PREAMBLE_FIXED_LENGTH = MAGIC.length + 4;
const TRAILER_LENGTH = TRAILER_MAGIC.length + 8 + 32;
const TAG_LENGTH = nacl.secretbox.overheadLength;
const NONCE_PREFIX_LENGTH = 16;
const MAX_CHUNK_COUNTER = Number.MAX_SAFE_INTEGER; // the nonce holds 56 bits; JS numbers stop first
const KDF_INFO = Buffer.from("mxtunnel/1 spool body", "ascii");
const MAX_EXTRA_DEPTH = 16;
const ID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;

export interface SpoolEnvelope {
  mailFrom: string;
  /** ESMTP MAIL parameters; a parameter without a value (SMTPUTF8) is "". */
  mailParams: Record<string, string>;
  rcptTo: { address: string; params: Record<string, string> }[];
}

export interface SpoolClient {
  address: string;
  port: number;
  helo: string;
  tls: boolean;
}

export interface SpoolHeader {
  version: 1;
  /** Also the file name: <id>.spool. Letters, digits, "_" and "-", at most 128 characters. */
  id: string;
  /** ISO 8601, UTC, millisecond precision. */
  receivedAt: string;
  envelope: SpoolEnvelope;
  client: SpoolClient;
  /** JSON values only (e.g. auth results); bound into the body key like every other field. */
  extra: Record<string, unknown>;
  /** keyFingerprint(home spool public key). */
  spoolKeyId: string;
  /** base64url: fresh per file, or shared for a short while by an EphemeralKeyPool. */
  ephemeralPublicKey: string;
  /** base64url, 16 random bytes. */
  noncePrefix: string;
  chunkSize: number;
}

export interface SpoolMeta {
  header: SpoolHeader;
  /** Offset of the first sealed chunk in the file. */
  cipherOffset: number;
  cipherLength: number;
  /** Hex SHA-256 of the cipher section. */
  cipherSha256: string;
  fileSize: number;
}

// ---------------------------------------------------------------------------------------------
// Header: strict validation and the canonical bytes the body key is bound to.

const HEADER_FIELDS = [
  "version",
  "id",
  "receivedAt",
  "envelope",
  "client",
  "extra",
  "spoolKeyId",
  "ephemeralPublicKey",
  "noncePrefix",
  "chunkSize",
] as const;

/** Validates a parsed header (e.g. JSON from the tunnel); a StateError STATE_CORRUPT lists every problem. */
export function parseSpoolHeader(json: unknown): SpoolHeader {
  const problems = headerProblems(json);
  if (problems.length > 0) {
    throw new StateError("STATE_CORRUPT", `The spool header is invalid: ${problems.join("; ")}.`);
  }
  // A deep copy through the canonical form: the result holds exactly what the key is bound to.
  return deepFreeze(JSON.parse(canonicalJson(json)) as SpoolHeader);
}

function headerProblems(value: unknown): string[] {
  const problems: string[] = [];
  const header = fieldsOf(value, "header", HEADER_FIELDS, problems);
  if (!header) return problems;
  if (header.version !== 1) {
    problems.push(
      typeof header.version === "number" && Number.isInteger(header.version) && header.version > 1
        ? `version: the file is spool format ${header.version} but this mxtunnel reads format 1; upgrade mxtunnel`
        : "version: expected 1",
    );
  }
  if (typeof header.id !== "string" || !ID_PATTERN.test(header.id)) {
    problems.push('id: expected 1-128 letters, digits, "_" or "-", not starting with "_" or "-"');
  }
  if (!isIsoTimestamp(header.receivedAt)) {
    problems.push("receivedAt: expected an ISO 8601 UTC timestamp (YYYY-MM-DDTHH:MM:SS.sssZ)");
  }
  const envelope = fieldsOf(header.envelope, "envelope", ["mailFrom", "mailParams", "rcptTo"], problems);
  if (envelope) {
    if (typeof envelope.mailFrom !== "string") problems.push("envelope.mailFrom: expected a string");
    stringRecord(envelope.mailParams, "envelope.mailParams", problems);
    if (!Array.isArray(envelope.rcptTo) || envelope.rcptTo.length === 0) {
      problems.push("envelope.rcptTo: expected a non-empty array");
    } else {
      envelope.rcptTo.forEach((entry: unknown, index) => {
        const where = `envelope.rcptTo[${index}]`;
        const rcpt = fieldsOf(entry, where, ["address", "params"], problems);
        if (!rcpt) return;
        if (typeof rcpt.address !== "string" || rcpt.address === "") {
          problems.push(`${where}.address: expected a non-empty string`);
        }
        stringRecord(rcpt.params, `${where}.params`, problems);
      });
    }
  }
  const client = fieldsOf(header.client, "client", ["address", "port", "helo", "tls"], problems);
  if (client) {
    if (typeof client.address !== "string" || isIP(client.address) === 0) {
      problems.push("client.address: expected an IP address");
    }
    if (!Number.isInteger(client.port) || (client.port as number) < 0 || (client.port as number) > 65535) {
      problems.push("client.port: expected an integer from 0 to 65535");
    }
    if (typeof client.helo !== "string") problems.push("client.helo: expected a string");
    if (typeof client.tls !== "boolean") problems.push("client.tls: expected true or false");
  }
  if (!isPlainObject(header.extra)) problems.push("extra: expected an object");
  else jsonValueProblem(header.extra, "extra", 0, problems);
  if (typeof header.spoolKeyId !== "string" || !/^SHA256:[A-Za-z0-9_-]{16}$/.test(header.spoolKeyId)) {
    problems.push("spoolKeyId: expected a key fingerprint (SHA256: and 16 base64url characters)");
  }
  if (!isBase64url(header.ephemeralPublicKey, 32)) {
    problems.push("ephemeralPublicKey: expected a 32-byte key in base64url");
  }
  if (!isBase64url(header.noncePrefix, NONCE_PREFIX_LENGTH)) {
    problems.push("noncePrefix: expected 16 bytes in base64url");
  }
  if (header.chunkSize !== SPOOL_CHUNK_SIZE) problems.push(`chunkSize: expected ${SPOOL_CHUNK_SIZE}`);
  return problems;
}

function fieldsOf(
  value: unknown,
  where: string,
  fields: readonly string[],
  problems: string[],
): Record<string, unknown> | undefined {
  if (!isPlainObject(value)) {
    problems.push(`${where}: expected an object`);
    return undefined;
  }
  for (const key of Object.keys(value)) {
    if (!fields.includes(key)) problems.push(`${where}.${key}: unknown field`);
  }
  return value;
}

function stringRecord(value: unknown, where: string, problems: string[]): void {
  if (!isPlainObject(value)) {
    problems.push(`${where}: expected an object of strings`);
    return;
  }
  for (const [key, item] of Object.entries(value)) {
    if (typeof item !== "string") problems.push(`${where}.${key}: expected a string`);
  }
}

/** Pushes the first thing in `value` that canonical JSON cannot represent faithfully. */
function jsonValueProblem(value: unknown, where: string, depth: number, problems: string[]): boolean {
  if (value === null || typeof value === "string" || typeof value === "boolean") return true;
  if (typeof value === "number") {
    if (Number.isFinite(value)) return true;
    problems.push(`${where}: expected a finite number`);
    return false;
  }
  if (depth >= MAX_EXTRA_DEPTH) {
    problems.push(`${where}: nested deeper than ${MAX_EXTRA_DEPTH} levels`);
    return false;
  }
  if (Array.isArray(value)) {
    for (let index = 0; index < value.length; index++) {
      if (!jsonValueProblem(value[index], `${where}[${index}]`, depth + 1, problems)) return false;
    }
    return true;
  }
  if (isPlainObject(value)) {
    for (const [key, item] of Object.entries(value)) {
      if (!jsonValueProblem(item, `${where}.${key}`, depth + 1, problems)) return false;
    }
    return true;
  }
  problems.push(`${where}: expected a JSON value (null, boolean, number, string, array or plain object)`);
  return false;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const prototype = Object.getPrototypeOf(value);
  return prototype === Object.prototype || prototype === null;
}

function isIsoTimestamp(value: unknown): boolean {
  if (typeof value !== "string" || !/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/.test(value)) return false;
  const time = Date.parse(value);
  return Number.isFinite(time) && new Date(time).toISOString() === value;
}

function isBase64url(value: unknown, byteLength: number): boolean {
  if (typeof value !== "string" || value.length !== Math.ceil((byteLength * 4) / 3)) return false;
  if (!/^[A-Za-z0-9_-]*$/.test(value)) return false;
  const bytes = Buffer.from(value, "base64url");
  return bytes.length === byteLength && bytes.toString("base64url") === value;
}

/**
 * Keys sorted (UTF-16 order), no whitespace. JSON.stringify is deterministic for strings and finite
 * numbers and escapes lone surrogates, so canonicalJson(JSON.parse(c)) === c for every output c.
 */
function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (isPlainObject(value)) {
    const members = Object.keys(value)
      .sort()
      .map((key) => `${JSON.stringify(key)}:${canonicalJson(value[key])}`);
    return `{${members.join(",")}}`;
  }
  return JSON.stringify(value);
}

function encodeHeader(header: SpoolHeader): Buffer {
  return Buffer.from(canonicalJson(header), "utf8");
}

function deepFreeze<T>(value: T): T {
  if (typeof value === "object" && value !== null) {
    for (const item of Object.values(value)) deepFreeze(item);
    Object.freeze(value);
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// Keys and nonces.

let lowOrderShared: Uint8Array | undefined;

type HSalsa20 = (out: Uint8Array, input: Uint8Array, key: Uint8Array, constant: Uint8Array) => number;
const hsalsa20 = (nacl as unknown as { lowlevel?: { crypto_core_hsalsa20?: HSalsa20 } }).lowlevel
  ?.crypto_core_hsalsa20;
const SALSA20_SIGMA = new Uint8Array(Buffer.from("expand 32-byte k", "ascii"));
const HSALSA20_ZERO_NONCE = new Uint8Array(16);

function lowOrderError(cause?: unknown): CryptoError {
  return new CryptoError(
    "LOW_ORDER_KEY",
    "A spool key exchange gave the all-zero secret (low-order public key); the key is unusable.",
    cause === undefined ? undefined : { cause },
  );
}

/**
 * nacl.box.before(publicKey, secretKey), byte for byte: HSalsa20(X25519(secretKey, publicKey), zero
 * nonce). tweetnacl's scalar multiplication costs ≈ 1.4 ms per file; node:crypto's a few µs.
 */
function boxBefore(publicKey: Uint8Array, secretKey: Uint8Array): Uint8Array {
  if (!hsalsa20) return nacl.box.before(publicKey, secretKey);
  let raw: Uint8Array;
  try {
    raw = x25519(secretKey, publicKey);
  } catch (error) {
    if (error instanceof CryptoError && error.code === "LOW_ORDER_KEY") throw lowOrderError(error);
    throw error;
  }
  const shared = new Uint8Array(32);
  hsalsa20(shared, HSALSA20_ZERO_NONCE, raw, SALSA20_SIGMA);
  raw.fill(0);
  return shared;
}

/**
 * K for one file. Wipes `shared`. X25519 with a low-order point gives zeros, which box.before turns
 * into one well-known value: refusing it keeps a broken spool key from sealing to an open secret.
 */
function deriveBodyKey(shared: Uint8Array, headerBytes: Uint8Array): Uint8Array {
  try {
    lowOrderShared ??= nacl.box.before(new Uint8Array(32), new Uint8Array(32));
    if (timingSafeEqual(shared, lowOrderShared)) throw lowOrderError();
    const salt = createHash("sha256").update(headerBytes).digest();
    return new Uint8Array(hkdfSync("sha256", shared, salt, KDF_INFO, nacl.secretbox.keyLength));
  } finally {
    shared.fill(0);
  }
}

function chunkNonce(prefix: Uint8Array, counter: number, final: boolean): Uint8Array {
  if (counter > MAX_CHUNK_COUNTER) throw new RangeError("spool body has too many chunks");
  const nonce = Buffer.alloc(nacl.secretbox.nonceLength);
  nonce.set(prefix, 0);
  nonce.writeUIntBE(Math.floor(counter / 2 ** 32), NONCE_PREFIX_LENGTH, 3);
  nonce.writeUInt32BE(counter >>> 0, NONCE_PREFIX_LENGTH + 3);
  nonce[23] = final ? 1 : 0;
  return nonce;
}

function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

// ---------------------------------------------------------------------------------------------
// Sealing and opening.

export interface SpoolSealerOptions {
  spoolPublicKey: Uint8Array;
  id: string;
  receivedAt: Date;
  envelope: SpoolEnvelope;
  client: SpoolClient;
  extra?: Record<string, unknown>;
  /** Share an ephemeral key with the files sealed just before (see EphemeralKeyPool); else a fresh one. */
  ephemeralKeys?: EphemeralKeyPool;
}

interface PooledEphemeral {
  /** base64url of the ephemeral public key, as the header carries it. */
  publicKey: string;
  /** box.before(spool key, ephemeral secret): the secret the body key is derived from. */
  shared: Uint8Array;
  uses: number;
  expiresAt: number;
}

/**
 * Lets the files sealed within a short window (by default 256 files or one second) share one ephemeral
 * key. Each file still gets its own body key: the key derivation's salt is the hash of the header,
 * which holds the file's unique id and its own random nonce prefix. What is shared is the ephemeral
 * key agreement, which costs more than the rest of sealing a small message (the edge under a backlog
 * seals hundreds of messages a second). The cost is exposure: whoever reads the edge's memory can open
 * the files sealed in the current window, a second's worth of mail it could read arriving anyway;
 * the secret is wiped when its window ends. One entry per spool key (an edge serves few homes).
 */
export class EphemeralKeyPool {
  readonly #entries = new Map<string, PooledEphemeral>();
  readonly #maxUses: number;
  readonly #maxAgeMs: number;
  readonly #now: () => number;

  constructor(options: { maxUses?: number; maxAgeMs?: number; now?: () => number } = {}) {
    this.#maxUses = options.maxUses ?? 256;
    this.#maxAgeMs = options.maxAgeMs ?? 1_000;
    this.#now = options.now ?? Date.now;
    if (!(Number.isInteger(this.#maxUses) && this.#maxUses >= 1)) {
      throw new RangeError("EphemeralKeyPool maxUses must be a whole number of at least 1");
    }
    if (!(Number.isFinite(this.#maxAgeMs) && this.#maxAgeMs >= 0)) {
      throw new RangeError("EphemeralKeyPool maxAgeMs must be a finite number of milliseconds, at least 0");
    }
  }

  /** The ephemeral public key (base64url) and a copy of the shared secret, which the caller wipes. */
  take(spoolPublicKey: Uint8Array): { publicKey: string; shared: Uint8Array } {
    const name = asBuffer(spoolPublicKey).toString("hex");
    let entry = this.#entries.get(name);
    const now = this.#now();
    if (entry && (entry.uses >= this.#maxUses || now >= entry.expiresAt)) {
      this.#drop(name, entry);
      entry = undefined;
    }
    if (!entry) {
      const fresh = freshEphemeral(spoolPublicKey);
      entry = {
        publicKey: fresh.publicKey,
        shared: fresh.shared,
        uses: 0,
        expiresAt: now + this.#maxAgeMs,
      };
      this.#entries.set(name, entry);
      // Wiped when the window ends even if no file comes to replace it.
      const created = entry;
      setTimeout(() => {
        if (this.#entries.get(name) === created) this.#drop(name, created);
      }, this.#maxAgeMs).unref();
    }
    entry.uses++;
    return { publicKey: entry.publicKey, shared: entry.shared.slice() };
  }

  /** Wipes every held secret now rather than at the end of its window. The pool stays usable. */
  clear(): void {
    for (const [name, entry] of this.#entries) this.#drop(name, entry);
  }

  #drop(name: string, entry: PooledEphemeral): void {
    entry.shared.fill(0);
    this.#entries.delete(name);
  }
}

/** A fresh ephemeral key for one spool key: its public half (base64url) and the shared secret. */
function freshEphemeral(spoolPublicKey: Uint8Array): { publicKey: string; shared: Uint8Array } {
  const ephemeral = generateKeyPair();
  try {
    return {
      publicKey: encodeKey(ephemeral.publicKey),
      shared: boxBefore(spoolPublicKey, ephemeral.privateKey),
    };
  } finally {
    ephemeral.privateKey.fill(0);
  }
}

/**
 * Seals one message incrementally. It buffers at most one chunk of plaintext: a full chunk is sealed
 * only once more data shows it is not the last. Invalid options throw a TypeError naming each problem.
 */
export class SpoolSealer {
  readonly header: SpoolHeader;
  /** Magic, header length and header: the file's first bytes. */
  readonly preamble: Buffer;
  #key: Uint8Array | undefined;
  readonly #noncePrefix: Buffer;
  /** Plaintext of the chunk being filled; grows up to a chunk, so a small message holds little. */
  #block = Buffer.alloc(0);
  #filled = 0;
  #counter = 0;
  #plaintextLength = 0;

  constructor(options: SpoolSealerOptions) {
    const { spoolPublicKey } = options;
    if (!(spoolPublicKey instanceof Uint8Array) || spoolPublicKey.length !== 32) {
      throw new RangeError("spoolPublicKey must be 32 bytes");
    }
    const ephemeral = options.ephemeralKeys?.take(spoolPublicKey) ?? freshEphemeral(spoolPublicKey);
    const shared = ephemeral.shared;
    try {
      this.#noncePrefix = randomBytes(NONCE_PREFIX_LENGTH);
      const receivedAt =
        options.receivedAt instanceof Date && Number.isFinite(options.receivedAt.getTime())
          ? options.receivedAt.toISOString()
          : "";
      const candidate = {
        version: 1,
        id: options.id,
        receivedAt,
        envelope: options.envelope,
        client: options.client,
        extra: options.extra ?? {},
        spoolKeyId: keyFingerprint(spoolPublicKey),
        ephemeralPublicKey: ephemeral.publicKey,
        noncePrefix: this.#noncePrefix.toString("base64url"),
        chunkSize: SPOOL_CHUNK_SIZE,
      };
      const problems = headerProblems(candidate);
      if (problems.length > 0) throw new TypeError(`Cannot spool this message: ${problems.join("; ")}.`);
      const headerBytes = Buffer.from(canonicalJson(candidate), "utf8");
      if (headerBytes.length > SPOOL_MAX_HEADER_LENGTH) {
        throw new RangeError(
          `Cannot spool this message: its header is ${headerBytes.length} bytes, more than the ` +
            `${SPOOL_MAX_HEADER_LENGTH}-byte limit (too many recipients or parameters?).`,
        );
      }
      this.header = deepFreeze(JSON.parse(headerBytes.toString("utf8")) as SpoolHeader);
      const length = Buffer.alloc(4);
      length.writeUInt32BE(headerBytes.length);
      this.preamble = Buffer.concat([MAGIC, length, headerBytes]);
      this.#key = deriveBodyKey(shared, headerBytes);
    } finally {
      shared.fill(0);
    }
  }

  /** Plaintext bytes accepted so far. */
  get plaintextLength(): number {
    return this.#plaintextLength;
  }

  /** Sealed chunks ready to be written, in order (often none). */
  update(plaintext: Uint8Array): Buffer[] {
    this.#keyOrThrow();
    const sealed: Buffer[] = [];
    let offset = 0;
    while (offset < plaintext.length) {
      if (this.#filled === SPOOL_CHUNK_SIZE) sealed.push(this.#seal(false));
      const take = Math.min(SPOOL_CHUNK_SIZE - this.#filled, plaintext.length - offset);
      if (this.#block.length < this.#filled + take) this.#grow(this.#filled + take);
      this.#block.set(plaintext.subarray(offset, offset + take), this.#filled);
      this.#filled += take;
      offset += take;
    }
    this.#plaintextLength += plaintext.length;
    return sealed;
  }

  /** The final chunk (empty plaintext for an empty message). The sealer is spent afterwards. */
  final(): Buffer {
    this.#keyOrThrow();
    const last = this.#seal(true);
    this.destroy();
    return last;
  }

  /** Wipes the key and buffered plaintext; further use throws. Idempotent. */
  destroy(): void {
    this.#key?.fill(0);
    this.#key = undefined;
    this.#block.fill(0);
    this.#filled = 0;
  }

  #grow(needed: number): void {
    const block = Buffer.alloc(Math.min(SPOOL_CHUNK_SIZE, Math.max(needed, 2 * this.#block.length)));
    this.#block.copy(block, 0, 0, this.#filled);
    this.#block.fill(0);
    this.#block = block;
  }

  #seal(final: boolean): Buffer {
    const nonce = chunkNonce(this.#noncePrefix, this.#counter, final);
    const sealed = nacl.secretbox(this.#block.subarray(0, this.#filled), nonce, this.#keyOrThrow());
    this.#counter++;
    this.#filled = 0;
    return asBuffer(sealed);
  }

  #keyOrThrow(): Uint8Array {
    if (!this.#key) throw new Error("this SpoolSealer has finished (final() or destroy() was called)");
    return this.#key;
  }
}

/**
 * Opens one body incrementally. Every chunk is authenticated before any of its plaintext is released;
 * a full chunk is held back until more data (or final()) shows whether it is the last. Any failure is
 * a CryptoError DECRYPT_FAILED, and the opener stays failed.
 */
export class SpoolOpener {
  readonly header: SpoolHeader;
  #key: Uint8Array | undefined;
  readonly #noncePrefix: Buffer;
  readonly #sealedChunkSize: number;
  #pending: Buffer[] = [];
  #pendingLength = 0;
  #counter = 0;
  #failure: CryptoError | undefined;
  #done = false;

  constructor(header: SpoolHeader, spoolKeyPair: { publicKey: Uint8Array; privateKey: Uint8Array }) {
    this.header = parseSpoolHeader(header);
    const ours = keyFingerprint(spoolKeyPair.publicKey);
    if (this.header.spoolKeyId !== ours) {
      throw new CryptoError(
        "DECRYPT_FAILED",
        `Spool file ${this.header.id} was sealed to the spool key ${this.header.spoolKeyId}, but this ` +
          `home's spool key is ${ours}; it can only be opened with the key it was sealed to.`,
      );
    }
    this.#noncePrefix = Buffer.from(this.header.noncePrefix, "base64url");
    this.#sealedChunkSize = this.header.chunkSize + TAG_LENGTH;
    const ephemeral = Buffer.from(this.header.ephemeralPublicKey, "base64url");
    const shared = boxBefore(ephemeral, spoolKeyPair.privateKey);
    this.#key = deriveBodyKey(shared, encodeHeader(this.header));
  }

  /** Plaintext of the chunks now proven non-final (possibly empty). */
  update(cipher: Uint8Array): Buffer {
    this.#usableOrThrow();
    if (cipher.length === 0) return Buffer.alloc(0);
    this.#pending.push(Buffer.from(cipher));
    this.#pendingLength += cipher.length;
    const opened: Buffer[] = [];
    while (this.#pendingLength > this.#sealedChunkSize) {
      opened.push(this.#open(this.#take(this.#sealedChunkSize), false));
    }
    return opened.length === 1 ? (opened[0] as Buffer) : Buffer.concat(opened);
  }

  /** Plaintext of the final chunk; throws if it is missing, damaged, or not marked final. */
  final(): Buffer {
    this.#usableOrThrow();
    if (this.#pendingLength < TAG_LENGTH) {
      this.#fail(
        `Spool file ${this.header.id}: the body ends without its final chunk (the file is truncated).`,
      );
    }
    const last = this.#open(this.#take(this.#pendingLength), true);
    this.#done = true;
    this.destroy();
    return last;
  }

  /** Wipes the key; further use throws. Idempotent. */
  destroy(): void {
    this.#key?.fill(0);
    this.#key = undefined;
    this.#pending = [];
    this.#pendingLength = 0;
  }

  #open(sealed: Buffer, final: boolean): Buffer {
    const key = this.#usableOrThrow();
    const plaintext = nacl.secretbox.open(sealed, chunkNonce(this.#noncePrefix, this.#counter, final), key);
    if (!plaintext) {
      this.#fail(
        `Spool file ${this.header.id}: chunk ${this.#counter} failed authentication (the body is damaged, ` +
          "truncated, reordered or extended, or its header was changed).",
      );
    }
    this.#counter++;
    return asBuffer(plaintext);
  }

  #take(length: number): Buffer {
    const all = this.#pending.length === 1 ? (this.#pending[0] as Buffer) : Buffer.concat(this.#pending);
    const rest = all.subarray(length);
    this.#pending = rest.length > 0 ? [rest] : [];
    this.#pendingLength = rest.length;
    return all.subarray(0, length);
  }

  #fail(message: string): never {
    this.destroy();
    this.#failure = new CryptoError("DECRYPT_FAILED", message);
    throw this.#failure;
  }

  #usableOrThrow(): Uint8Array {
    if (this.#failure) throw this.#failure;
    if (!this.#key) {
      throw new Error(`this SpoolOpener has ${this.#done ? "finished" : "been destroyed"}`);
    }
    return this.#key;
  }
}

// ---------------------------------------------------------------------------------------------
// The edge's durable write.

/** The calls the writer makes on its temporary file (a FileHandle has them too). */
export interface SpoolFileHandle {
  write(buffer: Buffer, offset: number, length: number): Promise<{ bytesWritten: number }>;
  sync(): Promise<void>;
  close(): Promise<void>;
}

export type SpoolFileOpener = (path: string, flags: string, mode: number) => Promise<SpoolFileHandle>;

export interface SpoolFileWriterOptions {
  /** Where the temporary file lives; must be on the same file system as the spool directory. */
  tmpDir?: string;
  /** Fault injection for tests (node:fs/promises' open fits). */
  open?: SpoolFileOpener;
}

export interface SpoolCommit {
  path: string;
  cipherLength: number;
  cipherSha256: string;
  /** Preamble, cipher section and trailer. */
  fileSize: number;
}

// Group commit of the spool directory: one fsync makes every link made before it durable, so
// concurrent commits share the fsyncs that start after their links.
const directorySyncs = new Map<string, GroupCommit>();

function syncDirectoryGrouped(dir: string): Promise<void> {
  let group = directorySyncs.get(dir);
  if (!group) {
    group = new GroupCommit(() => fsyncDirectory(dir));
    directorySyncs.set(dir, group);
  }
  return group.request();
}

/**
 * Streams one sealed message into a temporary file (mode 0600, name starting with "."), then commit()
 * puts it in place as <dir>/<id>.spool: final chunk, trailer, fsync, link, fsync the directory
 * (shared by the commits that link meanwhile). The final step never replaces an existing spool file
 * (two messages with one id would lose one). The temporary name's removal is not synced: after a
 * crash it is one more link to the same file, and the spool removes temporary files at start.
 * Calls are queued, so write() may be called again before the previous one settles. Bytes are
 * written a chunk's worth at a time, so a small message costs one write at commit.
 */
export class SpoolFileWriter {
  readonly path: string;
  readonly tempPath: string;
  readonly #dir: string;
  readonly #sealer: SpoolSealer;
  #handle: SpoolFileHandle | undefined;
  readonly #hash = createHash("sha256");
  #cipherLength = 0;
  /** Sealed bytes not written yet (the preamble first). */
  #unwritten: Buffer[] = [];
  #unwrittenLength = 0;
  #queue: Promise<void> = Promise.resolve();
  #state: "writing" | "committing" | "committed" | "aborted" = "writing";
  #failure: unknown;
  #aborting: Promise<void> | undefined;

  private constructor(dir: string, tempPath: string, handle: SpoolFileHandle, sealer: SpoolSealer) {
    this.#dir = dir;
    this.path = join(dir, `${sealer.header.id}${SPOOL_FILE_SUFFIX}`);
    this.tempPath = tempPath;
    this.#handle = handle;
    this.#sealer = sealer;
    this.#unwritten.push(sealer.preamble);
    this.#unwrittenLength = sealer.preamble.length;
  }

  static async create(
    dir: string,
    sealer: SpoolSealer,
    options: SpoolFileWriterOptions = {},
  ): Promise<SpoolFileWriter> {
    if (sealer.plaintextLength > 0) {
      throw new TypeError("SpoolFileWriter needs a fresh SpoolSealer (its update() has already been called)");
    }
    const openFile = options.open ?? DescriptorFile.open;
    const name = `.${sealer.header.id}.${randomBytes(6).toString("hex")}.tmp`;
    const tempPath = join(options.tmpDir ?? dir, name);
    const handle = await openFile(tempPath, "wx", 0o600);
    return new SpoolFileWriter(dir, tempPath, handle, sealer);
  }

  /** Seals `plaintext` and appends what is ready. Rejects (and aborts) if the disk refuses. */
  async write(plaintext: Uint8Array): Promise<void> {
    this.#writingOrThrow();
    const chunks = this.#sealer.update(plaintext);
    await this.#run(async () => {
      for (const chunk of chunks) this.#append(chunk);
      if (this.#unwrittenLength >= SPOOL_CHUNK_SIZE) await this.#writeUnwritten();
    });
  }

  /** Makes the message durable under its final name; only then may the edge answer 250. */
  async commit(): Promise<SpoolCommit> {
    this.#writingOrThrow();
    this.#state = "committing";
    const last = this.#sealer.final();
    await this.#run(async () => {
      this.#append(last);
      const trailer = Buffer.alloc(TRAILER_LENGTH);
      TRAILER_MAGIC.copy(trailer, 0);
      trailer.writeBigUInt64BE(BigInt(this.#cipherLength), TRAILER_MAGIC.length);
      this.#hash
        .copy()
        .digest()
        .copy(trailer, TRAILER_MAGIC.length + 8);
      this.#unwritten.push(trailer);
      this.#unwrittenLength += trailer.length;
      await this.#writeUnwritten();
      const handle = this.#handleOrThrow();
      await handle.sync();
      this.#handle = undefined;
      await handle.close();
      try {
        await link(this.tempPath, this.path);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
        throw new StateError(
          "STATE_EXISTS",
          `Refusing to replace the spool file ${this.path}: a message with id ${this.#sealer.header.id} is ` +
            "already spooled (the edge must give every message a fresh id).",
        );
      }
      this.#state = "committed";
      await unlink(this.tempPath);
      await syncDirectoryGrouped(this.#dir);
    });
    return {
      path: this.path,
      cipherLength: this.#cipherLength,
      cipherSha256: this.#hash.digest("hex"),
      fileSize: this.#sealer.preamble.length + this.#cipherLength + TRAILER_LENGTH,
    };
  }

  /**
   * Closes and removes the temporary file. Idempotent; called automatically when write() or commit()
   * fails. Once commit() has put the file in place, abort() leaves it there.
   */
  async abort(): Promise<void> {
    await this.#queue;
    await this.#abortNow();
  }

  #abortNow(): Promise<void> {
    this.#aborting ??= (async () => {
      if (this.#state !== "committed") this.#state = "aborted";
      this.#sealer.destroy();
      const handle = this.#handle;
      this.#handle = undefined;
      await handle?.close().catch(() => undefined);
      await unlink(this.tempPath).catch((error: NodeJS.ErrnoException) => {
        if (error.code !== "ENOENT") throw error;
      });
    })();
    return this.#aborting;
  }

  #run(step: () => Promise<void>): Promise<void> {
    const result = this.#queue.then(async () => {
      if (this.#state === "aborted") throw this.#abortedError();
      try {
        await step();
      } catch (error) {
        this.#failure ??= error;
        await this.#abortNow().catch(() => undefined);
        throw error;
      }
    });
    this.#queue = result.catch(() => undefined);
    return result;
  }

  #append(chunk: Buffer): void {
    this.#unwritten.push(chunk);
    this.#unwrittenLength += chunk.length;
    this.#hash.update(chunk);
    this.#cipherLength += chunk.length;
  }

  async #writeUnwritten(): Promise<void> {
    const bytes =
      this.#unwritten.length === 1 ? (this.#unwritten[0] as Buffer) : Buffer.concat(this.#unwritten);
    this.#unwritten = [];
    this.#unwrittenLength = 0;
    await this.#writeAll(bytes);
  }

  async #writeAll(bytes: Buffer): Promise<void> {
    const handle = this.#handleOrThrow();
    let offset = 0;
    while (offset < bytes.length) {
      const { bytesWritten } = await handle.write(bytes, offset, bytes.length - offset);
      if (bytesWritten <= 0) throw new Error(`writing ${this.tempPath} made no progress`);
      offset += bytesWritten;
    }
  }

  #handleOrThrow(): SpoolFileHandle {
    if (!this.#handle) throw this.#abortedError();
    return this.#handle;
  }

  #writingOrThrow(): void {
    if (this.#state === "writing") return;
    if (this.#state === "aborted") throw this.#abortedError();
    throw new Error(`the spool file writer for ${this.path} is already committing or committed`);
  }

  #abortedError(): Error {
    return new Error(`the spool file writer for ${this.path} was aborted`, { cause: this.#failure });
  }
}

// ---------------------------------------------------------------------------------------------
// Reading: what the edge may do without the key.

/**
 * Reads the preamble and trailer (not the body) and checks that they fit together. Anything
 * inconsistent — bad magic, a truncated file, lengths that do not add up, a header that is not in
 * canonical form — is a StateError STATE_CORRUPT naming the file.
 */
export async function readSpoolMeta(path: string): Promise<SpoolMeta> {
  const corrupt = (problem: string) => new StateError("STATE_CORRUPT", `${path}: ${problem}`);
  const handle = await open(path, "r");
  try {
    const fileSize = (await handle.stat()).size;
    if (fileSize < PREAMBLE_FIXED_LENGTH + TRAILER_LENGTH) {
      throw corrupt(`only ${fileSize} bytes: too short to be a spool file`);
    }
    const fixed = await readExactly(handle, 0, PREAMBLE_FIXED_LENGTH, corrupt);
    const magic = fixed.subarray(0, MAGIC.length);
    if (!magic.equals(MAGIC)) {
      throw corrupt(
        magic.subarray(0, MAGIC_FAMILY.length).equals(MAGIC_FAMILY)
          ? `spool format "${magic.toString("latin1")}" is not one this mxtunnel reads; upgrade mxtunnel`
          : "not an mxtunnel spool file (bad magic)",
      );
    }
    const headerLength = fixed.readUInt32BE(MAGIC.length);
    if (headerLength > SPOOL_MAX_HEADER_LENGTH) {
      throw corrupt(`header length ${headerLength} exceeds the ${SPOOL_MAX_HEADER_LENGTH}-byte limit`);
    }
    const cipherOffset = PREAMBLE_FIXED_LENGTH + headerLength;
    if (fileSize < cipherOffset + TRAILER_LENGTH) {
      throw corrupt(`truncated: ${fileSize} bytes cannot hold a ${headerLength}-byte header and a trailer`);
    }
    const trailer = await readExactly(handle, fileSize - TRAILER_LENGTH, TRAILER_LENGTH, corrupt);
    if (!trailer.subarray(0, TRAILER_MAGIC.length).equals(TRAILER_MAGIC)) {
      throw corrupt("no trailer: the file is truncated, damaged, or was never committed");
    }
    const recorded = trailer.readBigUInt64BE(TRAILER_MAGIC.length);
    const cipherLength = fileSize - TRAILER_LENGTH - cipherOffset;
    if (recorded !== BigInt(cipherLength)) {
      throw corrupt(`the trailer records ${recorded} cipher bytes but the file holds ${cipherLength}`);
    }
    const headerBytes = await readExactly(handle, PREAMBLE_FIXED_LENGTH, headerLength, corrupt);
    let json: unknown;
    try {
      json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
    } catch {
      throw corrupt("the header is not valid UTF-8 JSON");
    }
    let header: SpoolHeader;
    try {
      header = parseSpoolHeader(json);
    } catch (error) {
      throw corrupt((error as Error).message);
    }
    if (!encodeHeader(header).equals(headerBytes)) throw corrupt("the header is not in canonical form");
    if (!isValidCipherLength(cipherLength, header.chunkSize + TAG_LENGTH)) {
      throw corrupt(`${cipherLength} cipher bytes cannot be a whole number of sealed chunks`);
    }
    const cipherSha256 = trailer.subarray(TRAILER_MAGIC.length + 8).toString("hex");
    return { header, cipherOffset, cipherLength, cipherSha256, fileSize };
  } finally {
    await handle.close();
  }
}

/** Full chunks, then a final chunk of TAG_LENGTH to sealedChunkSize bytes. */
function isValidCipherLength(cipherLength: number, sealedChunkSize: number): boolean {
  if (cipherLength < TAG_LENGTH) return false;
  const rest = cipherLength % sealedChunkSize;
  return rest === 0 || rest >= TAG_LENGTH;
}

async function readExactly(
  handle: FileHandle,
  position: number,
  length: number,
  corrupt: (problem: string) => StateError,
): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  let filled = 0;
  while (filled < length) {
    const { bytesRead } = await handle.read(buffer, filled, length - filled, position + filled);
    if (bytesRead === 0) throw corrupt("the file shrank while it was being read");
    filled += bytesRead;
  }
  return buffer;
}

/**
 * readSpoolMeta plus a streaming SHA-256 of the cipher section against the trailer: catches damage
 * and truncation without the key (a deliberate forgery needs the key-holder to notice: home's opener).
 */
export async function verifySpoolFile(path: string): Promise<SpoolMeta> {
  const meta = await readSpoolMeta(path);
  const hash = createHash("sha256");
  let length = 0;
  for await (const chunk of openSpoolCipherStream(path, meta)) {
    hash.update(chunk as Buffer);
    length += (chunk as Buffer).length;
  }
  if (length !== meta.cipherLength) {
    throw new StateError("STATE_CORRUPT", `${path}: the file changed while it was being verified`);
  }
  if (hash.digest("hex") !== meta.cipherSha256) {
    throw new StateError(
      "STATE_CORRUPT",
      `${path}: the SHA-256 of the sealed body does not match the trailer (the file is damaged)`,
    );
  }
  return meta;
}

/** The cipher section (the sealed chunks, as stored) as a byte stream, e.g. to send over the tunnel. */
export function openSpoolCipherStream(
  path: string,
  meta: Pick<SpoolMeta, "cipherOffset" | "cipherLength">,
): Readable {
  if (!Number.isSafeInteger(meta.cipherOffset) || !Number.isSafeInteger(meta.cipherLength)) {
    throw new RangeError("cipherOffset and cipherLength must be integers");
  }
  if (meta.cipherLength < TAG_LENGTH) throw new RangeError("a spool cipher section is at least 16 bytes");
  return createReadStream(path, { start: meta.cipherOffset, end: meta.cipherOffset + meta.cipherLength - 1 });
}
