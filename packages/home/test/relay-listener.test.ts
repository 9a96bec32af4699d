import { spawnSync } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createLogger, createMemoryTransportPair, Mux, type MuxStream } from "@mxtunnel/shared";
import nodemailer from "nodemailer";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { EdgeLink } from "../src/edge-link.js";
import { headerFrom, RelayListener, type RelayListenerOptions, relayId } from "../src/relay-listener.js";

const logger = createLogger({ name: "test", level: "silent" });
const root = fileURLToPath(new URL("../../..", import.meta.url));

type EdgeAnswer = (stream: MuxStream, body: Buffer) => unknown | "silent";

interface Fake {
  listener: RelayListener;
  port: number;
  seen: { meta: Record<string, unknown>; body: Buffer }[];
  setAnswer(answer: EdgeAnswer): void;
  setConnected(connected: boolean): void;
}

let cleanups: (() => Promise<void>)[] = [];
let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "mxt-relay-"));
});
afterEach(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanups = [];
  await rm(dir, { recursive: true, force: true });
});

/** A relay listener wired to an in-memory edge whose answers the test decides. */
async function fake(options: Partial<RelayListenerOptions> = {}): Promise<Fake> {
  const [a, b] = createMemoryTransportPair();
  const homeMux = new Mux(a, { role: "home", pingIntervalMs: 0, idleTimeoutMs: 0 });
  const edgeMux = new Mux(b, { role: "edge", pingIntervalMs: 0, idleTimeoutMs: 0 });
  const seen: Fake["seen"] = [];
  let answer: EdgeAnswer = (stream) => ({ status: "queued", id: stream.meta.id });
  let connected = true;
  edgeMux.on("stream", (stream: MuxStream) => {
    const chunks: Buffer[] = [];
    stream.on("data", (c: Buffer) => chunks.push(c));
    stream.on("end", () => {
      const body = Buffer.concat(chunks);
      seen.push({ meta: stream.meta, body });
      const result = answer(stream, body);
      if (result === "silent") return;
      stream.sendResult(result);
      stream.end();
    });
  });
  const link = {
    edge: { domains: ["home.test"] },
    status: () => ({ connected }),
    get currentMux() {
      return connected ? homeMux : undefined;
    },
  } as unknown as EdgeLink;
  const listener = new RelayListener({
    listen: { host: "127.0.0.1", port: 0 },
    auth: null,
    limits: { maxRecipients: 3, maxMessageSize: 100_000, messagesPerHour: 100 },
    timeoutMs: 300,
    links: new Map([["edge", link]]),
    logger,
    dir,
    ...options,
  });
  const address: AddressInfo = await listener.start();
  cleanups.push(async () => {
    await listener.stop();
    homeMux.close();
  });
  return {
    listener,
    port: address.port,
    seen,
    setAnswer: (x) => {
      answer = x;
    },
    setConnected: (x) => {
      connected = x;
    },
  };
}

async function send(
  port: number,
  mail: { from?: string; headerFrom?: string; to?: string[]; text?: string },
  auth?: { user: string; pass: string },
) {
  const transport = nodemailer.createTransport({
    host: "127.0.0.1",
    port,
    secure: false,
    ignoreTLS: true,
    ...(auth ? { auth } : {}),
  });
  try {
    const info = await transport.sendMail({
      envelope: { from: mail.from ?? "alice@home.test", to: mail.to ?? ["bob@remote.test"] },
      from: mail.headerFrom ?? mail.from ?? "alice@home.test",
      to: "bob@remote.test",
      subject: "hi",
      text: mail.text ?? "hello\n",
      dsn: { notify: ["FAILURE"], id: "ENV1" },
    });
    return info.response;
  } catch (error) {
    const e = error as { response?: string; message: string };
    return e.response ?? e.message;
  }
}

describe("relay listener", () => {
  it("relays with an id, the envelope and its parameters, and answers 250 only after RESULT queued", async () => {
    const f = await fake();
    const reply = await send(f.port, { to: ["bob@remote.test", "carol@remote.test"] });
    expect(reply).toMatch(/^250 2\.0\.0 queued on the edge as [0-9a-f]{32}$/);
    expect(f.seen).toHaveLength(1);
    const { meta, body } = f.seen[0]!;
    expect(meta.mailFrom).toBe("alice@home.test");
    expect(meta.rcptTo).toEqual([
      { address: "bob@remote.test", params: {} },
      { address: "carol@remote.test", params: {} },
    ]);
    expect(meta.size).toBe(body.length);
    expect(meta.id).toBe(relayId("alice@home.test", ["bob@remote.test", "carol@remote.test"], body));
    expect(body.toString()).toMatch(/\r\nSubject: hi\r\n/);
    expect(body.toString()).not.toMatch(/[^\r]\n/);
  });

  it("refuses a foreign envelope sender and a foreign header From; nothing reaches the edge", async () => {
    const f = await fake();
    expect(await send(f.port, { from: "mallory@evil.test" })).toMatch(
      /^550 5\.7\.1 sender <mallory@evil\.test>/,
    );
    expect(await send(f.port, { headerFrom: "ceo@bank.test" })).toMatch(
      /^550 5\.7\.1 header From <ceo@bank\.test>/,
    );
    expect(await send(f.port, { headerFrom: "x@home.test.evil" })).toMatch(/^550 5\.7\.1/);
    expect(f.seen).toHaveLength(0);
    // Bounces (<>) from the Postfix host name are fine.
    expect(await send(f.port, { from: "", headerFrom: "MAILER-DAEMON@mx.home.test" })).toMatch(/^250 /);
  });

  it("answers 451 4.4.1 when no tunnel is up, the edge stays silent, or the tunnel breaks", async () => {
    const f = await fake();
    f.setConnected(false);
    expect(await send(f.port, {})).toMatch(/^451 4\.4\.1 no tunnel to the edge/);
    f.setConnected(true);
    f.setAnswer(() => "silent");
    expect(await send(f.port, {})).toMatch(/^451 4\.4\.1 the edge did not answer in time/);
    f.setAnswer((stream) => {
      stream.reset(7, "disk full");
      return "silent";
    });
    expect(await send(f.port, {})).toMatch(/^451 4\.4\.1 the edge reset the relay stream \(disk full\)/);
  });

  it("passes the edge's rejections and deferrals through, and distrusts a malformed RESULT", async () => {
    const f = await fake();
    f.setAnswer(() => ({ status: "rejected", code: 550, enhanced: "5.7.1", message: "not your domain" }));
    expect(await send(f.port, {})).toBe("550 5.7.1 not your domain");
    f.setAnswer(() => ({ status: "deferred", code: 451, enhanced: "4.7.1", message: "rate limit" }));
    expect(await send(f.port, {})).toBe("451 4.7.1 rate limit");
    f.setAnswer(() => ({ status: "deferred", code: 250, enhanced: "2.0.0", message: "ok?" }));
    expect(await send(f.port, {})).toMatch(/^451 4\.4\.1 the edge sent a malformed RESULT/);
    f.setAnswer(() => ({ status: "queued", id: "0".repeat(32) }));
    expect(await send(f.port, {})).toMatch(/^451 4\.4\.1 the edge sent a malformed RESULT/);
  });

  it("enforces the recipient limit", async () => {
    const f = await fake();
    const transport = nodemailer.createTransport({
      host: "127.0.0.1",
      port: f.port,
      secure: false,
      ignoreTLS: true,
    });
    const info = await transport.sendMail({
      envelope: { from: "alice@home.test", to: ["a@r.test", "b@r.test", "c@r.test", "d@r.test"] },
      from: "alice@home.test",
      subject: "many",
      text: "x\n",
    });
    expect(info.rejected).toEqual(["d@r.test"]);
    expect(String(info.rejectedErrors?.[0]?.response)).toMatch(/^452 4\.5\.3 too many recipients/);
    expect((f.seen[0]!.meta.rcptTo as unknown[]).length).toBe(3);
  });

  it("requires AUTH when configured, and accepts the right password", async () => {
    const f = await fake({ auth: { users: { postfix: "correct horse battery" } } });
    expect(await send(f.port, {})).toMatch(/^530 /);
    expect(await send(f.port, {}, { user: "postfix", pass: "wrong" })).toMatch(/^535 5\.7\.8/);
    expect(await send(f.port, {}, { user: "postfix", pass: "correct horse battery" })).toMatch(/^250 /);
  });

  it("gives Postfix's resend of the same message the same id (the edge deduplicates it)", () => {
    const body = Buffer.from("From: a@home.test\r\n\r\nx\r\n");
    expect(relayId("a@home.test", ["b@r.test"], body)).toBe(relayId("a@home.test", ["b@r.test"], body));
    expect(relayId("a@home.test", ["b@r.test"], body)).not.toBe(relayId("a@home.test", ["c@r.test"], body));
  });

  it("reads header From addresses and refuses messages without exactly one From", () => {
    expect(headerFrom(Buffer.from('From: "A, B" <a@home.test>,\r\n c@home.test\r\n\r\n'))).toEqual([
      "a@home.test",
      "c@home.test",
    ]);
    expect(() => headerFrom(Buffer.from("To: x@y.test\r\n\r\n"))).toThrow(/no From/);
    expect(() => headerFrom(Buffer.from("From: a@home.test\r\nFrom: b@evil.test\r\n\r\n"))).toThrow(
      /more than one/,
    );
  });
});

describe("mxtunnel-home run --check", () => {
  const check = async (config: Record<string, unknown>) => {
    await writeFile(join(dir, "home.json"), JSON.stringify(config));
    return spawnSync(
      process.execPath,
      [join(root, "packages/home/dist/cli.js"), "run", "--check", "--dir", dir],
      {
        encoding: "utf8",
      },
    );
  };

  it("refuses a relay listener beyond loopback without AUTH", async () => {
    const run = await check({ relayListen: "0.0.0.0:2525" });
    expect(run.status).not.toBe(0);
    expect(run.stderr).toMatch(/relayListen: 0\.0\.0\.0:2525 is reachable beyond this machine, so relayAuth/);
  });

  it("gets past the relay rules with AUTH configured (and stops only at the missing key)", async () => {
    const run = await check({
      relayListen: "0.0.0.0:2525",
      relayAuth: { users: { postfix: "a long enough secret" } },
    });
    expect(run.stderr).not.toMatch(/relayListen/);
  });
});
