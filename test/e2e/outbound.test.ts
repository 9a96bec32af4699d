// Issue 5 end to end: mail submitted to a real Postfix at home leaves through its relayhost (the
// home relay listener), crosses the tunnel on a relay stream, is queued durably by the edge, signed
// with the edge's DKIM key and delivered to a test receiving server; failures come back as DSNs that
// land in the home Postfix's Maildir.
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  dkimRecords,
  EdgeState,
  initEdge,
  issuePairingToken,
  loadEdgeConfigFrom,
  outboundQueueEntries,
} from "@mxtunnel/edge";
import nodemailer from "nodemailer";
import { SMTPServer } from "smtp-server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  cleanupAgents,
  makeEdge,
  makeHome,
  pairedHomeDir,
  startTestHome,
  type TestEdge,
  type TestHome,
  tempDir,
} from "../helpers/agents.js";
import { startDnsServer } from "../helpers/dns-server.js";
import { freePort } from "./lab/ports.js";
import { type PostfixLab, startPostfix } from "./lab/postfix.js";
import { requireTools } from "./lab/require-tools.js";
import { killQuietly, waitFor, waitForExit, waitForPort } from "./lab/wait.js";

const ready = requireTools(["postfix", "postconf"], "outbound e2e suite");
const PYTHON = "/usr/bin/python3";
const hasDkimpy = existsSync(PYTHON) && spawnSync(PYTHON, ["-c", "import dkim"]).status === 0;
const root = fileURLToPath(new URL("../..", import.meta.url));
const EDGE_CLI = join(root, "packages/edge/dist/cli.js");

type Plan = "accept" | "hold" | { code: number; text: string };

interface Delivery {
  ehlo: string;
  mailFrom: string;
  rcptTo: string[];
  message: string;
}

/** The remote MX: an smtp-server that records what it accepts and answers DATA as planned. */
async function startReceiver() {
  const accepted: Delivery[] = [];
  const attempts: { subject: string; plan: Plan }[] = [];
  let planFor: (message: string) => Plan = () => "accept";
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ["STARTTLS", "AUTH"],
    logger: false,
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on("data", (c: Buffer) => chunks.push(c));
      stream.on("end", () => {
        const message = Buffer.concat(chunks).toString("latin1");
        const plan = planFor(message);
        attempts.push({ subject: /^Subject: (.*)$/m.exec(message)?.[1] ?? "", plan });
        if (plan === "hold") return; // never answered: the sender is killed meanwhile
        if (plan !== "accept") {
          callback(Object.assign(new Error(plan.text), { responseCode: plan.code }));
          return;
        }
        accepted.push({
          ehlo: session.hostNameAppearsAs,
          mailFrom: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
          rcptTo: session.envelope.rcptTo.map((r) => r.address),
          message,
        });
        callback();
      });
    },
  });
  // smtp-server re-emits a session's socket errors (a reset mid-transaction) on the server.
  server.on("error", () => {});
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.server.address() as AddressInfo).port,
    accepted,
    attempts,
    plan(fn: (message: string) => Plan) {
      planFor = fn;
    },
    withSubject: (subject: string) => accepted.filter((d) => d.message.includes(`Subject: ${subject}\r\n`)),
    stop: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

function dkimVerify(message: string, name: string, record: string): { ok: boolean; output: string } {
  const script = [
    "import sys, dkim",
    "name, record = sys.argv[1].encode(), sys.argv[2].encode()",
    "def dns(q, timeout=5):",
    "    return record if q.rstrip(b'.') == name else None",
    "print('pass' if dkim.verify(sys.stdin.buffer.read(), dnsfunc=dns) else 'fail')",
  ].join("\n");
  const run = spawnSync(PYTHON, ["-c", script, name, record], { input: Buffer.from(message, "latin1") });
  return { ok: run.stdout.toString().trim() === "pass", output: `${run.stdout}${run.stderr}` };
}

const tag = () => `t${Math.random().toString(36).slice(2, 10)}`;

describe.skipIf(!ready)("outbound mail: home Postfix → relay listener → edge → remote MX", () => {
  let postfix: PostfixLab;
  let edge: TestEdge;
  let home: TestHome;
  let rx: Awaited<ReturnType<typeof startReceiver>>;
  let dns: Awaited<ReturnType<typeof startDnsServer>>;
  let relayPort: number;

  const submit = (options: {
    from?: string;
    to: string;
    subject: string;
    port?: number;
    headerFrom?: string;
  }) =>
    nodemailer
      .createTransport({
        host: "127.0.0.1",
        port: options.port ?? postfix.smtpPort,
        secure: false,
        ignoreTLS: true,
      })
      .sendMail({
        envelope: { from: options.from ?? "alice@home.test", to: [options.to] },
        from: options.headerFrom ?? options.from ?? "alice@home.test",
        to: options.to,
        subject: options.subject,
        text: `body of ${options.subject}\n`,
      });

  beforeAll(async () => {
    rx = await startReceiver();
    dns = await startDnsServer({
      "loop.test": { mx: [{ priority: 10, exchange: "mx.loop.test" }] },
      "mx.loop.test": { a: ["127.0.0.1"] },
    });
    postfix = await startPostfix({ domain: "home.test" });
    relayPort = await freePort();
    edge = await makeEdge({
      overrides: {
        transports: { "remote.test": `127.0.0.1:${rx.port}` },
        dnsServers: [dns.address],
        "outbound.retryMin": 100,
        "outbound.retryMax": 400,
      },
    });
    home = await makeHome(
      await edge.token(),
      { "postfix.inject": `127.0.0.1:${postfix.injectPort}`, relayListen: `127.0.0.1:${relayPort}` },
      "lab-home",
    );
    await postfix.postconf(["-e", `relayhost = [127.0.0.1]:${relayPort}`]);
  }, 120_000);

  afterAll(async () => {
    await cleanupAgents();
    await postfix?.stop();
    await rx?.stop();
    await dns?.stop();
  });

  it.skipIf(!hasDkimpy)(
    "delivers to the remote MX with EHLO = edge hostname, the envelope intact and a DKIM signature python3-dkim accepts",
    async () => {
      const subject = tag();
      await submit({ to: "someone@remote.test", subject });
      const [delivery] = await waitFor(
        () => (rx.withSubject(subject).length ? rx.withSubject(subject) : undefined),
        {
          timeoutMs: 20_000,
          what: "the message at the remote MX",
        },
      );
      expect(delivery!.ehlo).toBe("mx.edge.test");
      expect(delivery!.mailFrom).toBe("alice@home.test");
      expect(delivery!.rcptTo).toEqual(["someone@remote.test"]);
      expect(delivery!.message).toMatch(
        /^DKIM-Signature: v=1; a=rsa-sha256; c=relaxed\/relaxed; d=home\.test;/,
      );
      const record = (await dkimRecords(edge.dir)).find((r) => r.domain === "home.test")!;
      expect(record.selector).toMatch(/^mxt-[0-9a-f]{8}-\d{6}$/);
      expect(delivery!.message).toContain(`s=${record.selector};`);
      const verdict = dkimVerify(delivery!.message, record.name, record.record);
      expect(verdict.ok, verdict.output).toBe(true);
      // Postfix's own Received line shows the mail went through the home Postfix first.
      expect(delivery!.message).toMatch(/Received: from .*\r?\n?.*by mx\.home\.test/);
      await waitFor(() => edge.agent.outbound.size === 0, { what: "the outbound queue to empty" });
    },
  );

  it("refuses a foreign MAIL FROM and a foreign header From at the relay listener; nothing is sent", async () => {
    const before = rx.attempts.length;
    const queuedBefore = edge.agent.outbound.counters.queued;
    const foreignSender = await submit({
      port: relayPort,
      from: "mallory@evil.test",
      to: "x@remote.test",
      subject: tag(),
    })
      .then(() => "accepted")
      .catch((e: { responseCode?: number; response?: string }) => `${e.responseCode} ${e.response}`);
    expect(foreignSender).toMatch(/^550 .*5\.7\.1 sender <mallory@evil\.test> is not in this home's domains/);
    const foreignHeader = await submit({
      port: relayPort,
      from: "alice@home.test",
      headerFrom: "ceo@bank.test",
      to: "x@remote.test",
      subject: tag(),
    })
      .then(() => "accepted")
      .catch((e: { responseCode?: number; response?: string }) => `${e.responseCode} ${e.response}`);
    expect(foreignHeader).toMatch(
      /^550 .*5\.7\.1 header From <ceo@bank\.test> is not in this home's domains/,
    );
    // A good message right after proves the listener still works, and is the only one sent.
    const subject = tag();
    await submit({ port: relayPort, to: "ok@remote.test", subject });
    await waitFor(() => rx.withSubject(subject).length === 1, { what: "the good message" });
    expect(rx.attempts.length).toBe(before + 1);
    expect(edge.agent.outbound.counters.queued).toBe(queuedBefore + 1);
  });

  it("refuses an MX that points at 127.0.0.1 (test resolver) for good and sends a DSN to the sender's Maildir", async () => {
    const before = (await postfix.messages("alice")).length;
    const subject = tag();
    await submit({ to: "someone@loop.test", subject });
    const messages = await postfix.waitForMessages("alice", before + 1, 30_000);
    const dsn = messages.find((m) => m.includes(subject) && m.includes("report-type=delivery-status"));
    expect(dsn, messages.join("\n----\n")).toBeDefined();
    expect(dsn).toMatch(/Final-Recipient: rfc822; someone@loop\.test/);
    expect(dsn).toMatch(/Action: failed/);
    expect(dsn).toMatch(/Status: 5\.4\.4/);
    expect(dsn).toMatch(/Return-Path: <>/);
    expect(dns.queries).toContain("mx.loop.test/1");
    await waitFor(() => edge.agent.outbound.size === 0, { what: "the outbound queue to empty" });
  });

  it("retries after a 4xx from the receiving server, then delivers", async () => {
    const subject = tag();
    let refusals = 0;
    rx.plan((message) => {
      if (message.includes(`Subject: ${subject}\r\n`) && refusals < 2) {
        refusals++;
        return { code: 451, text: "4.3.0 try again later" };
      }
      return "accept";
    });
    await submit({ to: "later@remote.test", subject });
    await waitFor(() => rx.withSubject(subject).length === 1, {
      timeoutMs: 20_000,
      what: "delivery after the retries",
    });
    expect(refusals).toBe(2);
    expect(
      rx.attempts.filter((a) => a.subject === subject).map((a) => (a.plan === "accept" ? 250 : 451)),
    ).toEqual([451, 451, 250]);
    await waitFor(() => edge.agent.outbound.size === 0, { what: "the outbound queue to empty" });
    rx.plan(() => "accept");
  });

  it("turns a 5xx into a DSN that lands in the home Postfix's Maildir, and empties the queue", async () => {
    const subject = tag();
    rx.plan((message) =>
      message.includes(`Subject: ${subject}\r\n`) ? { code: 550, text: "5.1.1 no such user here" } : "accept",
    );
    const before = (await postfix.messages("alice")).length;
    await submit({ to: "nobody@remote.test", subject });
    const messages = await postfix.waitForMessages("alice", before + 1, 30_000);
    const dsn = messages.find((m) => m.includes(subject) && m.includes("report-type=delivery-status"));
    expect(dsn).toBeDefined();
    expect(dsn).toMatch(/From: Mail Delivery System <MAILER-DAEMON@mx\.edge\.test>/);
    expect(dsn).toMatch(/Status: 5\.1\.1/);
    expect(dsn).toMatch(/Diagnostic-Code: smtp; 550 5\.1\.1 no such user here/);
    expect(dsn).toMatch(/Content-Type: text\/rfc822-headers/);
    await waitFor(() => edge.agent.outbound.size === 0, { what: "the outbound queue to empty" });
    expect(await outboundQueueEntries(edge.dir)).toEqual([]);
    rx.plan(() => "accept");
  });

  it("keeps the mail in Postfix (451 4.4.1) while the tunnel is down and delivers it once it is back", async () => {
    await edge.stop();
    await waitFor(() => [...home.agent.links.values()].every((l) => !l.status().connected), {
      what: "home to notice the tunnel is down",
    });
    const subject = tag();
    await submit({ to: "patient@remote.test", subject });
    await postfix.waitForLog(/status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 451 4\.4\.1/, 20_000);
    expect(rx.withSubject(subject)).toHaveLength(0);
    await edge.restart();
    await waitFor(() => rx.withSubject(subject).length === 1, {
      timeoutMs: 60_000,
      what: "delivery after the tunnel came back",
    });
  });
});

describe.skipIf(!ready)("outbound mail survives kill -9 of the edge after RESULT", () => {
  let rx: Awaited<ReturnType<typeof startReceiver>>;
  let child: ChildProcess | undefined;

  beforeAll(async () => {
    rx = await startReceiver();
  });
  afterAll(async () => {
    if (child?.pid) killQuietly(child.pid, "SIGKILL");
    await cleanupAgents();
    await rx?.stop();
  });

  const startEdgeChild = async (dir: string, tunnelPort: number) => {
    const proc = spawn(process.execPath, [EDGE_CLI, "run", "--dir", dir], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    proc.stderr?.on("data", (c: Buffer) => {
      stderr += c.toString();
    });
    await waitForPort("127.0.0.1", tunnelPort, 15_000).catch((error: Error) => {
      throw new Error(`${error.message}\n${stderr}`);
    });
    return proc;
  };

  it("delivers after a restart, exactly once", async () => {
    const dir = await tempDir("edge-child");
    const [smtpPort, tunnelPort, relayPort] = [await freePort(), await freePort(), await freePort()];
    await initEdge({
      dir,
      hostname: "mx.edge.test",
      domains: ["home.test"],
      smtpListen: `127.0.0.1:${smtpPort}`,
      tunnelListen: `127.0.0.1:${tunnelPort}`,
      publicUrl: `ws://127.0.0.1:${tunnelPort}`,
    });
    const configPath = join(dir, "edge.json");
    const file = JSON.parse(await readFile(configPath, "utf8"));
    file.transports = { "remote.test": `127.0.0.1:${rx.port}` };
    file.stableAfter = 0;
    file.logLevel = "warn";
    await writeFile(configPath, JSON.stringify(file));
    const config = await loadEdgeConfigFrom(dir);
    const { token } = await issuePairingToken(await EdgeState.open(dir), config, { ttlMs: 600_000 });

    child = await startEdgeChild(dir, tunnelPort);
    const paired = await pairedHomeDir(token, "kill-home");
    const home = await startTestHome(paired.dir, { relayListen: `127.0.0.1:${relayPort}` });
    await home.agent.waitConnected(10_000);

    const subject = tag();
    rx.plan((message) => (message.includes(`Subject: ${subject}\r\n`) ? "hold" : "accept"));
    // Straight to the relay listener: its 250 is the edge's RESULT.
    const info = await nodemailer
      .createTransport({ host: "127.0.0.1", port: relayPort, secure: false, ignoreTLS: true })
      .sendMail({ from: "alice@home.test", to: "once@remote.test", subject, text: "survive\n" });
    expect(info.response).toMatch(/^250 2\.0\.0 queued on the edge as [0-9a-f]{32}/);
    await waitFor(() => rx.attempts.some((a) => a.subject === subject), {
      what: "the held delivery attempt",
    });

    const pid = child.pid!;
    child.kill("SIGKILL");
    await waitForExit(pid);
    expect((await outboundQueueEntries(dir)).map((e) => e.to)).toEqual([["once@remote.test"]]);

    rx.plan(() => "accept");
    child = await startEdgeChild(dir, tunnelPort);
    await waitFor(() => rx.withSubject(subject).length >= 1, {
      timeoutMs: 20_000,
      what: "delivery after restart",
    });
    await waitFor(async () => (await outboundQueueEntries(dir)).length === 0, { what: "the queue to empty" });
    expect(rx.withSubject(subject)).toHaveLength(1);
    expect(rx.withSubject(subject)[0]!.ehlo).toBe("mx.edge.test");
  });
});
