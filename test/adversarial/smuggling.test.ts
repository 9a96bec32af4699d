// SMTP smuggling and STARTTLS injection. Every end-of-data look-alike built from bare CR, bare LF
// and NUL, sent step by step and pipelined, through both inbound modes (spool: the edge's guard;
// live: Postfix's smtpd_forbid_bare_newline=reject must hold through the tunnel) and through the
// outbound relay (home relay listener → edge → a raw receiving MTA that records the exact bytes).
// Never two messages, never a second envelope. Then plaintext pipelined behind STARTTLS, whole lines
// and partial ones: never executed, and nothing from before TLS survives it.
import { once } from "node:events";
import net from "node:net";
import tls from "node:tls";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { PostfixLab } from "../e2e/lab/postfix.js";
import { requireTools } from "../e2e/lab/require-tools.js";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents, type TestEdge } from "../helpers/agents.js";
import {
  closeAllClients,
  liveLab,
  relayLab,
  type SmtpClient,
  type SpoolLab,
  smtpConnect,
  smtpOver,
  spoolLab,
  Tally,
} from "./support.js";

const tally = new Tally("smuggling");
afterAll(() => tally.flush());
afterEach(() => closeAllClients());

/** End-of-data look-alikes: none of them contains the one real terminator, CRLF . CRLF. */
const ENDINGS = (() => {
  const breaks = ["\r\n", "\n", "\r"];
  const out: string[] = [];
  for (const before of breaks) for (const after of breaks) out.push(`${before}.${after}`);
  out.push(
    "\r\n\0.\r\n",
    "\r\n.\0\r\n",
    "\0\r\n.\r\n",
    "\r\n.\r\0\n",
    "\n\r.\r\n",
    "\r\n.\n\r\n",
    "\r\n \r\n.\n",
  );
  return out.filter((e) => !e.includes("\r\n.\r\n"));
})();

/** The body: an outer message, a look-alike ending, a smuggled second transaction, the real end. */
function smuggle(ending: string, domain: string, marker: string): string {
  return (
    `From: outer@example.net\r\nSubject: outer ${marker}\r\n\r\nfirst${ending}` +
    `MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@${domain}>\r\nDATA\r\n` +
    `From: evil@example.net\r\nSubject: smuggled ${marker}\r\n\r\nsmuggled\r\n.\r\n`
  );
}

interface Attempt {
  replies: string[];
  closed: boolean;
}

/** One transaction carrying a smuggling body: step by step, or with every command pipelined. */
async function attempt(
  port: number,
  domain: string,
  ending: string,
  marker: string,
  pipelined: boolean,
): Promise<Attempt> {
  const { client } = await smtpConnect(port);
  const replies: string[] = [];
  const take = async () => {
    const r = await client.reply();
    if (r) replies.push(r);
    return r;
  };
  if (pipelined) {
    client.send(
      `EHLO smuggler.example\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<alice@${domain}>\r\nDATA\r\n`,
    );
    for (let i = 0; i < 4; i++) if (!(await take())) break;
    if (replies.at(-1)?.startsWith("354")) {
      client.send(`${smuggle(ending, domain, marker)}QUIT\r\n`);
      while (await take());
    }
  } else {
    for (const line of [
      "EHLO smuggler.example",
      "MAIL FROM:<a@example.net>",
      `RCPT TO:<alice@${domain}>`,
      "DATA",
    ]) {
      client.send(`${line}\r\n`);
      if (!(await take())) break;
    }
    if (replies.at(-1)?.startsWith("354")) {
      client.send(smuggle(ending, domain, marker));
      if (await take()) {
        // Anything the server reads after the real end must be this one QUIT, nothing smuggled.
        client.send("QUIT\r\n");
        while (await take());
      }
    }
  }
  client.close();
  return { replies, closed: client.closed() };
}

/** 250 replies to the smuggled MAIL/RCPT/DATA or a second "queued" would mean a second envelope. */
function secondEnvelope(replies: string[]): boolean {
  const afterData = replies.slice(replies.findIndex((r) => r.startsWith("354")) + 1);
  return (
    afterData.filter((r) => /^(250|354)/.test(r)).length > 1 || afterData.some((r) => r.startsWith("354"))
  );
}

describe("smuggling: spool mode (the edge's guard)", () => {
  let lab: SpoolLab;

  beforeAll(async () => {
    lab = await spoolLab({ "spool.messagesPerIpPerMinute": 100_000 });
  }, 60_000);
  afterAll(cleanupAgents);

  it("refuses every look-alike with 550 5.6.0, stepwise and pipelined; nothing is spooled", async () => {
    let tried = 0;
    const accepted: string[] = [];
    for (const pipelined of [false, true]) {
      for (const ending of ENDINGS) {
        tried++;
        const result = await attempt(lab.edge.smtpPort, "home.test", ending, `s${tried}`, pipelined);
        const final = result.replies.find((r) => !/^(220|250|354)/.test(r) || /queued/.test(r));
        if (secondEnvelope(result.replies) || result.replies.some((r) => /queued/.test(r))) {
          accepted.push(`${JSON.stringify(ending)} pipelined=${pipelined}: ${result.replies.join(" | ")}`);
        }
        expect(final, JSON.stringify(ending)).toMatch(/^550 5\.6\.0/);
      }
    }
    tally.add("smuggling: spool mode", { tried, accepted: accepted.length });
    expect(accepted).toEqual([]);
    expect(lab.edge.agent.spool.store.size).toBe(0);
    expect(lab.edge.agent.spool.server.counters.smuggling).toBe(tried);
  }, 60_000);
});

/** A receiving MTA that records the exact bytes of each DATA (dot-stuffing and all). */
async function rawReceiver() {
  const messages: { rcpt: string[]; raw: Buffer }[] = [];
  const server = net.createServer((socket) => {
    socket.on("error", () => {});
    let buffer = Buffer.alloc(0);
    let inData = false;
    let rcpt: string[] = [];
    socket.write("220 rx.remote.test ESMTP raw receiver\r\n");
    socket.on("data", (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      for (;;) {
        if (inData) {
          const end = buffer.indexOf("\r\n.\r\n");
          if (end < 0) return;
          messages.push({ rcpt, raw: buffer.subarray(0, end + 2) });
          buffer = buffer.subarray(end + 5);
          inData = false;
          rcpt = [];
          socket.write("250 2.0.0 recorded\r\n");
          continue;
        }
        const eol = buffer.indexOf("\r\n");
        if (eol < 0) return;
        const line = buffer.subarray(0, eol).toString("latin1");
        buffer = buffer.subarray(eol + 2);
        const verb = line.slice(0, 4).toUpperCase();
        if (verb === "EHLO") socket.write("250-rx.remote.test\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n");
        else if (verb === "RCPT") {
          rcpt.push(line);
          socket.write("250 2.1.5 ok\r\n");
        } else if (verb === "DATA") {
          inData = true;
          socket.write("354 go ahead\r\n");
        } else if (verb === "QUIT") socket.end("221 2.0.0 bye\r\n");
        else socket.write("250 2.0.0 ok\r\n");
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    messages,
    stop: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe("smuggling: outbound, home relay listener → edge → remote MX", () => {
  let relayPort: number;
  let rx: Awaited<ReturnType<typeof rawReceiver>>;

  beforeAll(async () => {
    rx = await rawReceiver();
    ({ relayPort } = await relayLab({
      transports: { "remote.test": `127.0.0.1:${rx.port}` },
      "outbound.retryMin": 100,
      "outbound.retryMax": 400,
    }));
  }, 60_000);
  afterAll(async () => {
    await cleanupAgents();
    await rx?.stop();
  });

  it("never lets a look-alike leave the edge where a lenient receiver could read two messages", async () => {
    let tried = 0;
    const accepted: string[] = [];
    const relayed: string[] = [];
    for (const pipelined of [false, true]) {
      for (const ending of ENDINGS) {
        tried++;
        const marker = `o${tried}`;
        const { client } = await smtpConnect(relayPort, "127.0.0.1");
        const replies: string[] = [];
        const take = async () => {
          const r = await client.reply();
          if (r) replies.push(r);
          return r;
        };
        const body = smuggle(ending, "remote.test", marker).replace(
          "From: outer@example.net",
          "From: user@home.test",
        );
        if (pipelined) {
          client.send(
            "EHLO postfix.home.test\r\nMAIL FROM:<user@home.test>\r\nRCPT TO:<friend@remote.test>\r\nDATA\r\n",
          );
          for (let i = 0; i < 4; i++) await take();
          client.send(`${body}QUIT\r\n`);
          while (await take());
        } else {
          for (const line of [
            "EHLO postfix.home.test",
            "MAIL FROM:<user@home.test>",
            "RCPT TO:<friend@remote.test>",
            "DATA",
          ])
            await client.command(line).then((r) => r && replies.push(r));
          client.send(body);
          await take();
          client.send("QUIT\r\n");
          while (await take());
        }
        client.close();
        if (secondEnvelope(replies))
          accepted.push(`${JSON.stringify(ending)} pipelined=${pipelined}: second envelope`);
        if (replies.some((r) => /queued on the edge/.test(r))) relayed.push(marker);
      }
    }
    // Whatever was relayed reaches the receiver; then its bytes are checked.
    await waitFor(() => rx.messages.length >= relayed.length, {
      what: `${relayed.length} deliveries at the raw receiver`,
      timeoutMs: 30_000,
    });
    // The relay listener refuses bare CR, bare LF and NUL (550 5.6.0) like the inbound paths, so
    // nothing a lenient receiver could split may leave the edge — NUL beside the dot included.
    const nulPassed: string[] = [];
    for (const message of rx.messages) {
      const raw = message.raw.toString("latin1");
      const marker = /Subject: outer (\S+)/.exec(raw)?.[1] ?? "?";
      // A lenient receiver ends DATA at LF.LF, CR.CR and the mixed forms; none may be on the wire.
      if (/(\r(?!\n)|(?<!\r)\n)\.|\.(\r(?!\n)|(?<!\r)\n)/.test(raw)) {
        accepted.push(
          `${marker}: the edge sent a bare CR/LF next to a dot: ${JSON.stringify(raw.slice(0, 160))}`,
        );
      }
      if (raw.includes("\0")) nulPassed.push(marker);
      if (message.rcpt.some((r) => r.includes("bob@")))
        accepted.push(`${marker}: smuggled envelope delivered`);
    }
    tally.add("smuggling: outbound relay (relay listener → edge → MX), NUL included", {
      tried,
      accepted: accepted.length + nulPassed.length,
    });
    console.info(
      `outbound smuggling: ${relayed.length} of ${tried} look-alikes relayed; ${nulPassed.length} left the edge with a NUL`,
    );
    expect(nulPassed).toEqual([]);
    expect(accepted).toEqual([]);
    // Never a second message or envelope on the wire, NUL or not.
    expect(rx.messages).toHaveLength(relayed.length);
    expect(rx.messages.every((m) => m.rcpt.length === 1)).toBe(true);
  }, 90_000);
});

const ready = requireTools(["postfix", "postconf"], "adversarial smuggling (live) suite");

describe.skipIf(!ready)("smuggling and STARTTLS: live mode, Postfix behind the tunnel", () => {
  let postfix: PostfixLab;
  let edge: TestEdge;

  beforeAll(async () => {
    ({ postfix, edge } = await liveLab());
  }, 120_000);
  afterAll(cleanupAgents);

  it("never delivers a second message or envelope, stepwise and pipelined", async () => {
    let tried = 0;
    const accepted: string[] = [];
    for (const pipelined of [false, true]) {
      for (const ending of ENDINGS) {
        tried++;
        const result = await attempt(edge.smtpPort, postfix.domain, ending, `l${tried}`, pipelined);
        if (secondEnvelope(result.replies)) accepted.push(`${JSON.stringify(ending)} pipelined=${pipelined}`);
        if (/\n/.test(ending.replace(/\r\n/g, "")))
          expect(result.replies.join(""), JSON.stringify(ending)).toMatch(/bare <LF>|^5/m);
      }
    }
    // A sentinel to bob through the same path: once it is in, anything smuggled before it would be too.
    const { client } = await smtpConnect(edge.smtpPort);
    for (const line of [
      "EHLO sentinel.example",
      "MAIL FROM:<sentinel@example.net>",
      `RCPT TO:<bob@${postfix.domain}>`,
    ])
      expect(await client.command(line)).toMatch(/^250/);
    expect(await client.command("DATA")).toMatch(/^354/);
    client.send("Subject: sentinel\r\n\r\nsentinel\r\n.\r\n");
    expect(await client.reply()).toMatch(/^250/);
    const bob = await postfix.waitForMessages("bob", 1, 20_000);
    expect(bob.filter((m) => /Subject: sentinel/.test(m))).toHaveLength(1);
    const log = await postfix.log();
    const smuggledToBob = bob.filter((m) => /smuggled/.test(m)).length;
    const evilEnvelopes = (log.match(/from=<evil@example\.net>/g) ?? []).length;
    const alice = await postfix.messages("alice");
    const smuggledHeaders = alice.filter((m) =>
      /^Subject: smuggled/m.test(m.slice(0, m.indexOf("\n\n"))),
    ).length;
    accepted.push(
      ...Array(smuggledToBob + evilEnvelopes + smuggledHeaders).fill("smuggled message delivered"),
    );
    tally.add("smuggling: live mode (Postfix via tunnel)", { tried, accepted: accepted.length });
    console.info(
      `live smuggling: ${tried} attempts, ${alice.length} outer messages delivered whole to alice, ` +
        `${smuggledToBob} smuggled to bob, ${evilEnvelopes} smuggled envelopes in Postfix's log`,
    );
    expect(accepted).toEqual([]);
    expect(alice.length).toBeLessThanOrEqual(tried);
  }, 120_000);

  it("STARTTLS: plaintext pipelined behind it (whole or partial lines) is never executed", async () => {
    const cases = starttlsCases(postfix.domain);
    let executed = 0;
    for (const c of cases) {
      if (await starttlsInjection(edge.smtpPort, c, postfix.domain, /mxtunnel lab/)) executed++;
    }
    tally.add("STARTTLS injection: live mode (Postfix via tunnel)", {
      tried: cases.length,
      accepted: executed,
    });
    expect(executed).toBe(0);
  }, 60_000);
});

interface StarttlsCase {
  name: string;
  /** Sent in plaintext right behind "STARTTLS\r\n", in the same write. */
  injected: string;
  /** Sent first inside TLS; a fragment joined to it would complete the injected command. */
  firstInside: string;
}

function starttlsCases(domain: string): StarttlsCase[] {
  return [
    { name: "whole RCPT", injected: `RCPT TO:<alice@${domain}>\r\n`, firstInside: "" },
    {
      name: "whole MAIL+RCPT",
      injected: `MAIL FROM:<evil@example.net>\r\nRCPT TO:<alice@${domain}>\r\n`,
      firstInside: "",
    },
    { name: "partial MAIL", injected: "MAIL FROM:<evil@exa", firstInside: "mple.net>\r\n" },
    { name: "partial line end only", injected: "MAIL FROM:<evil@example.net>", firstInside: "\r\n" },
    {
      name: "whole EHLO then partial",
      injected: "EHLO evil\r\nMAIL FROM:<e",
      firstInside: "vil@example.net>\r\n",
    },
  ];
}

/**
 * One STARTTLS session with plaintext injected after the command. True when anything injected was
 * executed: a MAIL/RCPT taking effect inside TLS, or the pre-TLS MAIL FROM surviving the upgrade.
 */
async function starttlsInjection(
  port: number,
  c: StarttlsCase,
  domain: string,
  banner: RegExp,
): Promise<boolean> {
  const { client, banner: greeting } = await smtpConnect(port);
  expect(greeting).toMatch(banner);
  expect(await client.command("EHLO tls.example")).toMatch(/STARTTLS/);
  expect(await client.command("MAIL FROM:<before-tls@example.net>")).toMatch(/^250/);
  client.send(`STARTTLS\r\n${c.injected}`);
  const ready = await client.reply();
  expect(ready).toMatch(/^220/);
  client.socket.removeAllListeners("data");
  const secure = tls.connect({ socket: client.socket as net.Socket, rejectUnauthorized: false });
  const outcome = await Promise.race([
    once(secure, "secureConnect").then(() => "up" as const),
    once(secure, "close").then(() => "closed" as const),
    once(secure, "error").then(() => "closed" as const),
  ]);
  // A server that hangs up on plaintext behind STARTTLS executed nothing.
  if (outcome === "closed") return false;
  const inner: SmtpClient = smtpOver(secure);
  let executed = false;
  if (c.firstInside) {
    const r = await inner.command(c.firstInside.replace(/\r\n$/, ""));
    if (r && /^250/.test(r)) executed = true;
  }
  if (inner.closed()) return executed;
  // Without EHLO inside TLS nothing may be in progress: a RCPT needs a MAIL that must not exist.
  const rcpt = await inner.command(`RCPT TO:<alice@${domain}>`);
  if (rcpt && /^250/.test(rcpt)) executed = true;
  const ehlo = await inner.command("EHLO tls.example");
  if (ehlo && /^250/.test(ehlo)) {
    const after = await inner.command(`RCPT TO:<alice@${domain}>`);
    if (after && /^250/.test(after)) executed = true;
  }
  secure.destroy();
  return executed;
}

describe("STARTTLS: spool mode", () => {
  let lab: SpoolLab;
  beforeAll(async () => {
    lab = await spoolLab({ "spool.messagesPerIpPerMinute": 100_000 });
  }, 60_000);
  afterAll(cleanupAgents);

  it("plaintext pipelined behind STARTTLS (whole or partial lines) is never executed; pre-TLS state is gone", async () => {
    // Sessions a client simply drops inside TLS get the half-close grace before the edge closes them.
    lab.edge.agent.spool.server.deadlines.halfCloseMs = 300;
    const cases = starttlsCases("home.test");
    let executed = 0;
    for (const c of cases)
      if (await starttlsInjection(lab.edge.smtpPort, c, "home.test", /backup MX/)) executed++;
    tally.add("STARTTLS injection: spool mode", { tried: cases.length, accepted: executed });
    expect(executed).toBe(0);
    // Each TLS session gave its connection slot back (smtp-server strips the raw socket's listeners).
    await waitFor(() => lab.edge.agent.status().sessions.live === 0, {
      what: "every TLS session counted out",
    });
  }, 60_000);
});
