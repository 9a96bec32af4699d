// Issue 9 end to end: mail clients reach a real Dovecot (IMAP) and a real Postfix (submission with SASL
// via Dovecot) through edge `forwards` and home `services`, with the real client address carried by
// PROXY v2; a service home does not list is refused without home opening any connection; a 20 MB IMAP
// FETCH arrives intact with the tunnel's buffers within their budgets.
import { execFile } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { chmod, chown, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { PassThrough } from "node:stream";
import { promisify } from "node:util";
import { type HomeAgent, loadHomeConfigFrom, startHome } from "@mxtunnel/home";
import { createLogger, INITIAL_STREAM_CREDIT, type Mux } from "@mxtunnel/shared";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cleanupAgents, makeEdge, pairedHomeDir, type TestEdge } from "../helpers/agents.js";
import { type DovecotLab, startDovecot } from "./lab/dovecot.js";
import { freePort } from "./lab/ports.js";
import { ensureUser, type PostfixLab, startPostfix } from "./lab/postfix.js";
import { requireTools } from "./lab/require-tools.js";
import { waitFor } from "./lab/wait.js";

const exec = promisify(execFile);
const ready = requireTools(["root", "postfix", "dovecot", "swaks"], "forwards e2e suite (issue 9)");

const BIG_MESSAGE_BYTES = 20 * 1024 * 1024;
/** The mux defaults (packages/shared/src/mux.ts): what one tunnel may hold, whatever the traffic. */
const TUNNEL_BUDGET = 4 * 1024 * 1024;
const MAX_BUFFERED_AMOUNT = 1024 * 1024;
const MAX_FRAME = 65_535;

/** A message of at least `size` bytes with CRLF line ends (Dovecot serves it byte for byte), tagged. */
function bigMessage(size: number, tag: string): Buffer {
  const head = Buffer.from(
    `From: bob@home.test\r\nTo: alice@home.test\r\nSubject: ${tag}\r\nMessage-ID: <${tag}@home.test>\r\n\r\n`,
  );
  const lines: Buffer[] = [head];
  let length = head.length;
  while (length < size) {
    const line = Buffer.from(`${randomBytes(57).toString("base64")}\r\n`); // 76 characters + CRLF
    lines.push(line);
    length += line.length;
  }
  return Buffer.concat(lines, length);
}

/** A raw IMAP client from a chosen loopback address (bytes kept as Buffers: a FETCH literal is binary-safe). */
async function imapClient(port: number, localAddress: string) {
  const socket = net.connect({ host: "127.0.0.1", port, localAddress });
  const chunks: Buffer[] = [];
  let length = 0;
  let tail = "";
  let closed = false;
  const onChunk: ((chunk: Buffer) => void)[] = [];
  socket.on("data", (chunk: Buffer) => {
    chunks.push(chunk);
    length += chunk.length;
    tail = (tail + chunk.toString("latin1")).slice(-4096);
    for (const listener of onChunk) listener(chunk);
  });
  socket.on("error", () => {});
  socket.on("close", () => {
    closed = true;
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  const all = () => Buffer.concat(chunks, length);
  const until = (pattern: RegExp, what: string, timeoutMs = 15_000) =>
    waitFor(() => pattern.test(tail), {
      timeoutMs,
      intervalMs: 5,
      what: `${what} (tail: ${tail.slice(-200)})`,
    });
  return {
    socket,
    onChunk,
    all,
    text: () => all().toString("latin1"),
    closed: () => closed,
    until,
    /** Sends a tagged command and waits for its tagged completion. */
    async command(tag: string, line: string, timeoutMs?: number): Promise<string> {
      socket.write(`${tag} ${line}\r\n`);
      await until(
        new RegExp(`(^|\\r\\n)${tag} (OK|NO|BAD)[^\\r\\n]*\\r\\n$`),
        `${tag}'s completion`,
        timeoutMs,
      );
      return /(OK|NO|BAD)[^\r\n]*\r\n$/.exec(tail)?.[0] ?? "";
    },
  };
}

interface Capture {
  lines: Record<string, unknown>[];
}

function capturingLogger(name: string) {
  const capture: Capture = { lines: [] };
  const sink = new PassThrough();
  let pending = "";
  sink.on("data", (chunk: Buffer) => {
    pending += chunk.toString("utf8");
    let newline = pending.indexOf("\n");
    while (newline >= 0) {
      capture.lines.push(JSON.parse(pending.slice(0, newline)) as Record<string, unknown>);
      pending = pending.slice(newline + 1);
      newline = pending.indexOf("\n");
    }
  });
  return { logger: createLogger({ name, level: "info", destination: sink }), capture };
}

describe.skipIf(!ready)("mail clients through edge forwards (real Dovecot and Postfix)", () => {
  let dovecot: DovecotLab;
  let postfix: PostfixLab;
  let edge: TestEdge;
  let home: HomeAgent;
  let homeLog: Capture;
  let mailRoot: string;
  let bigFile: Buffer;
  const counted: net.Socket[] = [];
  let countingServer: net.Server;
  const ports = { imap: 0, submission: 0, secret: 0, probe: 0, counting: 0 };

  beforeAll(async () => {
    // alice's IMAP mailbox: a private Maildir holding one 20 MB message for the bulk fetch.
    const alice = await ensureUser("alice");
    mailRoot = await mkdtemp(path.join(os.tmpdir(), "mxtunnel-forwards-mail-"));
    await chown(mailRoot, 0, 0);
    const maildir = path.join(mailRoot, "Maildir");
    for (const sub of ["", "cur", "new", "tmp"]) {
      await mkdir(path.join(maildir, sub), { mode: 0o700 });
      await chown(path.join(maildir, sub), alice.uid, alice.gid);
    }
    await chmod(mailRoot, 0o755);
    bigFile = bigMessage(BIG_MESSAGE_BYTES, `bulk-${randomBytes(4).toString("hex")}`);
    const bigPath = path.join(maildir, "new", `${Date.now()}.mxtunnel-bulk.${os.hostname()}`);
    await writeFile(bigPath, bigFile, { mode: 0o600 });
    await chown(bigPath, alice.uid, alice.gid);

    dovecot = await startDovecot({ authListener: true, maildir });
    postfix = await startPostfix({ dovecotAuthPort: dovecot.authPort ?? 0 });
    expect(postfix.submissionPort).toBeDefined();
    // The lab's submission listener takes clients directly; behind the tunnel it must read the PROXY
    // header home writes (what `mxtunnel-home postfix-config` prints for a `submission` service).
    await postfix.postconf([
      "-P",
      `127.0.0.1:${postfix.submissionPort}/inet/smtpd_upstream_proxy_protocol=haproxy`,
    ]);

    // Where a service home does NOT list would point: it counts every connection it gets.
    countingServer = net.createServer((socket) => {
      counted.push(socket);
      socket.on("error", () => {});
    });
    await new Promise<void>((resolve) => countingServer.listen(0, "127.0.0.1", resolve));
    ports.counting = (countingServer.address() as net.AddressInfo).port;

    for (const key of ["imap", "submission", "secret", "probe"] as const) ports[key] = await freePort();
    edge = await makeEdge({
      overrides: {
        forwards: [
          { listen: `127.0.0.1:${ports.imap}`, service: "imap" },
          { listen: `127.0.0.1:${ports.submission}`, service: "submission" },
          { listen: `127.0.0.1:${ports.secret}`, service: "secret" },
          { listen: `127.0.0.1:${ports.probe}`, service: "probe" },
        ],
      },
    });
    const { dir } = await pairedHomeDir(await edge.token(), "lab-home");
    const config = await loadHomeConfigFrom(dir, {
      allowPrivateClientIPs: true,
      "postfix.inject": `127.0.0.1:${postfix.injectPort}`,
      services: {
        imap: { target: `127.0.0.1:${dovecot.imapPort}` },
        submission: { target: `127.0.0.1:${postfix.submissionPort}` },
        // The positive control for the counting listener; "secret" is deliberately absent.
        probe: { target: `127.0.0.1:${ports.counting}` },
      },
      "reconnect.minDelay": 50,
      "reconnect.maxDelay": 200,
    });
    const captured = capturingLogger("home");
    homeLog = captured.capture;
    home = await startHome({ dir, config, logger: captured.logger });
    await home.waitConnected(10_000);
    for (const link of home.links.values()) await link.currentMux?.ping();
  }, 180_000);

  afterAll(async () => {
    await home?.stop();
    await cleanupAgents();
    for (const socket of counted) socket.destroy();
    countingServer?.close();
    await postfix?.stop();
    await dovecot?.stop();
    if (mailRoot) await rm(mailRoot, { recursive: true, force: true });
  });

  it("IMAP LOGIN through the edge reaches Dovecot, which logs the client's address (rip=127.0.0.2)", async () => {
    const client = await imapClient(ports.imap, "127.0.0.2");
    // A LOGIN sent before the banner may be cut off ("auth process not ready").
    await client.until(/^\* OK[^\r\n]*\r\n$/, "Dovecot's banner");
    expect(await client.command("a1", `LOGIN ${dovecot.user} ${dovecot.password}`)).toMatch(/^OK/);
    expect(await client.command("a2", "LOGOUT")).toMatch(/^OK/);
    const log = await dovecot.waitForLog(/imap-login: (Info: )?Login: user=<alice>.*rip=127\.0\.0\.2/);
    const logins = log.split("\n").filter((line) => /imap-login: (Info: )?Login: user=<alice>/.test(line));
    console.info(`Dovecot: ${logins.at(-1)?.replace(/^.*imap-login/, "imap-login")}`);
    // lip is the address the client dialled on the edge; nothing logged home's own address as the client.
    expect(logins.at(-1)).toMatch(/rip=127\.0\.0\.2, lip=127\.0\.0\.1/);
    expect(logins.some((line) => /rip=127\.0\.0\.1\b/.test(line))).toBe(false);
  });

  it("submission through the edge: STARTTLS and AUTH against the real Postfix, logged with the client's address", async () => {
    const before = (await postfix.messages("bob")).length;
    const tag = `sub-${randomBytes(4).toString("hex")}`;
    const common = [
      "--timeout",
      "20",
      "--server",
      "127.0.0.1",
      "--port",
      String(ports.submission),
      "--local-interface",
      "127.0.0.2",
      "--ehlo",
      "laptop.example.net",
      "--tls",
      "--from",
      `alice@${postfix.domain}`,
      "--to",
      `bob@${postfix.domain}`,
    ];
    const run = async (args: string[]) => {
      try {
        const { stdout, stderr } = await exec("swaks", args);
        return { code: 0, output: stdout + stderr };
      } catch (error) {
        const e = error as { code?: number; stdout?: string; stderr?: string };
        return { code: e.code ?? 1, output: `${e.stdout ?? ""}${e.stderr ?? ""}` };
      }
    };
    // Without AUTH the relay is refused: the tunnel does not make a mail client trusted.
    const anonymous = await run([...common, "--header", `Subject: ${tag}-anon`]);
    expect(anonymous.output).toMatch(/<~\* 554 5\.7\.1 .*Access denied/);

    const authed = await run([
      ...common,
      "--auth",
      "PLAIN",
      "--auth-user",
      dovecot.user,
      "--auth-password",
      dovecot.password,
      "--header",
      `Subject: ${tag}`,
    ]);
    expect(authed.code, authed.output).toBe(0);
    expect(authed.output).toMatch(/<~ {2}235 2\.7\.0 Authentication successful/);
    expect(authed.output).toMatch(/<~ {2}250 2\.0\.0 Ok: queued/);

    const log = await postfix.waitForLog(
      /client=unknown\[127\.0\.0\.2\], sasl_method=PLAIN, sasl_username=alice/,
    );
    const line = log.split("\n").find((l) => /sasl_username=alice/.test(l) && l.includes("127.0.0.2"));
    console.info(`Postfix: ${line?.replace(/^.*postfix\//, "postfix/")}`);
    expect(line).toMatch(/postfix\/submission\/smtpd/);
    const messages = await postfix.waitForMessages("bob", before + 1, 20_000);
    expect(messages.find((m) => m.includes(tag))).toMatch(
      /Received: from laptop\.example\.net \(unknown \[127\.0\.0\.2\]\)/,
    );
  });

  it("refuses a stream for a service home does not list, without opening any connection", async () => {
    expect(home.connector.counters.refusedService).toBe(0);
    const secret = await imapClient(ports.secret, "127.0.0.2");
    await waitFor(() => secret.closed(), { what: "the edge to close the refused client" });
    expect(secret.text()).toBe("");
    expect(home.connector.counters.refusedService).toBe(1);
    const refusal = homeLog.lines.find((l) => l.service === "secret");
    expect(refusal).toMatchObject({
      level: 40,
      msg: "the edge asked for a service this home does not list; refused",
    });
    expect(counted).toHaveLength(0);

    // Positive control: a listed service on the very same port does reach the counting listener, so
    // a connection for "secret" would have been seen.
    const probe = await imapClient(ports.probe, "127.0.0.2");
    await waitFor(() => counted.length === 1, { what: "the probe connection at the counting listener" });
    probe.socket.destroy();
    expect(home.connector.counters.refusedService).toBe(1);
    expect(counted).toHaveLength(1);
  });

  it("bulk IMAP FETCH of a 20 MB message: intact, with the tunnel's buffers within budget", async () => {
    const edgeMux = edge.agent.tunnels.liveTunnels()[0]?.mux;
    const homeMux = [...home.links.values()][0]?.currentMux;
    expect(edgeMux).toBeDefined();
    expect(homeMux).toBeDefined();
    const peak = {
      edgeReceive: 0,
      edgeQueued: 0,
      edgeTransport: 0,
      homeReceive: 0,
      homeQueued: 0,
      homeTransport: 0,
    };
    const sample = () => {
      const e = (edgeMux as Mux).stats();
      const h = (homeMux as Mux).stats();
      peak.edgeReceive = Math.max(peak.edgeReceive, e.receiveBuffered);
      peak.edgeQueued = Math.max(peak.edgeQueued, e.queuedBytes);
      peak.edgeTransport = Math.max(peak.edgeTransport, e.transportBuffered);
      peak.homeReceive = Math.max(peak.homeReceive, h.receiveBuffered);
      peak.homeQueued = Math.max(peak.homeQueued, h.queuedBytes);
      peak.homeTransport = Math.max(peak.homeTransport, h.transportBuffered);
    };
    const homeSentBefore = (homeMux as Mux).stats().bytesSent;
    const stalled = { inFlight: 0, edgeReceive: 0, homeQueued: 0 };
    let peakRss = process.memoryUsage().rss;
    const sampler = setInterval(() => {
      sample();
      peakRss = Math.max(peakRss, process.memoryUsage().rss);
    }, 10);

    const started = Date.now();
    const client = await imapClient(ports.imap, "127.0.0.3");
    client.onChunk.push(sample);
    try {
      await client.until(/^\* OK[^\r\n]*\r\n$/, "Dovecot's banner");
      expect(await client.command("b1", `LOGIN ${dovecot.user} ${dovecot.password}`)).toMatch(/^OK/);
      expect(await client.command("b2", "SELECT INBOX")).toMatch(/^OK/);
      const fetchFrom = client.all().length;
      // A slow reader first: the client stops reading, and the transfer must stall with the edge
      // holding no more than one stream window, the rest left in Dovecot and the kernel's buffers.
      const receivedBefore = (edgeMux as Mux).stats().bytesReceived;
      client.socket.pause();
      const fetched = client.command("b3", "FETCH 1 (BODY.PEEK[])", 120_000);
      let last = -1;
      let unchangedSince = Date.now();
      await waitFor(
        () => {
          sample();
          const now = (edgeMux as Mux).stats().bytesReceived;
          if (now !== last) {
            last = now;
            unchangedSince = Date.now();
            return false;
          }
          return now > receivedBefore && Date.now() - unchangedSince >= 300;
        },
        { timeoutMs: 30_000, intervalMs: 20, what: "the FETCH to stall behind the paused client" },
      );
      stalled.inFlight = last - receivedBefore;
      stalled.edgeReceive = (edgeMux as Mux).stats().receiveBuffered;
      stalled.homeQueued = (homeMux as Mux).stats().queuedBytes;
      client.socket.resume();
      expect(await fetched).toMatch(/^OK/);
      const response = client.all().subarray(fetchFrom);
      const header = /\* 1 FETCH \(BODY\[\] \{(\d+)\}\r\n/.exec(response.subarray(0, 200).toString("latin1"));
      expect(header).not.toBeNull();
      const size = Number(header?.[1]);
      const start = (header?.index ?? 0) + (header?.[0].length ?? 0);
      const literal = response.subarray(start, start + size);
      expect(size).toBe(bigFile.length);
      expect(size).toBeGreaterThanOrEqual(BIG_MESSAGE_BYTES);
      const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
      expect(sha(literal)).toBe(sha(bigFile));
      await client.command("b4", "LOGOUT");
    } finally {
      clearInterval(sampler);
      client.socket.destroy();
    }
    const seconds = (Date.now() - started) / 1000;
    const tunnelled = (homeMux as Mux).stats().bytesSent - homeSentBefore;
    const mib = (n: number) => `${(n / 1048576).toFixed(2)} MiB`;
    console.info(
      `20 MB IMAP FETCH through the edge: ${seconds.toFixed(2)} s, ${mib(tunnelled)} over the tunnel; peaks ` +
        `edge recv ${mib(peak.edgeReceive)} queued ${mib(peak.edgeQueued)} ws ${mib(peak.edgeTransport)}, ` +
        `home recv ${mib(peak.homeReceive)} queued ${mib(peak.homeQueued)} ws ${mib(peak.homeTransport)}; ` +
        `test process peak RSS ${mib(peakRss)} (includes the client's own copy of the message); ` +
        `stalled behind a paused client after ${mib(stalled.inFlight)} with edge recv ${mib(stalled.edgeReceive)}, ` +
        `home queued ${mib(stalled.homeQueued)}`,
    );
    // Backpressure reached Dovecot: with the client paused, the transfer stopped well short of the
    // message, and the edge held at most one stream window of it.
    expect(stalled.inFlight).toBeLessThan(BIG_MESSAGE_BYTES);
    expect(stalled.edgeReceive).toBeLessThanOrEqual(INITIAL_STREAM_CREDIT);
    // It really went through the tunnel (home → edge), not around it.
    expect(tunnelled).toBeGreaterThan(BIG_MESSAGE_BYTES);
    // What the edge holds unread stays within the tunnel budget, whatever the message size; what each
    // side queues for sending stays within a stream's window plus a socket read, and the WebSocket's
    // send buffer within the cap plus one frame.
    expect(peak.edgeReceive).toBeLessThanOrEqual(TUNNEL_BUDGET);
    expect(peak.homeReceive).toBeLessThanOrEqual(TUNNEL_BUDGET);
    expect(peak.homeQueued).toBeLessThanOrEqual(1024 * 1024);
    expect(peak.homeTransport).toBeLessThanOrEqual(MAX_BUFFERED_AMOUNT + MAX_FRAME);
    expect(peak.edgeTransport).toBeLessThanOrEqual(MAX_BUFFERED_AMOUNT + MAX_FRAME);
    // The sampler did see the transfer in flight (a bound on zeros would prove nothing).
    expect(peak.edgeReceive + peak.homeQueued + peak.homeTransport).toBeGreaterThan(0);
  });
});
