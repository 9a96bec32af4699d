import { randomBytes } from "node:crypto";
import { readdirSync } from "node:fs";
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  createLogger,
  createMemoryTransportPair,
  type EdgeOutbound,
  Mux,
  type MuxStream,
} from "@mxtunnel/shared";
import { generate } from "selfsigned";
import { SMTPServer } from "smtp-server";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { Deliverer, type RecipientResult } from "../src/delivery.js";
import type { HomeMailbox } from "../src/home-mailbox.js";
import {
  DEDUP_WINDOW_MS,
  domainAllowed,
  OutboundQueue,
  type OutboundQueueOptions,
  outboundQueueEntries,
  parseRelayMeta,
  type RelayResult,
} from "../src/outbound-queue.js";

const logger = createLogger({ name: "test", level: "silent" });
const HOME = { publicKey: "home-key-1", name: "home1", domains: ["home.test"] };

const settings: EdgeOutbound = {
  retryMin: 20,
  retryMax: 80,
  maxAge: 3_600_000,
  concurrency: 4,
  concurrencyPerDomain: 2,
  messagesPerHour: 1000,
  maxRecipients: 5,
  maxMessageSize: 64 * 1024,
  connectTimeout: 1000,
  commandTimeout: 1000,
  tlsCaFile: null,
};

function message(from = "alice@home.test", extra = ""): Buffer {
  return Buffer.from(`From: ${from}\r\nTo: bob@remote.test\r\nSubject: hi\r\n${extra}\r\nbody\r\n`);
}

function meta(body: Buffer, overrides: Record<string, unknown> = {}) {
  return {
    id: randomBytes(16).toString("hex"),
    mailFrom: "alice@home.test",
    rcptTo: [{ address: "bob@remote.test", params: {} }],
    params: { BODY: "8BITMIME" },
    size: body.length,
    ...overrides,
  };
}

interface Harness {
  queue: OutboundQueue;
  homeMux: Mux;
  deliveries: { domain: string; recipients: string[]; message: Buffer }[];
  dsns: { rcptTo: string[]; message: Buffer }[];
  relay(m: Record<string, unknown>, body: Buffer): Promise<RelayResult>;
  stop(): Promise<void>;
}

let dir: string;
const harnesses: Harness[] = [];

async function harness(
  deliver: (domain: string, recipients: string[]) => RecipientResult["outcome"] | RecipientResult[] = () =>
    "delivered",
  overrides: Partial<OutboundQueueOptions> = {},
): Promise<Harness> {
  const deliveries: Harness["deliveries"] = [];
  const dsns: Harness["dsns"] = [];
  const mailbox: HomeMailbox = {
    submit: async (envelope, body) => {
      dsns.push({ rcptTo: envelope.rcptTo, message: body });
    },
  };
  const queue = new OutboundQueue({
    dir,
    hostname: "mx.edge.test",
    settings,
    logger,
    dkimKeys: new Map(),
    deliver: async (request) => {
      const recipients = request.recipients.map((r) => r.address);
      deliveries.push({ domain: request.domain, recipients, message: request.message });
      const outcome = deliver(request.domain, recipients);
      if (Array.isArray(outcome)) return outcome;
      const code = outcome === "delivered" ? 250 : outcome === "failed" ? 550 : 451;
      return recipients.map((address) => ({
        address,
        outcome,
        code,
        enhanced: `${String(code)[0]}.0.0`,
        message: `${code} test reply`,
        remoteMta: "mx.remote.test",
      }));
    },
    mailbox: () => mailbox,
    ...overrides,
  });
  await queue.start();
  const [a, b] = createMemoryTransportPair();
  const homeMux = new Mux(a, { role: "home", pingIntervalMs: 0, idleTimeoutMs: 0 });
  const edgeMux = new Mux(b, { role: "edge", pingIntervalMs: 0, idleTimeoutMs: 0 });
  edgeMux.on("stream", (stream: MuxStream) => queue.handleStream(stream, HOME));
  const h: Harness = {
    queue,
    homeMux,
    deliveries,
    dsns,
    relay: (m, body) =>
      new Promise((resolve, reject) => {
        const stream = homeMux.open("relay", m);
        stream.on("result", (r: RelayResult) => resolve(r));
        stream.on("reset", (_c: number, reason: string) => reject(new Error(`reset: ${reason}`)));
        stream.resume();
        stream.end(body);
      }),
    stop: async () => {
      homeMux.close();
      await queue.stop();
    },
  };
  harnesses.push(h);
  return h;
}

const until = async (probe: () => boolean, what: string) => {
  const deadline = Date.now() + 5000;
  while (!probe()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "mxt-outq-"));
});
afterEach(async () => {
  while (harnesses.length) await harnesses.pop()!.stop();
  await rm(dir, { recursive: true, force: true });
});

describe("relay meta", () => {
  it("accepts a well-formed request and refuses malformed ones with 501 5.5.4", () => {
    const body = message();
    expect(parseRelayMeta(meta(body), 5).rcptTo).toHaveLength(1);
    const bad: Record<string, unknown>[] = [
      { id: "xyz" },
      { id: "A".repeat(32) },
      { mailFrom: "no-at-sign" },
      { mailFrom: "a@b.test\r\nRCPT TO:<x@y.test>" },
      { rcptTo: [] },
      { rcptTo: [{ address: "b@remote.test" }] },
      { params: { "bad key": "x" } },
      { size: -1 },
    ];
    for (const o of bad) {
      expect(() => parseRelayMeta(meta(body, o), 5), JSON.stringify(o)).toThrow(/malformed relay request/);
    }
    const many = Array.from({ length: 6 }, (_, i) => ({ address: `r${i}@remote.test`, params: {} }));
    expect(() => parseRelayMeta(meta(body, { rcptTo: many }), 5)).toThrow(/too many recipients/);
  });

  it("matches domains and their subdomains only", () => {
    expect(domainAllowed("home.test", ["home.test"])).toBe(true);
    expect(domainAllowed("mx.home.test", ["home.test"])).toBe(true);
    expect(domainAllowed("evilhome.test", ["home.test"])).toBe(false);
    expect(domainAllowed("home.test.evil", ["home.test"])).toBe(false);
  });
});

describe("outbound queue", () => {
  it("answers queued once the entry is on disk, then delivers it unchanged and empties", async () => {
    const h = await harness();
    const body = message();
    const m = meta(body);
    const result = await h.relay(m, body);
    expect(result).toEqual({ status: "queued", id: m.id });
    await until(() => h.deliveries.length === 1, "delivery");
    expect(h.deliveries[0]!.message.equals(body)).toBe(true); // no DKIM key here: unsigned, byte for byte
    await until(() => h.queue.size === 0, "queue to empty");
    const left = (await readdir(join(dir, "outbound"))).filter((n) => n !== "seen");
    expect(left).toEqual([]);
    const seen = await readdir(join(dir, "outbound", "seen"));
    expect(seen).toHaveLength(1);
    expect((await stat(join(dir, "outbound", "seen", seen[0]!))).mode & 0o777).toBe(0o600);
  });

  it("deduplicates a relay id, also after a restart, without sending twice", async () => {
    const h = await harness((_d, _r) => "deferred");
    const body = message();
    const m = meta(body);
    expect(await h.relay(m, body)).toEqual({ status: "queued", id: m.id });
    expect(await h.relay(m, body)).toEqual({ status: "queued", id: m.id, duplicate: true });
    expect(h.queue.size).toBe(1);
    const files = await readdir(join(dir, "outbound"));
    const json = files.find((f) => f.endsWith(".json"))!;
    expect((await stat(join(dir, "outbound", json))).mode & 0o777).toBe(0o600);
    expect(JSON.parse(await readFile(join(dir, "outbound", json), "utf8")).relayId).toBe(m.id);
    await h.stop();
    harnesses.pop();
    const again = await harness();
    expect(again.queue.size).toBe(1);
    expect(await again.relay(m, body)).toEqual({ status: "queued", id: m.id, duplicate: true });
    await until(() => again.queue.size === 0, "the restored entry to be delivered");
    expect(again.deliveries).toHaveLength(1);
    expect(again.queue.counters.duplicates).toBe(1);
  });

  it("refuses foreign senders and header From, lying sizes and oversize mail; queues nothing", async () => {
    const h = await harness();
    const body = message();
    const cases: [Record<string, unknown>, Buffer, RegExp][] = [
      [meta(body, { mailFrom: "mallory@evil.test" }), body, /^5\.7\.1 sender <mallory@evil\.test>/],
      [meta(message("ceo@bank.test")), message("ceo@bank.test"), /^5\.7\.1 header From <ceo@bank\.test>/],
      [
        meta(message("Alice <alice@home.test>, x@evil.test")),
        message("Alice <alice@home.test>, x@evil.test"),
        /^5\.7\.1 header From <x@evil\.test>/,
      ],
      [
        meta(Buffer.from("To: b@remote.test\r\n\r\nx\r\n")),
        Buffer.from("To: b@remote.test\r\n\r\nx\r\n"),
        /^5\.6\.0 the message has no From/,
      ],
      [meta(body, { size: body.length + 1 }), body, /^5\.6\.0 message is/],
      [meta(body, { id: "nothex" }), body, /^5\.5\.4 malformed/],
    ];
    for (const [m, b, pattern] of cases) {
      const result = await h.relay(m, b);
      expect(result.status).toBe("rejected");
      if (result.status === "rejected") expect(`${result.enhanced} ${result.message}`).toMatch(pattern);
    }
    const big = Buffer.concat([message(), Buffer.alloc(settings.maxMessageSize, "x")]);
    const tooBig = await h.relay(meta(big, { size: 10 }), big);
    expect(tooBig).toMatchObject({ status: "rejected", code: 552, enhanced: "5.3.4" });
    // <> (bounces) and subdomain senders are fine.
    const bounce = message("MAILER-DAEMON@mx.home.test");
    expect((await h.relay(meta(bounce, { mailFrom: "" }), bounce)).status).toBe("queued");
    expect(h.queue.counters.queued).toBe(1);
  });

  it("defers past the hourly rate", async () => {
    const h = await harness(() => "delivered", { settings: { ...settings, messagesPerHour: 2 } });
    const results: string[] = [];
    for (let i = 0; i < 3; i++) {
      const body = message("alice@home.test", `X-N: ${i}\r\n`);
      const r = await h.relay(meta(body), body);
      results.push(r.status === "queued" ? "queued" : `${r.code} ${r.enhanced}`);
    }
    expect(results).toEqual(["queued", "queued", "451 4.7.1"]);
  });

  it("retries deferred recipients with growing delays and gives up at maxAge with a DSN", async () => {
    let now = 1_000_000;
    const h = await harness(() => "deferred", { now: () => now, settings: { ...settings, maxAge: 60_000 } });
    const body = message();
    await h.relay(meta(body), body);
    await until(() => h.deliveries.length === 1, "first attempt");
    // tries counts up while the attempt is still active; wait for the attempt to finish and save.
    await until(() => {
      const row = h.queue.entriesList()[0];
      return row?.tries === 1 && row.state !== "active";
    }, "state saved");
    const row = h.queue.entriesList()[0]!;
    expect(row.state).toBe("deferred");
    expect(row.lastError).toBe("451 test reply");
    expect(Date.parse(row.nextAttemptAt!) - now).toBe(settings.retryMin);
    expect((await outboundQueueEntries(dir, now))[0]).toMatchObject({
      id: row.id,
      tries: 1,
      state: "deferred",
    });
    now += 61_000;
    h.queue.flush();
    await until(() => h.dsns.length === 1, "the DSN");
    expect(h.dsns[0]!.rcptTo).toEqual(["alice@home.test"]);
    const dsn = h.dsns[0]!.message.toString();
    expect(dsn).toMatch(/Action: failed/);
    expect(dsn).toMatch(/Status: 5\.0\.0|Status: 5\.4\.7/);
    await until(() => h.queue.size === 0, "queue to empty");
  });

  it("splits recipients by domain, delivers each domain once, and reports only the failed ones", async () => {
    const h = await harness((domain, recipients) =>
      recipients.map((address) => ({
        address,
        outcome: address.startsWith("gone") ? "failed" : "delivered",
        code: address.startsWith("gone") ? 550 : 250,
        enhanced: address.startsWith("gone") ? "5.1.1" : "2.0.0",
        message: address.startsWith("gone") ? "550 5.1.1 unknown" : "250 ok",
        remoteMta: `mx.${domain}`,
      })),
    );
    const body = message();
    const m = meta(body, {
      rcptTo: [
        { address: "a@one.test", params: {} },
        { address: "gone@one.test", params: { NOTIFY: "FAILURE", ORCPT: "rfc822;gone@one.test" } },
        { address: "b@two.test", params: {} },
        { address: "gone2@two.test", params: { NOTIFY: "NEVER" } },
      ],
    });
    await h.relay(m, body);
    await until(() => h.dsns.length === 1 && h.queue.size === 0, "DSN and empty queue");
    expect(h.deliveries.map((d) => [d.domain, d.recipients]).sort()).toEqual([
      ["one.test", ["a@one.test", "gone@one.test"]],
      ["two.test", ["b@two.test", "gone2@two.test"]],
    ]);
    const dsn = h.dsns[0]!.message.toString();
    expect(dsn).toMatch(
      /Original-Recipient: rfc822;gone@one\.test\r\nFinal-Recipient: rfc822; gone@one\.test/,
    );
    expect(dsn).not.toMatch(/gone2@two\.test/); // NOTIFY=NEVER
  });

  it("keeps mail for a requireTLS domain queued with the certificate problem, then bounces it at maxAge", async () => {
    // A real Deliverer against a loopback MX whose certificate is self-signed.
    const pems = await generate([{ name: "commonName", value: "127.0.0.1" }], { keyType: "ec" });
    const mx = new SMTPServer({
      authOptional: true,
      disabledCommands: ["AUTH"],
      logger: false,
      key: pems.private,
      cert: pems.cert,
      onData(stream, _session, callback) {
        stream.resume();
        stream.on("end", () => callback(new Error("nothing may arrive here")));
      },
    });
    await new Promise<void>((resolve) => mx.listen(0, "127.0.0.1", resolve));
    try {
      const port = (mx.server.address() as AddressInfo).port;
      const deliverer = new Deliverer({
        hostname: "mx.edge.test",
        transports: { "remote.test": { host: "127.0.0.1", port } },
        dnsServers: [],
        requireTLS: ["remote.test"],
        logger,
        connectTimeoutMs: 5000,
        commandTimeoutMs: 5000,
      });
      let now = 1_000_000;
      const h = await harness(undefined, {
        now: () => now,
        settings: { ...settings, maxAge: 60_000 },
        deliver: (request) => deliverer.deliver(request),
      });
      const body = message();
      await h.relay(meta(body), body);
      await until(() => {
        const row = h.queue.entriesList()[0];
        return row?.tries === 1 && row.state !== "active";
      }, "the first attempt saved");
      const row = h.queue.entriesList()[0]!;
      expect(row.state).toBe("deferred");
      expect(row.lastError).toMatch(
        /^TLS required for remote\.test: certificate of 127\.0\.0\.1 not trusted \(self[- ]signed certificate\)$/,
      );
      now += 61_000;
      h.queue.flush();
      await until(() => h.dsns.length === 1, "the DSN");
      expect(h.dsns[0]!.message.toString()).toMatch(/Action: failed/);
      await until(() => h.queue.size === 0, "queue to empty");
    } finally {
      await new Promise<void>((resolve) => mx.close(() => resolve()));
    }
  });

  it("sends no DSN for a failed bounce (MAIL FROM:<>)", async () => {
    const h = await harness(() => "failed");
    const body = message("MAILER-DAEMON@mx.home.test");
    await h.relay(meta(body, { mailFrom: "" }), body);
    await until(() => h.queue.size === 0, "queue to empty");
    expect(h.dsns).toHaveLength(0);
  });

  it("keeps a relay id across a crash after RESULT: no marker yet, the entry restores it; a resend dedupes", async () => {
    const h = await harness(() => "deferred");
    const body = message();
    const m = meta(body);
    expect(await h.relay(m, body)).toEqual({ status: "queued", id: m.id });
    // What a kill -9 right after RESULT leaves: body and envelope, no seen/ marker (it is written
    // only when the entry leaves the queue).
    const files = await readdir(join(dir, "outbound"));
    expect(files.filter((f) => f.endsWith(".eml") || f.endsWith(".json"))).toHaveLength(2);
    expect(await readdir(join(dir, "outbound", "seen"))).toEqual([]);
    await h.stop();
    harnesses.pop();
    const again = await harness();
    expect(await again.relay(m, body)).toEqual({ status: "queued", id: m.id, duplicate: true });
    await until(() => again.queue.size === 0, "the restored entry to be delivered");
    expect(again.deliveries).toHaveLength(1);
    // Delivered: the envelope became the marker, so the id outlives the entry, also across a restart.
    expect(await readdir(join(dir, "outbound", "seen"))).toHaveLength(1);
    await again.stop();
    harnesses.pop();
    const third = await harness();
    expect(await third.relay(m, body)).toEqual({ status: "queued", id: m.id, duplicate: true });
    expect(third.queue.size).toBe(0);
    expect(third.deliveries).toHaveLength(0);
  });

  it("forgets a delivered relay id after the 24 h window, on disk too", async () => {
    let now = 1_000_000;
    const h = await harness(() => "delivered", { now: () => now });
    const body = message();
    const m = meta(body);
    await h.relay(m, body);
    await until(() => h.queue.size === 0, "delivery");
    expect(await h.relay(m, body)).toEqual({ status: "queued", id: m.id, duplicate: true });
    now += DEDUP_WINDOW_MS + 120_000;
    h.queue.flush(); // a run of the queue prunes what expired
    await until(() => h.deliveries.length === 1 && h.queue.size === 0, "an idle queue");
    const seenDir = join(dir, "outbound", "seen");
    await until(() => readdirSync(seenDir).length === 0, "the expired marker removed");
    expect(await h.relay(m, body)).toEqual({ status: "queued", id: m.id });
  });

  /** One committed entry, the queue stopped with `file` left beside it as a crash would, then a new start. */
  async function restartWithStray(file: string, content: string): Promise<Harness> {
    const h = await harness(() => "deferred");
    const body = message();
    await h.relay(meta(body), body);
    await h.stop();
    harnesses.pop();
    await writeFile(join(dir, "outbound", file), content);
    return harness(() => "deferred");
  }

  it("drops an envelope without its body at start (written side by side, never answered)", async () => {
    const again = await restartWithStray("feedfacefeedface.json", "{}");
    expect(again.queue.size).toBe(1);
    expect((await readdir(join(dir, "outbound"))).includes("feedfacefeedface.json")).toBe(false);
  });

  it("drops a half-written body at start, keeps committed entries", async () => {
    const again = await restartWithStray("deadbeefdeadbeef.eml", "partial");
    expect(again.queue.size).toBe(1);
    expect((await readdir(join(dir, "outbound"))).includes("deadbeefdeadbeef.eml")).toBe(false);
  });
});
