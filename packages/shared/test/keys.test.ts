import { generateKeyPairSync } from "node:crypto";
import * as fs from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import nacl from "tweetnacl";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { ConfigError, StateError } from "../src/errors.js";
import {
  decodeKey,
  encodeKey,
  keyFingerprint,
  loadKeyPair,
  type StoredKeyPair,
  saveKeyPair,
  x25519PublicKey,
} from "../src/keys.js";

function keyPair(): StoredKeyPair {
  const pair = nacl.box.keyPair();
  return { publicKey: pair.publicKey, privateKey: pair.secretKey };
}

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(join(tmpdir(), "mxt-keys-"));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe("key files", () => {
  it("saves with mode 0600 and loads the same pair", async () => {
    const path = join(dir, "static.key");
    const pair = keyPair();
    await saveKeyPair(path, pair, "home static");
    expect((await fs.stat(path)).mode & 0o777).toBe(0o600);
    const json = JSON.parse(await fs.readFile(path, "utf8"));
    expect(json).toEqual({
      type: "x25519",
      label: "home static",
      publicKey: encodeKey(pair.publicKey),
      privateKey: encodeKey(pair.privateKey),
    });
    const loaded = await loadKeyPair(path);
    expect(Buffer.from(loaded.publicKey)).toEqual(Buffer.from(pair.publicKey));
    expect(Buffer.from(loaded.privateKey)).toEqual(Buffer.from(pair.privateKey));
  });

  it("refuses to overwrite an existing key file", async () => {
    const path = join(dir, "static.key");
    const first = keyPair();
    await saveKeyPair(path, first, "a");
    await expect(saveKeyPair(path, keyPair(), "b")).rejects.toMatchObject({
      code: "STATE_EXISTS",
      message: expect.stringContaining("Refusing to overwrite"),
    });
    expect(Buffer.from((await loadKeyPair(path)).publicKey)).toEqual(Buffer.from(first.publicKey));
  });

  it("refuses a key file others can read, telling how to fix it", async () => {
    const path = join(dir, "static.key");
    const pair = keyPair();
    await saveKeyPair(path, pair, "a");
    await fs.chmod(path, 0o644);
    const error = (await loadKeyPair(path).then(
      () => undefined,
      (e: unknown) => e,
    )) as ConfigError;
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toContain(`chmod 600 ${path}`);
    expect(error.message).toContain("0644");
    expect(error.message).not.toContain(encodeKey(pair.privateKey));
  });

  it("reports a missing file as STATE_MISSING", async () => {
    await expect(loadKeyPair(join(dir, "none.key"))).rejects.toMatchObject({ code: "STATE_MISSING" });
    await expect(loadKeyPair(join(dir, "none.key"))).rejects.toBeInstanceOf(StateError);
  });

  it("reports broken content clearly", async () => {
    const pair = keyPair();
    const cases: Array<[string, RegExp]> = [
      ["{ nope", /not valid JSON/],
      ['{"type":"ed25519"}', /x25519/],
      [JSON.stringify({ type: "x25519", label: "", publicKey: "abc", privateKey: "abc" }), /publicKey/],
      [
        JSON.stringify({
          type: "x25519",
          label: "",
          publicKey: encodeKey(keyPair().publicKey),
          privateKey: encodeKey(pair.privateKey),
        }),
        /does not belong/,
      ],
    ];
    for (const [content, expected] of cases) {
      const path = join(dir, "k.json");
      await fs.writeFile(path, content, { mode: 0o600 });
      const error = (await loadKeyPair(path).then(
        () => undefined,
        (e: unknown) => e,
      )) as Error;
      expect(error, content).toBeInstanceOf(ConfigError);
      expect(error.message).toMatch(expected);
      expect(error.message).not.toContain(encodeKey(pair.privateKey));
      await fs.rm(path);
    }
  });
});

describe("key encoding", () => {
  it("round-trips base64url and checks length", () => {
    const key = new Uint8Array(32).map((_, i) => i * 7);
    const text = encodeKey(key);
    expect(text).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(Buffer.from(decodeKey(text, "k"))).toEqual(Buffer.from(key));
    for (const bad of ["", "abc", `${text}A`, `${text}=`, text.replace(/^./, "+"), `${text.slice(0, 42)}B`]) {
      expect(() => decodeKey(bad, "peers[0].publicKey"), bad).toThrow(/peers\[0\]\.publicKey/);
    }
  });

  it("gives a short stable fingerprint", () => {
    const key = new Uint8Array(32);
    expect(keyFingerprint(key)).toBe("SHA256:Zmh6rfhivXdsj8GL");
    expect(keyFingerprint(keyPair().publicKey)).toMatch(/^SHA256:[A-Za-z0-9_-]{16}$/);
  });

  it("derives X25519 public keys like tweetnacl", () => {
    for (let i = 0; i < 5; i++) {
      const pair = keyPair();
      expect(Buffer.from(x25519PublicKey(pair.privateKey))).toEqual(Buffer.from(pair.publicKey));
    }
    const node = generateKeyPairSync("x25519");
    const raw = node.privateKey.export({ format: "der", type: "pkcs8" }).subarray(-32);
    expect(Buffer.from(x25519PublicKey(raw))).toEqual(Buffer.from(nacl.scalarMult.base(new Uint8Array(raw))));
  });
});
