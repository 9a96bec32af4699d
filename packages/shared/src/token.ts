// Pairing tokens: the one line `mxtunnel-edge pair` prints and `mxtunnel-home pair` takes.
// Layout (DESIGN.md "Pairing"), all integers big-endian, then `mxt1_` + base64url without padding:
//   version u8 | expiresAt u32 (unix seconds) | edgePublicKey 32 B | secret 32 B |
//   url length u16 | url UTF-8 | checksum 4 B (first 4 bytes of SHA-256 of everything before it)
// Error messages never quote the token: it carries the secret.
import { createHash, hkdfSync, randomBytes } from "node:crypto";
import { TokenError } from "./errors.js";

export const TOKEN_PREFIX = "mxt1_";
export const TOKEN_VERSION = 1;
const KEY_LENGTH = 32;
const SECRET_LENGTH = 32;
const CHECKSUM_LENGTH = 4;
const HEADER_LENGTH = 1 + 4 + KEY_LENGTH + SECRET_LENGTH + 2;
const MIN_LENGTH = HEADER_LENGTH + CHECKSUM_LENGTH;
const MAX_URL_BYTES = 2048;

export interface PairingToken {
  version: 1;
  expiresAt: Date;
  edgePublicKey: Uint8Array;
  secret: Uint8Array;
  /** The edge's tunnel base URL, ws:// or wss://. */
  url: string;
}

export function newTokenSecret(): Uint8Array {
  return new Uint8Array(randomBytes(SECRET_LENGTH));
}

/** Hex of the first 16 bytes of SHA-256("mxtunnel/1 token id" || secret): names a token without revealing it. */
export function tokenId(secret: Uint8Array): string {
  return createHash("sha256")
    .update("mxtunnel/1 token id")
    .update(secret)
    .digest()
    .subarray(0, 16)
    .toString("hex");
}

/** The IKpsk2 pre-shared key: HKDF-SHA256(ikm = secret, salt = edge public key, info = "mxtunnel/1 pair psk"). */
export function pairingPsk(secret: Uint8Array, edgePublicKey: Uint8Array): Uint8Array {
  return new Uint8Array(hkdfSync("sha256", secret, edgePublicKey, "mxtunnel/1 pair psk", 32));
}

export function encodePairingToken(token: PairingToken): string {
  if (token.edgePublicKey.length !== KEY_LENGTH) throw new RangeError("edgePublicKey must be 32 bytes");
  if (token.secret.length !== SECRET_LENGTH) throw new RangeError("secret must be 32 bytes");
  const expires = Math.floor(token.expiresAt.getTime() / 1000);
  if (!Number.isInteger(expires) || expires < 0 || expires > 0xffffffff) {
    throw new RangeError("expiresAt is outside the range a token can carry");
  }
  const urlProblem = checkUrl(token.url);
  if (urlProblem) throw new RangeError(urlProblem);
  const url = Buffer.from(token.url, "utf8");
  const body = Buffer.alloc(HEADER_LENGTH + url.length);
  let offset = body.writeUInt8(TOKEN_VERSION, 0);
  offset = body.writeUInt32BE(expires, offset);
  body.set(token.edgePublicKey, offset);
  offset += KEY_LENGTH;
  body.set(token.secret, offset);
  offset += SECRET_LENGTH;
  offset = body.writeUInt16BE(url.length, offset);
  url.copy(body, offset);
  return TOKEN_PREFIX + Buffer.concat([body, checksum(body)]).toString("base64url");
}

/**
 * Decodes a token as pasted by a person: surrounding whitespace and line breaks inside (mail or
 * terminal wrapping) are ignored. Checks run in the order that gives the most useful sentence:
 * shape, checksum (typos), version, layout, expiry.
 */
export function decodePairingToken(text: string, now: Date = new Date()): PairingToken {
  const compact = text.replace(/\s+/g, "");
  if (!compact.startsWith(TOKEN_PREFIX)) {
    const other = /^mxt(\d+)_/.exec(compact);
    if (other && Number(other[1]) > TOKEN_VERSION) {
      throw new TokenError(
        "TOKEN_VERSION",
        `The pairing token uses format mxt${other[1]}, which this mxtunnel does not understand; upgrade mxtunnel-home.`,
      );
    }
    throw new TokenError(
      "TOKEN_MALFORMED",
      `That is not an mxtunnel pairing token: a token starts with "${TOKEN_PREFIX}" (copy the last line printed by \`mxtunnel-edge pair\`).`,
    );
  }
  const encoded = compact.slice(TOKEN_PREFIX.length);
  if (!/^[A-Za-z0-9_-]*$/.test(encoded) || encoded.length % 4 === 1) {
    throw new TokenError(
      "TOKEN_MALFORMED",
      "The pairing token contains characters that cannot be part of a token; copy it again without quotes or punctuation.",
    );
  }
  const bytes = Buffer.from(encoded, "base64url");
  if (bytes.length < MIN_LENGTH) {
    throw new TokenError(
      "TOKEN_MALFORMED",
      "The pairing token is too short to be complete; it was probably cut off while copying.",
    );
  }
  const body = bytes.subarray(0, bytes.length - CHECKSUM_LENGTH);
  const expected = checksum(body);
  if (!expected.equals(bytes.subarray(bytes.length - CHECKSUM_LENGTH))) {
    throw new TokenError(
      "TOKEN_CHECKSUM",
      "The pairing token's checksum does not match: it was mistyped or cut short; copy it again.",
    );
  }
  const version = body.readUInt8(0);
  if (version > TOKEN_VERSION) {
    throw new TokenError(
      "TOKEN_VERSION",
      `The pairing token has version ${version} but this mxtunnel understands version ${TOKEN_VERSION}; upgrade mxtunnel-home.`,
    );
  }
  if (version !== TOKEN_VERSION) {
    throw new TokenError("TOKEN_MALFORMED", `The pairing token has an invalid version number (${version}).`);
  }
  let offset = 1;
  const expiresAt = new Date(body.readUInt32BE(offset) * 1000);
  offset += 4;
  const edgePublicKey = new Uint8Array(body.subarray(offset, offset + KEY_LENGTH));
  offset += KEY_LENGTH;
  const secret = new Uint8Array(body.subarray(offset, offset + SECRET_LENGTH));
  offset += SECRET_LENGTH;
  const urlLength = body.readUInt16BE(offset);
  offset += 2;
  if (offset + urlLength !== body.length) {
    throw new TokenError(
      "TOKEN_MALFORMED",
      "The pairing token's length fields are inconsistent; it was not made by mxtunnel-edge.",
    );
  }
  const url = body.subarray(offset).toString("utf8");
  const urlProblem = checkUrl(url);
  if (urlProblem) throw new TokenError("TOKEN_MALFORMED", `The pairing token is unusable: ${urlProblem}.`);
  if (now.getTime() >= expiresAt.getTime()) {
    throw new TokenError(
      "TOKEN_EXPIRED",
      `The pairing token expired at ${expiresAt.toISOString()}; make a new one with \`mxtunnel-edge pair\`.`,
    );
  }
  return { version: TOKEN_VERSION, expiresAt, edgePublicKey, secret, url };
}

function checksum(body: Uint8Array): Buffer {
  return createHash("sha256").update(body).digest().subarray(0, CHECKSUM_LENGTH);
}

function checkUrl(url: string): string | undefined {
  if (Buffer.byteLength(url, "utf8") > MAX_URL_BYTES) return `its URL is longer than ${MAX_URL_BYTES} bytes`;
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return "its edge URL is not a valid URL";
  }
  if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") return "its edge URL is not ws:// or wss://";
  return undefined;
}
