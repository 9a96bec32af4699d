// Static key files: an X25519 key pair as JSON, mode 0600, written once and never overwritten, and
// the short fingerprint operators see in logs and `status` output.
import { createHash, createPrivateKey, createPublicKey } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { parseJsonText, writeFileAtomic } from "./atomic-file.js";
import { ConfigError, StateError } from "./errors.js";

const KEY_LENGTH = 32;

export interface StoredKeyPair {
  /** Raw X25519 public key, 32 bytes. */
  publicKey: Uint8Array;
  /** Raw X25519 private key, 32 bytes. */
  privateKey: Uint8Array;
}

interface KeyFile {
  type: "x25519";
  label: string;
  publicKey: string;
  privateKey: string;
}

/**
 * Writes a new key file (mode 0600, atomically). Refuses to replace an existing file: losing a static
 * key breaks every pairing made with it. The refusal is a StateError STATE_EXISTS.
 */
export async function saveKeyPair(path: string, keyPair: StoredKeyPair, label: string): Promise<void> {
  checkLength(keyPair.publicKey, "publicKey");
  checkLength(keyPair.privateKey, "privateKey");
  const file: KeyFile = {
    type: "x25519",
    label,
    publicKey: encodeKey(keyPair.publicKey),
    privateKey: encodeKey(keyPair.privateKey),
  };
  try {
    await writeFileAtomic(path, `${JSON.stringify(file, null, 2)}\n`, { mode: 0o600, exclusive: true });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    throw new StateError(
      "STATE_EXISTS",
      `Refusing to overwrite the existing key file ${path}; move it away first if you mean to replace it.`,
    );
  }
}

/**
 * Reads a key file written by saveKeyPair. A missing file is StateError STATE_MISSING; a file that
 * group or others can read, or whose content is not a consistent X25519 pair, is a ConfigError whose
 * message says how to fix it.
 */
export async function loadKeyPair(path: string): Promise<StoredKeyPair> {
  let text: string;
  let mode: number;
  try {
    mode = (await stat(path)).mode;
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      throw new StateError("STATE_MISSING", `There is no key file at ${path}; run \`init\` first.`);
    }
    throw error;
  }
  if ((mode & 0o077) !== 0) {
    const octal = (mode & 0o777).toString(8).padStart(4, "0");
    throw keyFileError(
      path,
      `it is readable by other users (mode ${octal}), so the private key may have leaked; run \`chmod 600 ${path}\``,
    );
  }
  let parsed: unknown;
  try {
    parsed = parseJsonText(text, path);
  } catch (error) {
    throw keyFileError(path, (error as Error).message.replace(`${path}: `, ""));
  }
  if (typeof parsed !== "object" || parsed === null || (parsed as Partial<KeyFile>).type !== "x25519") {
    throw keyFileError(path, 'it is not an mxtunnel key file (expected "type": "x25519")');
  }
  const file = parsed as Partial<KeyFile>;
  let publicKey: Uint8Array;
  let privateKey: Uint8Array;
  try {
    publicKey = decodeKey(String(file.publicKey ?? ""), "publicKey");
    privateKey = decodeKey(String(file.privateKey ?? ""), "privateKey");
  } catch (error) {
    throw keyFileError(path, (error as ConfigError).problems?.join("; ") ?? String(error));
  }
  if (!Buffer.from(x25519PublicKey(privateKey)).equals(Buffer.from(publicKey))) {
    throw keyFileError(path, "its publicKey does not belong to its privateKey");
  }
  return { publicKey, privateKey };
}

/** "SHA256:" + the first 16 base64url characters of SHA-256(publicKey): short, stable, printable. */
export function keyFingerprint(publicKey: Uint8Array): string {
  return `SHA256:${createHash("sha256").update(publicKey).digest("base64url").slice(0, 16)}`;
}

/** base64url without padding. */
export function encodeKey(key: Uint8Array): string {
  return Buffer.from(key).toString("base64url");
}

/** Decodes a base64url 32-byte key; `what` names it in the ConfigError (e.g. "peers[2].publicKey"). */
export function decodeKey(text: string, what: string): Uint8Array {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]{43}$/.test(text)) {
    throw new ConfigError([`${what}: expected a 32-byte key in base64url (43 characters)`]);
  }
  const bytes = Buffer.from(text, "base64url");
  // 43 characters carry 258 bits; the last 2 must be zero for the text to be canonical
  if (bytes.length !== KEY_LENGTH || encodeKey(bytes) !== text) {
    throw new ConfigError([`${what}: expected a 32-byte key in base64url (43 characters)`]);
  }
  return new Uint8Array(bytes);
}

/** The X25519 public key of a raw private key, via node:crypto. */
export function x25519PublicKey(privateKey: Uint8Array): Uint8Array {
  checkLength(privateKey, "privateKey");
  const pkcs8 = Buffer.concat([Buffer.from("302e020100300506032b656e04220420", "hex"), privateKey]);
  const spki = createPublicKey(createPrivateKey({ key: pkcs8, format: "der", type: "pkcs8" })).export({
    format: "der",
    type: "spki",
  });
  return new Uint8Array(spki.subarray(spki.length - KEY_LENGTH));
}

function checkLength(key: Uint8Array, what: string): void {
  if (!(key instanceof Uint8Array) || key.length !== KEY_LENGTH)
    throw new RangeError(`${what} must be 32 bytes`);
}

function keyFileError(path: string, problem: string): ConfigError {
  return new ConfigError([`${path}: ${problem}`], `The key file ${path} is unusable: ${problem}.`);
}
