import { createHash, hkdfSync, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import * as fs from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import nacl from "tweetnacl";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { CryptoError, StateError } from "../src/errors.js";
import { keyFingerprint } from "../src/keys.js";
import {
  EphemeralKeyPool,
  openSpoolCipherStream,
  parseSpoolHeader,
  readSpoolMeta,
  SPOOL_CHUNK_SIZE,
  SpoolFileWriter,
  type SpoolHeader,
  SpoolOpener,
  SpoolSealer,
  type SpoolSealerOptions,
  verifySpoolFile,
} from "../src/spool-file.js";

const CHUNK = SPOOL_CHUNK_SIZE;
const SEALED = CHUNK + 16;
const ODD_SLICES = [1, 7, 4093, 65535, 13, 65537, 100_003];

interface TestKeys {
  publicKey: Uint8Array;
  privateKey: Uint8Array;
}

function spoolKeys(): TestKeys {
  const pair = nacl.box.keyPair();
  return { publicKey: pair.publicKey, privateKey: pair.secretKey };
}

const HOME = spoolKeys();

function sealerOptions(overrides: Partial<SpoolSealerOptions> = {}): SpoolSealerOptions {
  return {
    spoolPublicKey: HOME.publicKey,
    id: `m${randomBytes(6).toString("hex")}`,
    receivedAt: new Date("2025-03-04T05:06:07.089Z"),
    envelope: {
      mailFrom: "alice@example.net",
      mailParams: { BODY: "8BITMIME", SMTPUTF8: "" },
      rcptTo: [
        { address: "bob@example.org", params: { NOTIFY: "FAILURE" } },
        { address: "carol@example.org", params: {} },
      ],
    },
    client: { address: "203.0.113.7", port: 40123, helo: "mx.example.net", tls: true },
    extra: { spf: "pass", dkim: [{ domain: "example.net", result: "pass" }] },
    ...overrides,
  };
}

/** Feeds `data` to `sink` in slices whose sizes cycle through `sizes`. */
function inSlices<T>(data: Uint8Array, sizes: readonly number[], sink: (slice: Uint8Array) => T): T[] {
  const results: T[] = [];
  let offset = 0;
  for (let i = 0; offset < data.length; i++) {
    const size = sizes[i % sizes.length] as number;
    results.push(sink(data.subarray(offset, offset + size)));
    offset += size;
  }
  return results;
}

function seal(plaintext: Uint8Array, options: SpoolSealerOptions = sealerOptions(), sizes = ODD_SLICES) {
  const sealer = new SpoolSealer(options);
  const chunks = inSlices(plaintext, sizes, (slice) => sealer.update(slice)).flat();
  chunks.push(sealer.final());
  return { sealer, header: sealer.header, chunks, cipher: Buffer.concat(chunks) };
}

/** Everything the opener released, and the error it threw (if any). */
function openAll(header: SpoolHeader, cipher: Uint8Array, keys: TestKeys = HOME, sizes = [SEALED + 3, 5]) {
  const released: Buffer[] = [];
  let error: unknown;
  try {
    const opener = new SpoolOpener(header, keys);
    inSlices(cipher, sizes, (slice) => released.push(opener.update(slice)));
    released.push(opener.final());
  } catch (caught) {
    error = caught;
  }
  return { plaintext: Buffer.concat(released), error };
}

function chunksOf(cipher: Buffer): Buffer[] {
  const chunks: Buffer[] = [];
  for (let offset = 0; offset < cipher.length; offset += SEALED) {
    chunks.push(cipher.subarray(offset, offset + SEALED));
  }
  return chunks;
}

/** The body key and nonces as the spec states them, computed without the module under test. */
function specKey(headerBytes: Uint8Array, header: SpoolHeader, keys: TestKeys = HOME): Uint8Array {
  const shared = nacl.box.before(Buffer.from(header.ephemeralPublicKey, "base64url"), keys.privateKey);
  const salt = createHash("sha256").update(headerBytes).digest();
  return new Uint8Array(hkdfSync("sha256", shared, salt, "mxtunnel/1 spool body", 32));
}

function specNonce(header: SpoolHeader, counter: number, final: boolean): Uint8Array {
  const tail = counter.toString(16).padStart(14, "0") + (final ? "01" : "00");
  return Buffer.concat([Buffer.from(header.noncePrefix, "base64url"), Buffer.from(tail, "hex")]);
}

function expectCode(error: unknown, type: typeof CryptoError | typeof StateError, code: string): void {
  expect(error).toBeInstanceOf(type);
  expect((error as CryptoError).code).toBe(code);
}

let dir: string;
let tmpDir: string;

beforeEach(async () => {
  dir = await fs.mkdtemp(join(tmpdir(), "mxtunnel-spool-"));
  tmpDir = join(dir, "tmp");
  await fs.mkdir(tmpDir);
});

afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

async function writeSpool(plaintext: Uint8Array, options = sealerOptions()) {
  const sealer = new SpoolSealer(options);
  const writer = await SpoolFileWriter.create(dir, sealer, { tmpDir });
  for (const slice of inSlices(plaintext, ODD_SLICES, (s) => s)) await writer.write(slice);
  const committed = await writer.commit();
  return { sealer, committed, bytes: await fs.readFile(committed.path) };
}

async function rewrite(path: string, mutate: (bytes: Buffer) => Buffer): Promise<void> {
  await fs.writeFile(path, mutate(await fs.readFile(path)));
}

/** A file with a valid trailer around `cipher`: what a careful forger, not bit rot, would produce. */
function withTrailer(preamble: Buffer, cipher: Buffer): Buffer {
  const trailer = Buffer.alloc(48);
  trailer.write("MXSPEND1", 0, "ascii");
  trailer.writeBigUInt64BE(BigInt(cipher.length), 8);
  createHash("sha256").update(cipher).digest().copy(trailer, 16);
  return Buffer.concat([preamble, cipher, trailer]);
}

describe("SpoolSealer and SpoolOpener", () => {
  it.each([
    ["empty", 0],
    ["one byte", 1],
    ["chunk - 1", CHUNK - 1],
    ["one chunk", CHUNK],
    ["chunk + 1", CHUNK + 1],
    ["3 chunks + 5", 3 * CHUNK + 5],
  ])("round-trips a %s body (%i bytes) fed in odd slices", (_name, size) => {
    const plaintext = randomBytes(size);
    const { sealer, chunks, cipher, header } = seal(plaintext);
    expect(sealer.plaintextLength).toBe(size);
    expect(chunks.length).toBe(Math.max(1, Math.ceil(size / CHUNK)));
    expect(cipher.length).toBe(size + 16 * chunks.length);
    for (const sizes of [[1], [SEALED], [SEALED + 1, 3], [cipher.length]]) {
      const { plaintext: opened, error } = openAll(header, cipher, HOME, sizes);
      expect(error).toBeUndefined();
      expect(opened.equals(plaintext)).toBe(true);
    }
  });

  it("follows the spec: HKDF key bound to the header bytes, prefix ‖ u56 counter ‖ final-flag nonces", () => {
    const plaintext = randomBytes(2 * CHUNK + 10);
    const { sealer, chunks, header } = seal(plaintext);
    expect(sealer.preamble.subarray(0, 8).toString("ascii")).toBe("MXSPOOL1");
    const headerBytes = sealer.preamble.subarray(12);
    expect(sealer.preamble.readUInt32BE(8)).toBe(headerBytes.length);
    expect(JSON.parse(headerBytes.toString("utf8"))).toEqual(header);
    expect(header.spoolKeyId).toBe(keyFingerprint(HOME.publicKey));
    expect(header.chunkSize).toBe(65536);
    expect(Buffer.from(header.noncePrefix, "base64url")).toHaveLength(16);
    expect(specNonce(header, 0x0102030405, true).subarray(16)).toEqual(
      Buffer.from("00000102030405" + "01", "hex"),
    );
    const key = specKey(headerBytes, header);
    const opened = chunks.map((chunk, i) =>
      nacl.secretbox.open(chunk, specNonce(header, i, i === chunks.length - 1), key),
    );
    expect(opened.every((p) => p !== null)).toBe(true);
    expect(Buffer.concat(opened as Uint8Array[]).equals(plaintext)).toBe(true);
    // the final flag matters: the last chunk does not open as a non-final one
    expect(nacl.secretbox.open(chunks[2] as Buffer, specNonce(header, 2, false), key)).toBeNull();
  });

  it("derives the body key exactly as tweetnacl's box.before did, for any spool key (both directions)", () => {
    for (let i = 0; i < 16; i++) {
      const keys = spoolKeys();
      const plaintext = randomBytes(100 + i);
      // Sealed here (X25519 in node:crypto), opened with tweetnacl's box.before as the oracle.
      const { sealer, chunks, header } = seal(plaintext, sealerOptions({ spoolPublicKey: keys.publicKey }));
      const key = specKey(sealer.preamble.subarray(12), header, keys);
      const opened = nacl.secretbox.open(chunks[0] as Buffer, specNonce(header, 0, true), key);
      expect(opened && Buffer.from(opened).equals(plaintext)).toBe(true);
      // And the other way: opened here with the key pair as tweetnacl made it.
      const reopened = openAll(header, Buffer.concat(chunks), keys);
      expect(reopened.error).toBeUndefined();
      expect(reopened.plaintext.equals(plaintext)).toBe(true);
    }
  });

  it("opens a file sealed before X25519 moved to node:crypto (tweetnacl fixture)", async () => {
    const fixture = JSON.parse(
      readFileSync(new URL("./fixtures/spool-file-tweetnacl.json", import.meta.url), "utf8"),
    ) as { spoolPrivateKey: string; spoolPublicKey: string; plaintext: string; file: string };
    const keys = {
      privateKey: new Uint8Array(Buffer.from(fixture.spoolPrivateKey, "hex")),
      publicKey: new Uint8Array(Buffer.from(fixture.spoolPublicKey, "hex")),
    };
    const path = join(dir, "fixture-tweetnacl-1.spool");
    await fs.writeFile(path, Buffer.from(fixture.file, "base64"));
    const meta = await verifySpoolFile(path);
    const opener = new SpoolOpener(meta.header, keys);
    const released: Buffer[] = [];
    for await (const piece of openSpoolCipherStream(path, meta)) released.push(opener.update(piece));
    released.push(opener.final());
    expect(Buffer.concat(released).toString("utf8")).toBe(fixture.plaintext);
  });

  it("uses a fresh ephemeral key and nonce prefix for every file", () => {
    const a = seal(Buffer.from("same"), sealerOptions({ id: "same-id" }));
    const b = seal(Buffer.from("same"), sealerOptions({ id: "same-id" }));
    expect(a.header.ephemeralPublicKey).not.toBe(b.header.ephemeralPublicKey);
    expect(a.header.noncePrefix).not.toBe(b.header.noncePrefix);
    expect(a.cipher.equals(b.cipher)).toBe(false);
  });

  it("with an EphemeralKeyPool, files share the ephemeral key but each has its own body key", () => {
    const pool = new EphemeralKeyPool();
    const a = seal(Buffer.from("same"), sealerOptions({ id: "pooled-a", ephemeralKeys: pool }));
    const b = seal(Buffer.from("same"), sealerOptions({ id: "pooled-b", ephemeralKeys: pool }));
    expect(a.header.ephemeralPublicKey).toBe(b.header.ephemeralPublicKey);
    expect(a.header.noncePrefix).not.toBe(b.header.noncePrefix);
    expect(a.cipher.equals(b.cipher)).toBe(false);
    // Each file opens with the home key alone, and only with its own header.
    expect(openAll(a.header, a.cipher).plaintext.toString()).toBe("same");
    expect(openAll(b.header, b.cipher).plaintext.toString()).toBe("same");
    expect(openAll(b.header, a.cipher).error).toBeInstanceOf(CryptoError);
    pool.clear();
  });

  it("an EphemeralKeyPool draws a new key after maxUses files, after maxAgeMs, and per spool key", () => {
    let now = 1_000;
    const pool = new EphemeralKeyPool({ maxUses: 2, maxAgeMs: 500, now: () => now });
    const key = () => new SpoolSealer(sealerOptions({ ephemeralKeys: pool })).header.ephemeralPublicKey;
    const first = key();
    expect(key()).toBe(first);
    const second = key(); // the third file: maxUses is 2
    expect(second).not.toBe(first);
    now += 500; // the window has ended
    const third = key();
    expect(third).not.toBe(second);
    const other = spoolKeys();
    const elsewhere = new SpoolSealer(
      sealerOptions({ spoolPublicKey: other.publicKey, ephemeralKeys: pool }),
    );
    expect(elsewhere.header.ephemeralPublicKey).not.toBe(third);
    expect(key()).toBe(third);
    pool.clear();
    expect(key()).not.toBe(third);
    pool.clear();
  });

  it("an EphemeralKeyPool refuses limits that would not bound sharing", () => {
    expect(() => new EphemeralKeyPool({ maxUses: 0 })).toThrow(/maxUses/);
    expect(() => new EphemeralKeyPool({ maxUses: 1.5 })).toThrow(/maxUses/);
    expect(() => new EphemeralKeyPool({ maxAgeMs: Number.POSITIVE_INFINITY })).toThrow(/maxAgeMs/);
    expect(() => new EphemeralKeyPool({ maxAgeMs: -1 })).toThrow(/maxAgeMs/);
  });

  it("holds back a full chunk until more data or final() shows whether it is the last", () => {
    const plaintext = randomBytes(CHUNK + 1);
    const { header, cipher } = seal(plaintext);
    const opener = new SpoolOpener(header, HOME);
    expect(opener.update(cipher.subarray(0, SEALED))).toHaveLength(0);
    const first = opener.update(cipher.subarray(SEALED, SEALED + 1));
    expect(first.equals(plaintext.subarray(0, CHUNK))).toBe(true);
    expect(opener.update(cipher.subarray(SEALED + 1))).toHaveLength(0);
    expect(opener.final().equals(plaintext.subarray(CHUNK))).toBe(true);
    expect(() => opener.update(Buffer.alloc(1))).toThrow(/finished/);
  });

  it("refuses to open with a different spool key, naming both keys", () => {
    const { header, cipher } = seal(Buffer.from("hello"));
    const other = spoolKeys();
    const { error } = openAll(header, cipher, other);
    expectCode(error, CryptoError, "DECRYPT_FAILED");
    expect((error as Error).message).toContain(header.spoolKeyId);
    expect((error as Error).message).toContain(keyFingerprint(other.publicKey));
    // a header relabelled for the other key still cannot be opened with it
    const relabelled = { ...header, spoolKeyId: keyFingerprint(other.publicKey) };
    const forged = openAll(relabelled, cipher, other);
    expectCode(forged.error, CryptoError, "DECRYPT_FAILED");
    expect(forged.plaintext).toHaveLength(0);
  });

  it("binds every header field into the body key", () => {
    const plaintext = randomBytes(CHUNK + 100);
    const { header, cipher } = seal(plaintext);
    const tampered: SpoolHeader[] = [
      { ...header, envelope: { ...header.envelope, rcptTo: [{ address: "eve@example.org", params: {} }] } },
      { ...header, envelope: { ...header.envelope, mailFrom: "mallory@example.net" } },
      { ...header, client: { ...header.client, address: "198.51.100.1" } },
      { ...header, receivedAt: "2025-03-04T05:06:08.089Z" },
      { ...header, extra: { spf: "pass", dkim: [] } },
      { ...header, id: "another-id" },
    ];
    for (const changed of tampered) {
      const { plaintext: released, error } = openAll(changed, cipher);
      expectCode(error, CryptoError, "DECRYPT_FAILED");
      expect(released).toHaveLength(0);
    }
  });

  it("authenticates each chunk before releasing it: a flipped byte anywhere fails at that chunk", () => {
    const plaintext = randomBytes(3 * CHUNK + 5);
    const { header, cipher } = seal(plaintext);
    for (const position of [
      0,
      100,
      SEALED - 1,
      SEALED + 7,
      2 * SEALED + 500,
      3 * SEALED + 3,
      cipher.length - 1,
    ]) {
      const damaged = Buffer.from(cipher);
      damaged[position] = (damaged[position] as number) ^ 0x01;
      const { plaintext: released, error } = openAll(header, damaged, HOME, [1000]);
      expectCode(error, CryptoError, "DECRYPT_FAILED");
      const chunk = Math.floor(position / SEALED);
      expect((error as Error).message).toContain(`chunk ${chunk} failed`);
      expect(released.equals(plaintext.subarray(0, chunk * CHUNK))).toBe(true);
    }
  });

  it("fails when the final chunk is missing or cut short", () => {
    const plaintext = randomBytes(2 * CHUNK + 9);
    const { header, cipher } = seal(plaintext);
    const noFinal = openAll(header, cipher.subarray(0, 2 * SEALED));
    expectCode(noFinal.error, CryptoError, "DECRYPT_FAILED");
    expect(noFinal.plaintext.equals(plaintext.subarray(0, CHUNK))).toBe(true);
    const cutShort = openAll(header, cipher.subarray(0, cipher.length - 1));
    expectCode(cutShort.error, CryptoError, "DECRYPT_FAILED");
    const tiny = openAll(header, cipher.subarray(0, 2 * SEALED + 15));
    expectCode(tiny.error, CryptoError, "DECRYPT_FAILED");
    expect((tiny.error as Error).message).toMatch(/without its final chunk/);
    const nothing = openAll(header, Buffer.alloc(0));
    expectCode(nothing.error, CryptoError, "DECRYPT_FAILED");
  });

  it("fails on data after the final chunk, even an authentic chunk sealed with the right key", () => {
    const plaintext = randomBytes(CHUNK + 20);
    const { sealer, header, cipher, chunks } = seal(plaintext);
    const key = specKey(sealer.preamble.subarray(12), header);
    const authentic = nacl.secretbox(
      Buffer.from("P.S. wire money"),
      specNonce(header, chunks.length, true),
      key,
    );
    for (const extra of [Buffer.from(authentic), chunks[0] as Buffer, Buffer.from([0])]) {
      const { plaintext: released, error } = openAll(header, Buffer.concat([cipher, extra]));
      expectCode(error, CryptoError, "DECRYPT_FAILED");
      expect(released.equals(plaintext.subarray(0, CHUNK))).toBe(true);
    }
  });

  it("fails on reordered or dropped chunks", () => {
    const plaintext = randomBytes(3 * CHUNK + 5);
    const { header, cipher } = seal(plaintext);
    const [c0, c1, c2, c3] = chunksOf(cipher) as [Buffer, Buffer, Buffer, Buffer];
    for (const order of [
      [c1, c0, c2, c3],
      [c0, c2, c1, c3],
      [c0, c1, c3],
      [c0, c0, c1, c2, c3],
    ]) {
      const { plaintext: released, error } = openAll(header, Buffer.concat(order));
      expectCode(error, CryptoError, "DECRYPT_FAILED");
      expect(plaintext.subarray(0, released.length).equals(released)).toBe(true);
      expect(released.length).toBeLessThan(plaintext.length);
    }
  });

  it("stays failed after a failure and wipes its key", () => {
    const { header, cipher } = seal(randomBytes(10));
    const damaged = Buffer.from(cipher);
    damaged[0] = (damaged[0] as number) ^ 0xff;
    const opener = new SpoolOpener(header, HOME);
    opener.update(damaged);
    expect(() => opener.final()).toThrow(CryptoError);
    expect(() => opener.update(Buffer.alloc(1))).toThrow(CryptoError);
    expect(() => opener.final()).toThrow(CryptoError);
  });

  it("seals 20 MB in 64 KiB slices holding at most one chunk back (and reports MB/s)", () => {
    const total = 20 * 1024 * 1024;
    const slice = randomBytes(CHUNK);
    const sealer = new SpoolSealer(sealerOptions());
    const sealed: Buffer[] = [];
    let sealedPlaintext = 0;
    const sealStart = performance.now();
    for (let fed = 0; fed < total; fed += CHUNK) {
      const out = sealer.update(slice);
      expect(out.length).toBeLessThanOrEqual(1);
      for (const chunk of out) expect(chunk.length).toBe(SEALED);
      sealedPlaintext += out.length * CHUNK;
      // what the sealer holds back is never more than one chunk of plaintext
      expect(sealer.plaintextLength - sealedPlaintext).toBeLessThanOrEqual(CHUNK);
      sealed.push(...out);
    }
    sealed.push(sealer.final());
    const sealSeconds = (performance.now() - sealStart) / 1000;
    expect(sealed).toHaveLength(total / CHUNK);

    const opener = new SpoolOpener(sealer.header, HOME);
    let opened = 0;
    const openStart = performance.now();
    for (const chunk of sealed) {
      const out = opener.update(chunk);
      expect(out.length).toBeLessThanOrEqual(CHUNK);
      opened += out.length;
    }
    opened += opener.final().length;
    const openSeconds = (performance.now() - openStart) / 1000;
    expect(opened).toBe(total);
    const mb = total / 1e6;
    console.log(
      `spool-file (tweetnacl secretbox, 20 MiB): seal ${(mb / sealSeconds).toFixed(1)} MB/s, ` +
        `open ${(mb / openSeconds).toFixed(1)} MB/s`,
    );
  });

  it("refuses invalid inputs with a sentence naming the field", () => {
    expect(() => new SpoolSealer(sealerOptions({ id: "../etc/passwd" }))).toThrow(/id:/);
    expect(() => new SpoolSealer(sealerOptions({ receivedAt: new Date(Number.NaN) }))).toThrow(/receivedAt/);
    expect(
      () => new SpoolSealer(sealerOptions({ client: { address: "nope", port: 25, helo: "x", tls: false } })),
    ).toThrow(/client.address/);
    expect(() => new SpoolSealer(sealerOptions({ extra: { when: new Date() } }))).toThrow(/extra.when/);
    expect(() => new SpoolSealer(sealerOptions({ extra: { n: Number.NaN } }))).toThrow(/extra.n/);
    expect(() => new SpoolSealer(sealerOptions({ spoolPublicKey: new Uint8Array(31) }))).toThrow(RangeError);
    const many = Array.from({ length: 2000 }, (_, i) => ({ address: `user${i}@example.org`, params: {} }));
    expect(
      () => new SpoolSealer(sealerOptions({ envelope: { mailFrom: "", mailParams: {}, rcptTo: many } })),
    ).toThrow(/65536-byte limit/);
  });

  it("refuses a low-order spool public key", () => {
    let error: unknown;
    try {
      new SpoolSealer(sealerOptions({ spoolPublicKey: new Uint8Array(32) }));
    } catch (caught) {
      error = caught;
    }
    expectCode(error, CryptoError, "LOW_ORDER_KEY");
  });
});

describe("parseSpoolHeader", () => {
  const { header } = seal(Buffer.alloc(0));

  it("accepts a header and returns a frozen copy", () => {
    const parsed = parseSpoolHeader(JSON.parse(JSON.stringify(header)));
    expect(parsed).toEqual(header);
    expect(Object.isFrozen(parsed.envelope.rcptTo[0])).toBe(true);
  });

  it.each([
    ["an unknown field", { ...header, colour: "red" }, /header.colour: unknown field/],
    ["a newer version", { ...header, version: 2 }, /format 2 .* upgrade mxtunnel/],
    [
      "no recipients",
      { ...header, envelope: { ...header.envelope, rcptTo: [] } },
      /rcptTo: expected a non-empty/,
    ],
    ["a port out of range", { ...header, client: { ...header.client, port: 70000 } }, /client.port/],
    [
      "a boolean parameter",
      { ...header, envelope: { ...header.envelope, mailParams: { SMTPUTF8: true } } },
      /SMTPUTF8/,
    ],
    ["another chunk size", { ...header, chunkSize: 1024 }, /chunkSize/],
    ["a short nonce prefix", { ...header, noncePrefix: "AAAA" }, /noncePrefix/],
    [
      "a non-canonical key",
      { ...header, ephemeralPublicKey: `${header.ephemeralPublicKey.slice(0, 42)}B` },
      /ephemeral/,
    ],
    ["an unparseable time", { ...header, receivedAt: "yesterday" }, /receivedAt/],
    [
      "deep nesting",
      { ...header, extra: { a: JSON.parse(`${"[".repeat(40)}${"]".repeat(40)}`) } },
      /nested deeper/,
    ],
    ["not an object", [header], /header: expected an object/],
  ])("refuses %s with STATE_CORRUPT", (_name, json, message) => {
    let error: unknown;
    try {
      parseSpoolHeader(json);
    } catch (caught) {
      error = caught;
    }
    expectCode(error, StateError, "STATE_CORRUPT");
    expect((error as Error).message).toMatch(message);
  });
});

describe("SpoolFileWriter and the file", () => {
  it("writes a file that verifies and opens, mode 0600, with no temporary file left", async () => {
    const plaintext = randomBytes(3 * CHUNK + 5);
    const { sealer, committed, bytes } = await writeSpool(plaintext);
    expect(committed.path).toBe(join(dir, `${sealer.header.id}.spool`));
    expect((await fs.stat(committed.path)).mode & 0o777).toBe(0o600);
    expect(await fs.readdir(tmpDir)).toEqual([]);
    const meta = await verifySpoolFile(committed.path);
    expect(meta.header).toEqual(sealer.header);
    expect(meta).toMatchObject({
      cipherOffset: sealer.preamble.length,
      cipherLength: committed.cipherLength,
      cipherSha256: committed.cipherSha256,
      fileSize: bytes.length,
    });
    expect(bytes.subarray(0, sealer.preamble.length).equals(sealer.preamble)).toBe(true);
    const opener = new SpoolOpener(meta.header, HOME);
    const released: Buffer[] = [];
    for await (const piece of openSpoolCipherStream(committed.path, meta))
      released.push(opener.update(piece));
    released.push(opener.final());
    expect(Buffer.concat(released).equals(plaintext)).toBe(true);
  });

  it("concurrent commits share directory syncs and leave no file descriptor open", async () => {
    const before = (await fs.readdir("/proc/self/fd")).length;
    const written = await Promise.all(
      Array.from({ length: 40 }, (_, i) => writeSpool(Buffer.from(`message ${i}`))),
    );
    expect((await fs.readdir("/proc/self/fd")).length).toBe(before);
    expect(new Set(written.map((w) => w.committed.path)).size).toBe(40);
    for (const { committed } of written) await expect(verifySpoolFile(committed.path)).resolves.toBeDefined();
    expect(await fs.readdir(tmpDir)).toEqual([]);
  });

  it("writes an empty message as one empty final chunk", async () => {
    const { committed } = await writeSpool(Buffer.alloc(0));
    const meta = await verifySpoolFile(committed.path);
    expect(meta.cipherLength).toBe(16);
    expect(
      openAll(meta.header, (await fs.readFile(committed.path)).subarray(meta.cipherOffset, -48)).plaintext,
    ).toHaveLength(0);
  });

  it("keeps the body out of the file: no Subject line, no body text", async () => {
    const message = Buffer.from(
      "From: alice@example.net\r\nSubject: Quarterly merger plans\r\n\r\n" +
        "The password is correct-horse-battery-staple.\r\n".repeat(3000),
    );
    const { bytes } = await writeSpool(message);
    for (const secret of ["Subject", "Quarterly merger", "correct-horse", "password"]) {
      expect(bytes.includes(Buffer.from(secret))).toBe(false);
    }
  });

  it("detects a flipped byte anywhere in the cipher section without the key", async () => {
    const { committed, bytes } = await writeSpool(randomBytes(2 * CHUNK + 3));
    const meta = await readSpoolMeta(committed.path);
    for (const position of [meta.cipherOffset, meta.cipherOffset + SEALED + 1, bytes.length - 49]) {
      await rewrite(committed.path, () => {
        const damaged = Buffer.from(bytes);
        damaged[position] = (damaged[position] as number) ^ 0x80;
        return damaged;
      });
      await expect(verifySpoolFile(committed.path)).rejects.toMatchObject({ code: "STATE_CORRUPT" });
    }
  });

  it("refuses truncated files and data appended after the trailer", async () => {
    const { committed, bytes } = await writeSpool(randomBytes(2 * CHUNK + 3));
    for (const damaged of [
      bytes.subarray(0, bytes.length - 48 - 19), // final chunk and trailer lost
      bytes.subarray(0, bytes.length - 1),
      bytes.subarray(0, 40),
      Buffer.alloc(0),
      Buffer.concat([bytes, randomBytes(SEALED)]),
    ]) {
      await fs.writeFile(committed.path, damaged);
      await expect(verifySpoolFile(committed.path)).rejects.toMatchObject({ code: "STATE_CORRUPT" });
    }
  });

  it("a consistent trailer does not make a shortened or extended body openable", async () => {
    const plaintext = randomBytes(2 * CHUNK + 3);
    const { sealer, bytes } = await writeSpool(plaintext);
    const cipher = bytes.subarray(sealer.preamble.length, -48);
    const path = join(dir, "forged.spool");
    for (const body of [
      cipher.subarray(0, 2 * SEALED),
      Buffer.concat([cipher, cipher.subarray(0, SEALED)]),
    ]) {
      await fs.writeFile(path, withTrailer(sealer.preamble, body));
      const meta = await verifySpoolFile(path); // length + hash hold: only the key holder can tell
      const { error } = openAll(meta.header, body);
      expectCode(error, CryptoError, "DECRYPT_FAILED");
    }
  });

  it("a tampered recipient in the stored header still verifies but no longer opens", async () => {
    const { committed, bytes } = await writeSpool(randomBytes(100));
    const text = bytes.toString("latin1");
    expect(text).toContain("bob@example.org");
    await fs.writeFile(
      committed.path,
      Buffer.from(text.replace("bob@example.org", "eve@example.org"), "latin1"),
    );
    const meta = await verifySpoolFile(committed.path);
    expect(meta.header.envelope.rcptTo[0]?.address).toBe("eve@example.org");
    const { plaintext, error } = openAll(meta.header, bytes.subarray(meta.cipherOffset, -48));
    expectCode(error, CryptoError, "DECRYPT_FAILED");
    expect(plaintext).toHaveLength(0);
  });

  it("reads only consistent preambles: magic, version, header length, canonical form", async () => {
    const { sealer, committed, bytes } = await writeSpool(randomBytes(10));
    const headerEnd = sealer.preamble.length;
    const cases: [Buffer, RegExp][] = [
      [Buffer.concat([Buffer.from("MXSPOOL9"), bytes.subarray(8)]), /spool format "MXSPOOL9".*upgrade/],
      [Buffer.concat([Buffer.from("GARBAGE!"), bytes.subarray(8)]), /bad magic/],
      [
        (() => {
          const b = Buffer.from(bytes);
          b.writeUInt32BE(0x7fffffff, 8);
          return b;
        })(),
        /header length/,
      ],
      [
        (() => {
          // the same header re-serialised with spaces: valid JSON, but not the bytes the key is bound to
          const spaced = Buffer.from(JSON.stringify(sealer.header, null, 1));
          const length = Buffer.alloc(4);
          length.writeUInt32BE(spaced.length);
          return Buffer.concat([Buffer.from("MXSPOOL1"), length, spaced, bytes.subarray(headerEnd)]);
        })(),
        /canonical/,
      ],
      [
        (() => {
          const b = Buffer.from(bytes);
          b.writeBigUInt64BE(5n, b.length - 40);
          return b;
        })(),
        /trailer records 5/,
      ],
    ];
    for (const [damaged, message] of cases) {
      await fs.writeFile(committed.path, damaged);
      const error = await readSpoolMeta(committed.path).catch((caught: unknown) => caught);
      expectCode(error, StateError, "STATE_CORRUPT");
      expect((error as Error).message).toContain(committed.path);
      expect((error as Error).message).toMatch(message);
    }
  });

  it("refuses to replace an existing spool file with the same id", async () => {
    const options = sealerOptions({ id: "duplicate" });
    const first = await writeSpool(Buffer.from("first"), options);
    const sealer = new SpoolSealer(options);
    const writer = await SpoolFileWriter.create(dir, sealer, { tmpDir });
    await writer.write(Buffer.from("second"));
    await expect(writer.commit()).rejects.toMatchObject({ code: "STATE_EXISTS" });
    expect((await fs.readFile(first.committed.path)).equals(first.bytes)).toBe(true);
    expect(await fs.readdir(tmpDir)).toEqual([]);
  });

  it("abort() removes the temporary file, is idempotent, and blocks further writes", async () => {
    const writer = await SpoolFileWriter.create(dir, new SpoolSealer(sealerOptions()), { tmpDir });
    await writer.write(randomBytes(CHUNK * 2));
    expect(await fs.readdir(tmpDir)).toHaveLength(1);
    await writer.abort();
    await writer.abort();
    expect(await fs.readdir(tmpDir)).toEqual([]);
    await expect(writer.write(Buffer.from("x"))).rejects.toThrow(/aborted/);
    await expect(writer.commit()).rejects.toThrow(/aborted/);
  });
});

describe("SpoolFileWriter on a full disk", () => {
  function enospc(): NodeJS.ErrnoException {
    return Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC", errno: -28 });
  }

  /** An open() whose handles fail the (n+1)th write, or sync, the way a full disk does. */
  function fullDiskOpen(fail: { afterWrites: number } | "sync"): typeof fs.open {
    return async (...args: Parameters<typeof fs.open>) => {
      const handle = await fs.open(...args);
      let writes = 0;
      const write = handle.write.bind(handle) as (...a: unknown[]) => Promise<unknown>;
      handle.write = (async (...a: unknown[]) => {
        if (fail !== "sync" && writes++ >= fail.afterWrites) throw enospc();
        return write(...a);
      }) as typeof handle.write;
      if (fail === "sync") {
        handle.sync = async () => {
          throw enospc();
        };
      }
      return handle;
    };
  }

  async function expectNothingLeft(): Promise<void> {
    expect(await fs.readdir(tmpDir)).toEqual([]);
    expect((await fs.readdir(dir)).filter((name) => name !== "tmp")).toEqual([]);
  }

  it("a small message is written once, at commit: a disk that refuses it fails commit() and leaves nothing", async () => {
    const open = fullDiskOpen({ afterWrites: 0 });
    const writer = await SpoolFileWriter.create(dir, new SpoolSealer(sealerOptions()), { tmpDir, open });
    await writer.write(Buffer.from("short message"));
    await expect(writer.commit()).rejects.toMatchObject({ code: "ENOSPC" });
    await expectNothingLeft();
  });

  it("write() rejects mid-message and the temporary file is removed", async () => {
    const open = fullDiskOpen({ afterWrites: 0 });
    const writer = await SpoolFileWriter.create(dir, new SpoolSealer(sealerOptions()), { tmpDir, open });
    await writer.write(randomBytes(CHUNK)); // held back: nothing written yet
    // Sealed chunks are written once a chunk's worth is ready: this is the first write, refused.
    await expect(writer.write(randomBytes(3 * CHUNK))).rejects.toMatchObject({ code: "ENOSPC" });
    await expectNothingLeft();
    await expect(writer.commit()).rejects.toThrow(/aborted/);
    await writer.abort();
    await expectNothingLeft();
  });

  it("commit() rejects when the final chunk or trailer cannot be written (no tmpDir)", async () => {
    const open = fullDiskOpen({ afterWrites: 0 });
    const writer = await SpoolFileWriter.create(dir, new SpoolSealer(sealerOptions()), { open });
    await writer.write(Buffer.from("short message"));
    await expect(writer.commit()).rejects.toMatchObject({ code: "ENOSPC" });
    expect(await fs.readdir(dir)).toEqual(["tmp"]);
    await writer.abort();
  });

  it("commit() rejects when fsync fails, and nothing is put in place", async () => {
    const writer = await SpoolFileWriter.create(dir, new SpoolSealer(sealerOptions()), {
      tmpDir,
      open: fullDiskOpen("sync"),
    });
    await writer.write(randomBytes(CHUNK + 1));
    await expect(writer.commit()).rejects.toMatchObject({ code: "ENOSPC" });
    await expectNothingLeft();
  });
});
