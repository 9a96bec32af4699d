// Tests of the e2e lab itself: the private Postfix takes PROXY-wrapped sessions on its inject port the way
// home will hand them over, refuses everything a tunnel must never be trusted with, and the private
// Dovecot sees the real client address through its haproxy listener.
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import net from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type DovecotLab, startDovecot } from "./lab/dovecot.js";
import { type PostfixLab, startPostfix } from "./lab/postfix.js";
import { requireTools, toolPath } from "./lab/require-tools.js";
import { isAlive, waitFor, waitForEvent } from "./lab/wait.js";

interface SwaksResult {
  code: number | null;
  output: string;
}

function swaks(args: string[]): Promise<SwaksResult> {
  return new Promise((resolve) => {
    execFile(
      toolPath("swaks"),
      ["--timeout", "15", ...args],
      { timeout: 25_000 },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === "number" ? error.code : null) : 0;
        resolve({ code, output: `${stdout}${stderr}` });
      },
    );
  });
}

/** swaks's PROXY v2 flags (v2 names the family AF_INET/AF_INET6; v1 would say TCP4/TCP6). */
function proxyV2(source: string, dest: string, family: "AF_INET" | "AF_INET6" = "AF_INET"): string[] {
  return [
    "--proxy-version",
    "2",
    "--proxy-family",
    family,
    "--proxy-protocol",
    "STREAM",
    "--proxy-source",
    source,
    "--proxy-source-port",
    "40000",
    "--proxy-dest",
    dest,
    "--proxy-dest-port",
    "25",
  ];
}

/** A raw client: collects what the server says until it closes the connection or the deadline passes. */
async function rawSession(
  port: number,
  host: string,
  script: (socket: net.Socket, received: () => string) => Promise<void>,
): Promise<{ received: string; closedByServer: boolean }> {
  const socket = net.connect({ host, port });
  let received = "";
  let closedByServer = false;
  socket.setEncoding("utf8");
  socket.on("data", (chunk: string) => {
    received += chunk;
  });
  socket.on("end", () => {
    closedByServer = true;
  });
  socket.on("error", () => {
    closedByServer = true;
  });
  await waitForEvent(socket, "connect", 5_000);
  try {
    await script(socket, () => received);
  } finally {
    socket.destroy();
  }
  return { received, closedByServer };
}

const postfixReady = requireTools(["root", "postfix", "swaks", "openssl", "dovecot"], "Postfix lab tests");

describe.skipIf(!postfixReady)("Postfix lab", () => {
  let lab: PostfixLab;
  let auth: DovecotLab;

  beforeAll(async () => {
    // Dovecot's auth service backs the submission port's SASL.
    auth = await startDovecot({ authListener: true });
    lab = await startPostfix({ dovecotAuthPort: auth.authPort ?? 0 });
  });

  afterAll(async () => {
    await lab?.stop();
    await auth?.stop();
  });

  it("delivers a PROXY v2 session on the inject port to alice's Maildir, logged with the real client", async () => {
    const result = await swaks([
      "--server",
      `127.0.0.1:${lab.injectPort}`,
      ...proxyV2("203.0.113.9", "198.51.100.1"),
      "--helo",
      "orig-helo.example.net",
      "--from",
      "sender@example.net",
      "--to",
      `alice@${lab.domain}`,
      "--header",
      "Subject: lab proxy v4",
    ]);
    expect(result.output).toMatch(/<- {2}250 2\.0\.0 Ok: queued/);
    const [message] = await lab.waitForMessages("alice", 1, 15_000);
    expect(message).toContain("Subject: lab proxy v4");
    expect(message).toContain("(unknown [203.0.113.9])");
    const log = await lab.waitForLog("client=unknown[203.0.113.9]");
    expect(log).toMatch(/status=sent/);
  });

  it("refuses a recipient in a foreign domain on the inject port (no relay for tunnelled sessions)", async () => {
    const result = await swaks([
      "--server",
      `127.0.0.1:${lab.injectPort}`,
      ...proxyV2("203.0.113.10", "198.51.100.1"),
      "--from",
      "sender@example.net",
      "--to",
      "victim@foreign.example",
    ]);
    expect(result.code).not.toBe(0);
    expect(result.output).toMatch(/<\*\* +(454|554) [45]\.7\.1 .*Relay access denied/);
  });

  it("drops a session on the inject port that does not start with a PROXY header", async () => {
    const session = await rawSession(lab.injectPort, "127.0.0.1", async (socket) => {
      socket.write("EHLO sneaky.example\r\n");
      await waitFor(() => socket.readableEnded || socket.destroyed, {
        timeoutMs: 10_000,
        what: "Postfix to drop the session",
      });
    });
    expect(session.closedByServer).toBe(true);
    expect(session.received).not.toMatch(/^220/m);
    await lab.waitForLog(/postfix\/inject\/smtpd\[\d+\]: warning: haproxy read: /);
  });

  it("rejects a bare LF in DATA on the inject port", async () => {
    const session = await rawSession(lab.injectPort, "127.0.0.1", async (socket, received) => {
      const until = (pattern: RegExp, what: string) =>
        waitFor(() => pattern.test(received()), { timeoutMs: 10_000, what });
      socket.write("PROXY TCP4 203.0.113.11 198.51.100.1 40000 25\r\n");
      await until(/^220 /m, "the banner");
      socket.write("EHLO smuggler.example\r\nMAIL FROM:<s@example.net>\r\n");
      await until(/^250 2\.1\.0/m, "MAIL accepted");
      socket.write(`RCPT TO:<alice@${lab.domain}>\r\nDATA\r\n`);
      await until(/^354 /m, "DATA go-ahead");
      socket.write("Subject: smuggle\r\n\r\nline one\nline two\r\n.\r\n");
      await until(/^5\d\d .*bare <LF>/im, "the bare-LF refusal");
    });
    expect(session.received).toMatch(/^5\d\d .*bare <LF>/im);
  });

  it("does STARTTLS on the inject port after a PROXY header", async () => {
    const result = await swaks([
      "--server",
      `127.0.0.1:${lab.injectPort}`,
      ...proxyV2("203.0.113.12", "198.51.100.1"),
      "--tls",
      "--from",
      "sender@example.net",
      "--to",
      `bob@${lab.domain}`,
      "--header",
      "Subject: lab tls",
    ]);
    expect(result.output).toContain("TLS started");
    expect(result.output).toMatch(/<~ {2}250 2\.0\.0 Ok: queued/);
    await lab.waitForLog(/TLS connection established from unknown\[203\.0\.113\.12\]/);
    const messages = await lab.waitForMessages("bob", 1, 15_000);
    expect(messages.some((m) => m.includes("Subject: lab tls"))).toBe(true);
  });

  it("logs the IPv6 source of a TCP6 PROXY header, over IPv4 and over [::1]", async (context) => {
    if (!lab.ipv6) context.skip("no IPv6 loopback on this machine");
    const servers = [
      ["--server", "127.0.0.1", "--port", String(lab.injectPort)],
      ["-6", "--server", "::1", "--port", String(lab.injectPort)],
    ];
    for (const [i, server] of servers.entries()) {
      const result = await swaks([
        ...server,
        ...proxyV2(`2001:db8::${7 + i}`, "2001:db8::1", "AF_INET6"),
        "--from",
        "sender@example.net",
        "--to",
        `alice@${lab.domain}`,
        "--header",
        `Subject: lab proxy v6 ${i}`,
      ]);
      expect(result.output).toMatch(/<- {2}250 2\.0\.0 Ok: queued/);
      await lab.waitForLog(`client=unknown[2001:db8::${7 + i}]`);
    }
    const messages = await lab.waitForMessages("alice", 3, 15_000);
    expect(messages.some((m) => m.includes("(unknown [IPv6:2001:db8::8])"))).toBe(true);
  });

  it("accepts mail on the plain port (no PROXY) from loopback", async () => {
    const result = await swaks([
      "--server",
      `127.0.0.1:${lab.smtpPort}`,
      "--from",
      "sender@example.net",
      "--to",
      `bob@${lab.domain}`,
      "--header",
      "Subject: lab plain",
    ]);
    expect(result.output).toMatch(/<- {2}250 2\.0\.0 Ok: queued/);
    await waitFor(async () => (await lab.messages("bob")).some((m) => m.includes("Subject: lab plain")), {
      timeoutMs: 15_000,
      what: "the plain-port message in bob's Maildir",
    });
  });

  it("relays on the submission port only after SASL AUTH against Dovecot", async () => {
    const port = lab.submissionPort;
    expect(port).toBeDefined();
    const common = ["--server", `127.0.0.1:${port}`, "--tls", "--from", `alice@${lab.domain}`];
    const anonymous = await swaks([...common, "--to", "someone@foreign.example"]);
    expect(anonymous.output).toMatch(/<~\* 554 5\.7\.1 .*Access denied/);
    const authed = await swaks([
      ...common,
      "--auth",
      "PLAIN",
      "--auth-user",
      auth.user,
      "--auth-password",
      auth.password,
      "--to",
      `bob@${lab.domain}`,
      "--header",
      "Subject: lab submission",
    ]);
    expect(authed.output).toMatch(/<~ {2}235 2\.7\.0 Authentication successful/);
    expect(authed.output).toMatch(/<~ {2}250 2\.0\.0 Ok: queued/);
    await lab.waitForLog("sasl_method=PLAIN, sasl_username=alice");
  });

  it("applies postconf edits (with a reload) and reports the configured size limit", async () => {
    expect((await lab.postconf(["-h", "message_size_limit"])).trim()).toBe("10240000");
    await lab.postconf(["-e", "message_size_limit = 61000000"]);
    expect((await lab.postconf(["-h", "message_size_limit"])).trim()).toBe("61000000");
    const result = await swaks(["--server", `127.0.0.1:${lab.smtpPort}`, "--quit-after", "EHLO"]);
    expect(result.output).toContain("250-SIZE 61000000");
  });

  it("starts concurrent instances and leaves nothing behind when they stop", async () => {
    const started = Date.now();
    const labs = await Promise.all([
      startPostfix({ tls: false }),
      startPostfix({ tls: false, users: ["bob"] }),
    ]);
    const startMs = Date.now() - started;
    const listed = () => readFile("/etc/postfix/main.cf", "utf8");
    for (const other of labs) expect(await listed()).toContain(`${other.dir}/etc`);
    const stopping = Date.now();
    await Promise.all(labs.map((l) => l.stop()));
    const stopMs = Date.now() - stopping;
    for (const other of labs) {
      expect(isAlive(other.masterPid)).toBe(false);
      expect(existsSync(other.dir)).toBe(false);
      expect(await listed()).not.toContain(other.dir);
    }
    console.info(`two Postfix labs: start ${startMs} ms, stop ${stopMs} ms (concurrently)`);
  });
});

const dovecotReady = requireTools(["root", "dovecot"], "Dovecot lab tests");

describe.skipIf(!dovecotReady)("Dovecot lab", () => {
  let dovecot: DovecotLab;

  beforeAll(async () => {
    dovecot = await startDovecot();
  });

  afterAll(async () => {
    await dovecot?.stop();
  });

  it("logs the PROXY v1 source of an IMAP LOGIN through the haproxy listener", async () => {
    const session = await rawSession(dovecot.imapPort, "127.0.0.1", async (socket, received) => {
      const until = (pattern: RegExp, what: string) =>
        waitFor(() => pattern.test(received()), { timeoutMs: 10_000, what });
      socket.write("PROXY TCP4 203.0.113.7 127.0.0.1 40000 993\r\n");
      // A LOGIN sent before the banner may be cut off ("auth process not ready").
      await until(/^\* OK/m, "the IMAP banner");
      socket.write(`a1 LOGIN ${dovecot.user} ${dovecot.password}\r\n`);
      await until(/^a1 (OK|NO|BAD)/m, "the LOGIN reply");
      socket.write("a2 LOGOUT\r\n");
      await until(/^a2 OK/m, "the LOGOUT reply");
    });
    expect(session.received).toMatch(/^a1 OK/m);
    const log = await dovecot.waitForLog(/imap-login: (Info: )?Login: user=<alice>.*rip=203\.0\.113\.7/);
    expect(log).toMatch(/rip=203\.0\.113\.7, lip=127\.0\.0\.1/);
  });

  it("refuses a session without a PROXY header on the haproxy listener", async () => {
    const session = await rawSession(dovecot.imapPort, "127.0.0.1", async (socket) => {
      socket.write("a1 LOGIN alice secret\r\n");
      await waitFor(() => socket.readableEnded || socket.destroyed, {
        timeoutMs: 10_000,
        what: "Dovecot to drop the session",
      });
    });
    expect(session.received).not.toMatch(/^a1 OK/m);
  });

  it("stops without leaving a Dovecot behind", async () => {
    const other = await startDovecot({ user: "bob", password: "hunter2" });
    await other.stop();
    expect(isAlive(other.masterPid)).toBe(false);
    expect(existsSync(other.dir)).toBe(false);
  });
});
