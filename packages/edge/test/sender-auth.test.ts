import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { generateKeyPair } from "@mxtunnel/shared";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { dkimRecords, dkimSignature, generateDkimKeys, loadDkimKeys } from "../src/dkim.js";
import { AnswerCache, cachingResolver, type DnsResolve, SenderAuthCheck } from "../src/sender-auth.js";

const MESSAGE = Buffer.from(
  [
    "From: Alice <alice@home.test>",
    "To: bob@example.org",
    "Subject: hello",
    "Date: Tue, 04 Mar 2025 10:00:00 +0000",
    "Message-ID: <1@home.test>",
    "",
    "Hello there",
    "",
  ].join("\r\n"),
);

function notFound(): Error {
  return Object.assign(new Error("queryTxt ENOTFOUND"), { code: "ENOTFOUND" });
}

/** A resolver answering TXT queries from `records`, counting queries by name. */
function fakeDns(records: Record<string, string>) {
  const asked: string[] = [];
  const resolve: DnsResolve = async (name, rrtype) => {
    asked.push(`${rrtype} ${name}`);
    const record = rrtype === "TXT" ? records[name.toLowerCase()] : undefined;
    if (record === undefined) throw notFound();
    return [[record]];
  };
  return { asked, resolve };
}

function check(
  resolve: DnsResolve,
  message: Buffer,
  slices = [7, 50, 3],
  unsignedOutcomes?: AnswerCache,
): SenderAuthCheck {
  const auth = new SenderAuthCheck({
    ip: "192.0.2.1",
    helo: "mx.home.test",
    sender: "alice@home.test",
    mta: "mx.edge.test",
    resolve,
    timeoutMs: 10_000,
    ...(unsignedOutcomes ? { unsignedOutcomes } : {}),
  });
  let offset = 0;
  for (let i = 0; offset < message.length; i++) {
    const size = slices[i % slices.length] as number;
    auth.write(message.subarray(offset, offset + size));
    offset += size;
  }
  auth.end();
  return auth;
}

describe("SenderAuthCheck", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "mxt-sender-auth-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("passes SPF for an unsigned message without any DKIM lookup", async () => {
    const dns = fakeDns({ "home.test": "v=spf1 ip4:192.0.2.1 -all" });
    const verdict = await check(dns.resolve, MESSAGE).result;
    expect(verdict).toMatchObject({ spf: "pass", dkimAligned: false, dsnAllowed: true });
    expect(dns.asked.some((q) => q.includes("_domainkey"))).toBe(false);
  });

  it("shares the outcome of unsigned messages from one client and sender, never of signed ones", async () => {
    const dns = fakeDns({ "home.test": "v=spf1 ip4:192.0.2.1 -all" });
    const outcomes = new AnswerCache();
    const first = await check(dns.resolve, MESSAGE, [7], outcomes).result;
    const second = await check(dns.resolve, MESSAGE, [7], outcomes).result;
    expect(first).toMatchObject({ spf: "pass" });
    expect(second).toMatchObject({ spf: "pass", dsnAllowed: true });
    expect(dns.asked.filter((q) => q === "TXT home.test")).toHaveLength(1);
  });

  it("still verifies DKIM when the header carries a signature (SPF failing)", async () => {
    await generateDkimKeys(dir, ["home.test"], generateKeyPair().publicKey);
    const key = (await loadDkimKeys(dir)).get("home.test");
    const record = (await dkimRecords(dir)).find((r) => r.domain === "home.test");
    if (!key || !record) throw new Error("no DKIM key made for home.test");
    const signed = Buffer.concat([Buffer.from(dkimSignature(MESSAGE, key)), MESSAGE]);
    const dns = fakeDns({ "home.test": "v=spf1 -all", [record.name]: record.record });
    const outcomes = new AnswerCache();
    const verdict = await check(dns.resolve, signed, [7, 50, 3], outcomes).result;
    expect(verdict).toMatchObject({ spf: "fail", dkimAligned: true, dsnAllowed: true });
    // A changed body no longer passes: the body really was verified.
    const tampered = Buffer.from(signed.toString("latin1").replace("Hello there", "Hello thera"), "latin1");
    const failed = await check(
      fakeDns({ "home.test": "v=spf1 -all", [record.name]: record.record }).resolve,
      tampered,
    ).result;
    expect(failed).toMatchObject({ spf: "fail", dkimAligned: false, dsnAllowed: false });
  });

  it("finds a signature field split across tiny writes, whatever its case", async () => {
    const key = (await loadDkimKeys(dir)).get("home.test");
    const record = (await dkimRecords(dir)).find((r) => r.domain === "home.test");
    if (!key || !record) throw new Error("no DKIM key made for home.test");
    // Relaxed header canonicalization lower-cases field names: the signature stays valid.
    const signature = dkimSignature(MESSAGE, key).replace(/^DKIM-Signature:/, "dkim-SIGNATURE:");
    const signed = Buffer.concat([Buffer.from(signature), MESSAGE]);
    const dns = fakeDns({ "home.test": "v=spf1 -all", [record.name]: record.record });
    const verdict = await check(dns.resolve, signed, [3]).result;
    expect(verdict).toMatchObject({ dkimAligned: true });
  });
});

describe("cachingResolver", () => {
  it("shares answers and not-found for 30 s, and asks again after a server failure", async () => {
    let clock = 0;
    const dns = fakeDns({ "home.test": "v=spf1 -all" });
    const resolve = cachingResolver(dns.resolve, () => clock);
    await expect(resolve("home.test", "TXT")).resolves.toEqual([["v=spf1 -all"]]);
    await resolve("HOME.test", "TXT");
    await expect(resolve("nowhere.test", "TXT")).rejects.toMatchObject({ code: "ENOTFOUND" });
    await expect(resolve("nowhere.test", "TXT")).rejects.toMatchObject({ code: "ENOTFOUND" });
    expect(dns.asked).toEqual(["TXT home.test", "TXT nowhere.test"]);
    clock += 31_000;
    await resolve("home.test", "TXT");
    expect(dns.asked).toHaveLength(3);

    let failures = 0;
    const flaky = cachingResolver(async () => {
      failures++;
      throw Object.assign(new Error("queryTxt ESERVFAIL"), { code: "ESERVFAIL" });
    });
    await expect(flaky("home.test", "TXT")).rejects.toMatchObject({ code: "ESERVFAIL" });
    await expect(flaky("home.test", "TXT")).rejects.toMatchObject({ code: "ESERVFAIL" });
    expect(failures).toBe(2);
  });
});
