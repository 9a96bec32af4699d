import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { TokenError } from "../src/errors.js";
import {
  decodePairingToken,
  encodePairingToken,
  newTokenSecret,
  type PairingToken,
  pairingPsk,
  tokenId,
} from "../src/token.js";

const now = new Date("2030-01-01T00:00:00Z");
const edgePublicKey = new Uint8Array(32).map((_, i) => i + 1);
const secret = new Uint8Array(32).map((_, i) => 0xa0 + i);

function sample(overrides: Partial<PairingToken> = {}): PairingToken {
  return {
    version: 1,
    expiresAt: new Date("2030-01-01T01:00:00Z"),
    edgePublicKey,
    secret,
    url: "ws://mx.example.net:8443",
    ...overrides,
  };
}

/** Re-encodes raw token bytes with a valid checksum, to build tokens this version would not make. */
function withChecksum(body: Buffer): string {
  const sum = createHash("sha256").update(body).digest().subarray(0, 4);
  return "mxt1_" + Buffer.concat([body, sum]).toString("base64url");
}

function rawBody(token: string): Buffer {
  const bytes = Buffer.from(token.slice(5), "base64url");
  return Buffer.from(bytes.subarray(0, bytes.length - 4));
}

function errorOf(fn: () => unknown): TokenError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(TokenError);
    return error as TokenError;
  }
  throw new Error("expected a TokenError");
}

function expectNoSecret(error: Error, token: string): void {
  const hex = Buffer.from(secret).toString("hex");
  const b64 = Buffer.from(secret).toString("base64url");
  for (const leak of [token.slice(5, 40), hex, b64, hex.slice(0, 16)]) {
    expect(error.message).not.toContain(leak);
  }
}

describe("pairing token", () => {
  it("round-trips every field", () => {
    const text = encodePairingToken(sample({ url: "wss://edge.example.net/mx" }));
    expect(text).toMatch(/^mxt1_[A-Za-z0-9_-]+$/);
    const decoded = decodePairingToken(text, now);
    expect(decoded).toEqual(sample({ url: "wss://edge.example.net/mx" }));
  });

  it("has the documented byte layout", () => {
    const body = rawBody(encodePairingToken(sample()));
    expect(body[0]).toBe(1);
    expect(body.readUInt32BE(1)).toBe(Date.parse("2030-01-01T01:00:00Z") / 1000);
    expect([...body.subarray(5, 37)]).toEqual([...edgePublicKey]);
    expect([...body.subarray(37, 69)]).toEqual([...secret]);
    expect(body.readUInt16BE(69)).toBe("ws://mx.example.net:8443".length);
    expect(body.subarray(71).toString()).toBe("ws://mx.example.net:8443");
  });

  it("tolerates surrounding whitespace and wrapped lines", () => {
    const text = encodePairingToken(sample());
    const wrapped = `  ${text.slice(0, 30)}\n${text.slice(30, 70)}\r\n  ${text.slice(70)}\n\n`;
    expect(decodePairingToken(wrapped, now)).toEqual(sample());
  });

  it("reports a flipped character as a checksum error", () => {
    const text = encodePairingToken(sample());
    const position = 40;
    const flipped = text.slice(0, position) + (text[position] === "A" ? "B" : "A") + text.slice(position + 1);
    const error = errorOf(() => decodePairingToken(flipped, now));
    expect(error.code).toBe("TOKEN_CHECKSUM");
    expectNoSecret(error, text);
  });

  it("reports a token cut short", () => {
    const text = encodePairingToken(sample());
    expect(errorOf(() => decodePairingToken(text.slice(0, 60), now)).code).toBe("TOKEN_MALFORMED");
    // long enough to parse, but the checksum no longer sits at the end
    expect(errorOf(() => decodePairingToken(text.slice(0, -6), now)).code).toBe("TOKEN_CHECKSUM");
  });

  it("refuses other text", () => {
    const text = encodePairingToken(sample());
    for (const bad of [
      "",
      "hello",
      "mxt0_abc",
      text.replace("mxt1_", "mxt_"),
      text.replace("mxt1_", "MXT1_"),
    ]) {
      expect(errorOf(() => decodePairingToken(bad, now)).code).toBe("TOKEN_MALFORMED");
    }
    expect(errorOf(() => decodePairingToken(`${text.slice(0, 20)}+${text.slice(21)}`, now)).code).toBe(
      "TOKEN_MALFORMED",
    );
    expect(errorOf(() => decodePairingToken(`"${text}"`, now)).code).toBe("TOKEN_MALFORMED");
  });

  it("refuses inconsistent lengths and non-websocket URLs even with a valid checksum", () => {
    const body = rawBody(encodePairingToken(sample()));
    const longer = Buffer.concat([body, Buffer.from("x")]);
    expect(errorOf(() => decodePairingToken(withChecksum(longer), now)).code).toBe("TOKEN_MALFORMED");
    const http = rawBody(encodePairingToken(sample({ url: "ws://mx.example.net:8443" })));
    http.write("http://mx.example.net:84", 71); // same length as the original URL
    const error = errorOf(() => decodePairingToken(withChecksum(http), now));
    expect(error.code).toBe("TOKEN_MALFORMED");
    expect(error.message).toMatch(/ws:\/\/ or wss:\/\//);
  });

  it("reports a newer version", () => {
    const body = rawBody(encodePairingToken(sample()));
    body[0] = 2;
    const text = withChecksum(body);
    const error = errorOf(() => decodePairingToken(text, now));
    expect(error.code).toBe("TOKEN_VERSION");
    expect(error.message).toMatch(/upgrade/);
    expectNoSecret(error, text);
    expect(errorOf(() => decodePairingToken("mxt2_AAAA", now)).code).toBe("TOKEN_VERSION");
  });

  it("reports expiry with the time, never the secret", () => {
    const text = encodePairingToken(sample());
    const error = errorOf(() => decodePairingToken(text, new Date("2030-01-01T01:00:00Z")));
    expect(error.code).toBe("TOKEN_EXPIRED");
    expect(error.message).toContain("2030-01-01T01:00:00.000Z");
    expect(error.message).toContain("mxtunnel-edge pair");
    expectNoSecret(error, text);
    expect(decodePairingToken(text, new Date("2030-01-01T00:59:59Z")).url).toBe("ws://mx.example.net:8443");
  });

  it("refuses to encode what it could not decode", () => {
    expect(() => encodePairingToken(sample({ secret: new Uint8Array(31) }))).toThrow(RangeError);
    expect(() => encodePairingToken(sample({ edgePublicKey: new Uint8Array(33) }))).toThrow(RangeError);
    expect(() => encodePairingToken(sample({ url: "https://x" }))).toThrow(RangeError);
    expect(() => encodePairingToken(sample({ expiresAt: new Date(2 ** 33 * 1000) }))).toThrow(RangeError);
  });

  it("derives a stable token id and PSK", () => {
    const expectedId = createHash("sha256")
      .update(Buffer.concat([Buffer.from("mxtunnel/1 token id"), secret]))
      .digest("hex")
      .slice(0, 32);
    expect(tokenId(secret)).toBe(expectedId);
    expect(tokenId(secret)).toMatch(/^[0-9a-f]{32}$/);
    const psk = pairingPsk(secret, edgePublicKey);
    expect(psk).toBeInstanceOf(Uint8Array);
    expect(psk.length).toBe(32);
    expect(Buffer.from(psk)).toEqual(Buffer.from(pairingPsk(secret, edgePublicKey)));
    expect(Buffer.from(psk)).not.toEqual(Buffer.from(pairingPsk(secret, new Uint8Array(32))));
  });

  it("matches an RFC 5869-style HKDF computed independently", async () => {
    const { createHmac } = await import("node:crypto");
    const prk = createHmac("sha256", edgePublicKey).update(secret).digest();
    const okm = createHmac("sha256", prk)
      .update(Buffer.concat([Buffer.from("mxtunnel/1 pair psk"), Buffer.from([1])]))
      .digest();
    expect(Buffer.from(pairingPsk(secret, edgePublicKey))).toEqual(okm);
  });

  it("makes fresh 32-byte secrets", () => {
    const a = newTokenSecret();
    expect(a.length).toBe(32);
    expect(Buffer.from(a)).not.toEqual(Buffer.from(newTokenSecret()));
  });
});
