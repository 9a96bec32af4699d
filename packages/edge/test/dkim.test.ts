import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { generateKeyPair } from "@mxtunnel/shared";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  dkimRecords,
  dkimSelector,
  dkimSignature,
  generateDkimKeys,
  loadDkimKeys,
  relaxedBody,
  relaxedHeader,
} from "../src/dkim.js";

const PYTHON = "/usr/bin/python3";
const hasDkimpy = existsSync(PYTHON) && spawnSync(PYTHON, ["-c", "import dkim"]).status === 0;

/** Verifies with Debian's python3-dkim, answering its DNS query with the record we made. */
export function dkimpyVerify(message: Buffer, name: string, record: string): { ok: boolean; output: string } {
  const script = [
    "import sys, dkim",
    "name, record = sys.argv[1].encode(), sys.argv[2].encode()",
    "def dns(q, timeout=5):",
    "    return record if q.rstrip(b'.') == name else None",
    "msg = sys.stdin.buffer.read()",
    "ok = dkim.verify(msg, dnsfunc=dns)",
    "print('pass' if ok else 'fail')",
  ].join("\n");
  const run = spawnSync(PYTHON, ["-c", script, name, record], { input: message });
  const output = `${run.stdout}${run.stderr}`;
  return { ok: run.status === 0 && run.stdout.toString().trim() === "pass", output };
}

const MESSAGE = Buffer.from(
  [
    "From: Alice <alice@home.test>",
    "To: someone@remote.test",
    "Subject: a   folded",
    "\tsubject line",
    "Date: Tue, 04 Mar 2025 10:00:00 +0000",
    "Message-ID: <1@home.test>",
    "X-Unsigned: yes",
    "",
    "Hello  there   ",
    "",
    "second line",
    "",
    "",
  ].join("\r\n"),
);

describe("dkim", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "mxt-dkim-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("makes a selector unique to the edge key and month", () => {
    const a = generateKeyPair().publicKey;
    const b = generateKeyPair().publicKey;
    const march = new Date(Date.UTC(2025, 2, 4));
    expect(dkimSelector(a, march)).toMatch(/^mxt-[0-9a-f]{8}-202503$/);
    expect(dkimSelector(a, march)).not.toBe(dkimSelector(b, march));
  });

  it("canonicalizes relaxed headers and bodies as RFC 6376 3.4.2/3.4.4 say", () => {
    expect(relaxedHeader("Subject : a   folded\r\n\tsubject line  ")).toBe(
      "subject:a folded subject line\r\n",
    );
    expect(relaxedBody(Buffer.from("a  b \r\n\r\n\r\n")).toString()).toBe("a b\r\n");
    expect(relaxedBody(Buffer.from("")).toString()).toBe("");
    expect(relaxedBody(Buffer.from("\r\n\r\n")).toString()).toBe("");
    expect(relaxedBody(Buffer.from("no newline")).toString()).toBe("no newline\r\n");
  });

  it("writes one 2048-bit key per domain, 0600, and keeps existing keys", async () => {
    const edgeKey = generateKeyPair().publicKey;
    const made = await generateDkimKeys(dir, ["home.test", "other.test"], edgeKey);
    expect(made.map((r) => r.domain)).toEqual(["home.test", "other.test"]);
    expect((await stat(join(dir, "dkim", "home.test.key"))).mode & 0o777).toBe(0o600);
    expect((await stat(join(dir, "dkim", "home.test.json"))).mode & 0o777).toBe(0o600);
    const again = await generateDkimKeys(dir, ["home.test"], edgeKey);
    expect(again).toEqual([]);
    const records = await dkimRecords(dir);
    expect(records[0]?.record).toMatch(/^v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]{300,}$/);
    const keys = await loadDkimKeys(dir);
    expect(keys.get("home.test")?.privateKey.asymmetricKeyDetails?.modulusLength).toBe(2048);
  });

  it.skipIf(!hasDkimpy)("signs so that python3-dkim verifies, and a changed body fails", async () => {
    const keys = await loadDkimKeys(dir);
    const key = keys.get("home.test")!;
    const record = (await dkimRecords(dir)).find((r) => r.domain === "home.test")!;
    const signature = dkimSignature(MESSAGE, key);
    expect(signature).toMatch(/h=from:to:subject:date:message-id:from;/);
    for (const line of signature.split("\r\n")) expect(line.length).toBeLessThanOrEqual(78);
    const signed = Buffer.concat([Buffer.from(signature), MESSAGE]);
    const good = dkimpyVerify(signed, record.name, record.record);
    expect(good.ok, good.output).toBe(true);
    const tampered = Buffer.from(signed.toString().replace("second line", "second lime"));
    expect(dkimpyVerify(tampered, record.name, record.record).ok).toBe(false);
    // A From added above the signed one breaks the signature (From is over-signed).
    const extraFrom = Buffer.concat([Buffer.from("From: mallory@evil.test\r\n"), signed]);
    expect(dkimpyVerify(extraFrom, record.name, record.record).ok).toBe(false);
  });

  it("refuses to sign a message without From", async () => {
    const key = (await loadDkimKeys(dir)).get("home.test")!;
    expect(() => dkimSignature(Buffer.from("To: x@y.test\r\n\r\nbody\r\n"), key)).toThrow(/without From/);
  });

  it("signs a 100 KB message in a few milliseconds (reported, not asserted)", async () => {
    const key = (await loadDkimKeys(dir)).get("home.test")!;
    const big = Buffer.concat([MESSAGE, Buffer.alloc(100_000, "abcdefghij\r\n")]);
    const runs = 50;
    const t0 = performance.now();
    for (let i = 0; i < runs; i++) dkimSignature(big, key);
    const perMessage = (performance.now() - t0) / runs;
    console.log(`DKIM sign (rsa-sha256 2048, 100 KB body): ${perMessage.toFixed(2)} ms/message`);
    expect(perMessage).toBeGreaterThan(0);
  });
});
