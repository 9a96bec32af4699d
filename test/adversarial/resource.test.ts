// Resource abuse against port 25: slowloris (a byte at a time, with short intervals standing in for
// "one a minute"), half-open and half-closed connections, 1000 recipients, over-long lines, and a
// handshake flood on the tunnel port from one address while a legit home connects and a live SMTP
// session gets its banner. Per-IP and total caps hold and other clients are served throughout.
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import * as fs from "node:fs/promises";
import net from "node:net";
import tls from "node:tls";
import { SUBPROTOCOL, TUNNEL_PATH } from "@mxtunnel/shared";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { type Mailbox, startMailbox } from "../../demo/src/mailbox.js";
import { waitFor } from "../e2e/lab/wait.js";
import {
  cleanupAgents,
  makeEdge,
  makeHome,
  pairedHomeDir,
  startTestHome,
  type TestEdge,
} from "../helpers/agents.js";
import {
  closeAllClients,
  type SmtpClient,
  type SpoolLab,
  smtpConnect,
  smtpOver,
  spoolLab,
  Tally,
} from "./support.js";

const tally = new Tally("resource");
afterAll(() => tally.flush());
afterEach(() => closeAllClients());

/** Sends `text` one byte per `intervalMs` until it is all out or the server closes. */
async function trickle(client: SmtpClient, text: string, intervalMs: number): Promise<number> {
  let sent = 0;
  for (const byte of text) {
    if (client.closed()) break;
    client.send(byte);
    sent++;
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
  return sent;
}

describe("spool mode: deadlines of their own, generous idle time", () => {
  let lab: SpoolLab;
  let configured: Record<string, number>;
  beforeAll(async () => {
    lab = await spoolLab({
      "spool.messagesPerIpPerMinute": 100_000,
      "limits.maxConnectionsPerIp": 3,
      "spool.commandTimeout": "2s",
      "spool.dataTimeout": "3m",
    });
    configured = { ...lab.edge.agent.spool.server.deadlines };
    // Shorter than the config allows (at least 1s), so the cases below finish quickly.
    lab.edge.agent.spool.server.deadlines = { commandMs: 400, dataMs: 1500, halfCloseMs: 400 };
  }, 60_000);
  afterAll(cleanupAgents);

  it("takes its deadlines from spool.commandTimeout and spool.dataTimeout", () => {
    expect(configured).toEqual({ commandMs: 2_000, dataMs: 180_000, halfCloseMs: 5_000 });
  });

  it("a command line trickled a byte at a time is cut at its deadline; an idle session is not", async () => {
    const idle = (await smtpConnect(lab.edge.smtpPort, "127.0.0.3")).client;
    expect(await idle.command("EHLO idle.example")).toMatch(/^250/);
    let tried = 0;
    let survived = 0;
    for (const line of ["EHLO slow.example\r\n", "MAIL FROM:<slow@example.net>\r\n"]) {
      tried++;
      const slow = (await smtpConnect(lab.edge.smtpPort, "127.0.0.2")).client;
      const sent = await trickle(slow, line, 50);
      await slow.waitClosed();
      expect(slow.text()).toMatch(/421 4\.4\.2 .*command line not completed in time/);
      if (sent === line.length) survived++;
    }
    // The same in TLS: the clock follows the session onto the TLS socket.
    tried++;
    const { client } = await smtpConnect(lab.edge.smtpPort, "127.0.0.2");
    await client.command("EHLO tls.example");
    expect(await client.command("STARTTLS")).toMatch(/^220/);
    client.socket.removeAllListeners("data");
    const secure = tls.connect({ socket: client.socket as net.Socket, rejectUnauthorized: false });
    await once(secure, "secureConnect");
    const inner = smtpOver(secure);
    const sent = await trickle(inner, "EHLO slow.inside.tls\r\n", 50);
    await inner.waitClosed();
    expect(inner.text()).toMatch(/421 4\.4\.2 /);
    if (sent === "EHLO slow.inside.tls\r\n".length) survived++;
    // The idle session said nothing for longer than any command deadline, and is still served.
    expect(idle.closed()).toBe(false);
    expect(await idle.command("NOOP")).toMatch(/^250/);
    tally.add("slowloris: spool mode command lines", { tried, accepted: survived });
    expect(survived).toBe(0);
  }, 60_000);

  it("DATA trickled a byte at a time is cut at the DATA deadline with 421, and nothing is spooled", async () => {
    const { client } = await smtpConnect(lab.edge.smtpPort, "127.0.0.2");
    await client.command("EHLO slow.example");
    await client.command("MAIL FROM:<slow@example.net>");
    expect(await client.command("RCPT TO:<alice@home.test>")).toMatch(/^250/);
    expect(await client.command("DATA")).toMatch(/^354/);
    const body = `Subject: slow\r\n\r\n${"x".repeat(200)}\r\n.\r\n`;
    const sent = await trickle(client, body, 20);
    await client.waitClosed();
    expect(client.text()).toMatch(/421 4\.4\.2 .*message data not completed in time/);
    tally.add("slowloris: spool mode DATA", { tried: 1, accepted: sent === body.length ? 1 : 0 });
    expect(sent).toBeLessThan(body.length);
    expect(lab.edge.agent.spool.store.size).toBe(0);
  }, 30_000);

  it("half-closed and TLS sessions give their connection slot back (per-IP cap 3)", async () => {
    await waitFor(() => lab.edge.agent.status().sessions.live === 0, { what: "a quiet edge" });
    let tried = 0;
    let refused = 0;
    // Three clients that say EHLO and half-close (FIN) without QUIT, twice over.
    for (let round = 0; round < 2; round++) {
      const clients: SmtpClient[] = [];
      for (let i = 0; i < 3; i++) {
        tried++;
        const { client, banner } = await smtpConnect(lab.edge.smtpPort, "127.0.0.4");
        if (!banner?.startsWith("220")) refused++;
        await client.command("EHLO fin.example");
        client.socket.end();
        clients.push(client);
      }
      await waitFor(() => lab.edge.agent.status().sessions.live === 0, {
        what: "half-closed sessions released",
      });
    }
    // Six STARTTLS sessions from one address in a row (each ended with QUIT).
    for (let i = 0; i < 6; i++) {
      tried++;
      const { client, banner } = await smtpConnect(lab.edge.smtpPort, "127.0.0.4");
      if (!banner?.startsWith("220")) {
        refused++;
        continue;
      }
      await client.command("EHLO tls.example");
      await client.command("STARTTLS");
      client.socket.removeAllListeners("data");
      const secure = tls.connect({ socket: client.socket as net.Socket, rejectUnauthorized: false });
      await once(secure, "secureConnect");
      const inner = smtpOver(secure);
      await inner.command("EHLO tls.example");
      await inner.command("QUIT");
      await inner.waitClosed();
    }
    tally.add("connection slots leaked (half-close, STARTTLS)", { tried, accepted: refused });
    expect(refused).toBe(0);
    await waitFor(() => lab.edge.agent.status().sessions.live === 0, { what: "every slot back" });
  }, 60_000);

  it("1000 recipients: 250 up to maxRecipients, 452 past it; over-long command lines never accepted", async () => {
    const { client } = await smtpConnect(lab.edge.smtpPort, "127.0.0.2");
    await client.command("EHLO many.example");
    await client.command("MAIL FROM:<many@example.net>");
    const max = lab.edge.config.spool.maxRecipients;
    let lines = "";
    for (let i = 0; i < 1000; i++) lines += `RCPT TO:<alice+r${i}@home.test>\r\n`;
    client.send(lines);
    const replies: string[] = [];
    for (let i = 0; i < 1000; i++) replies.push((await client.reply()) ?? "(closed)");
    const ok = replies.filter((r) => r.startsWith("250")).length;
    const tooMany = replies.filter((r) => r.startsWith("452")).length;
    expect(ok).toBe(Math.min(1000, max));
    expect(ok + tooMany).toBe(1000);
    expect(max).toBeGreaterThanOrEqual(100); // RFC 5321 4.5.3.1.8
    await client.command("RSET");
    // Over-long command lines: a 600-octet MAIL is refused; a 20 KiB line ends the session.
    const long = await client.command(`MAIL FROM:<${"a".repeat(580)}@example.net>`);
    expect(long).toMatch(/^5\d\d /);
    const huge = await client.command(`MAIL FROM:<${"a".repeat(20_000)}@example.net>`);
    expect(huge ?? "421").toMatch(/^(421|5\d\d)/);
    tally.add("1000 recipients / over-long lines (spool)", { tried: 1002 - max, accepted: 0 });
  }, 60_000);
});

describe("spool mode: the client's FIN ends the session at once", () => {
  let lab: SpoolLab;
  /** While set, opening a spool file waits for it: the commit of a message is held. */
  let hold: Promise<void> | undefined;
  beforeAll(async () => {
    const heldOpen = (async (...args: Parameters<typeof fs.open>) => {
      await hold;
      return fs.open(...args);
    }) as typeof fs.open;
    lab = await spoolLab({ "spool.messagesPerIpPerMinute": 100_000 }, { spoolOpenFile: heldOpen });
    // Far longer than the waits below: a session closed within them was closed by the FIN itself.
    lab.edge.agent.spool.server.deadlines.halfCloseMs = 60_000;
  }, 60_000);
  afterAll(cleanupAgents);

  it("an idle session that half-closes is closed and counted out at once, not after the grace", async () => {
    const { client } = await smtpConnect(lab.edge.smtpPort, "127.0.0.6");
    expect(await client.command("EHLO fin.example")).toMatch(/^250/);
    // A reply written just before the FIN still reaches the client.
    client.send("NOOP\r\n");
    client.socket.end();
    await client.waitClosed(5_000);
    expect(client.text()).toMatch(/\r\n250 [^\r]*\r\n$/);
    await waitFor(() => lab.edge.agent.status().sessions.live === 0, {
      what: "the half-closed session counted out",
      timeoutMs: 5_000,
    });
  }, 30_000);

  it("a FIN right after the final dot closes the session, and the message is still spooled once", async () => {
    const before = lab.edge.agent.spool.store.size;
    let release!: () => void;
    hold = new Promise((resolve) => {
      release = resolve;
    });
    try {
      const { client } = await smtpConnect(lab.edge.smtpPort, "127.0.0.6");
      await client.command("EHLO fin.example");
      expect(await client.command("MAIL FROM:<fin@example.net>")).toMatch(/^250/);
      expect(await client.command("RCPT TO:<alice@home.test>")).toMatch(/^250/);
      expect(await client.command("DATA")).toMatch(/^354/);
      client.send("Subject: fin after the dot\r\n\r\nbody\r\n.\r\n");
      client.socket.end();
      // Closed while the commit is still held: the FIN, not the commit or a deadline, ended it.
      await client.waitClosed(5_000);
      expect(lab.edge.agent.spool.store.size).toBe(before);
    } finally {
      release();
      hold = undefined;
    }
    await waitFor(() => lab.edge.agent.spool.store.size === before + 1, { what: "the message spooled" });
    expect(await fs.readdir(lab.edge.agent.spool.store.tmpDir)).toEqual([]);
  }, 30_000);
});

describe("live mode: caps and the session limit hold against slowloris and half-open connections", () => {
  let edge: TestEdge;
  let box: Mailbox;

  beforeAll(async () => {
    box = await startMailbox();
    edge = await makeEdge({
      overrides: {
        "limits.maxConnectionsPerIp": 5,
        "limits.maxConnections": 12,
        "limits.sessionTimeout": 1500,
      },
    });
    await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${box.port}` }, "home");
  }, 60_000);
  afterAll(async () => {
    await cleanupAgents();
    await box?.close();
  });

  it("silent and trickling connections fill only their own caps; others are still served; the session cap ends them", async () => {
    const hogs: net.Socket[] = [];
    let refused = 0;
    // Half-open from two addresses: connect, never speak, never read.
    for (const address of ["127.0.0.5", "127.0.0.6"]) {
      for (let i = 0; i < 7; i++) {
        const socket = net.connect({ host: "127.0.0.1", port: edge.smtpPort, localAddress: address });
        socket.on("error", () => {});
        hogs.push(socket);
      }
    }
    await waitFor(() => edge.agent.status().sessions.overLimit >= 4, {
      what: "4 refused over the per-IP cap",
    });
    expect(edge.agent.status().sessions.live).toBe(10);
    // A slowloris client trickles its EHLO and never finishes.
    const slow = (await smtpConnect(edge.smtpPort, "127.0.0.7")).client;
    const trickling = trickle(slow, `EHLO ${"s".repeat(200)}.example\r\n`, 30);
    // Another address is still served live, and the total cap (12) refuses the next one.
    const other = await smtpConnect(edge.smtpPort, "127.0.0.8");
    expect(other.banner).toMatch(/^220 .*demo mailbox/);
    const last = await smtpConnect(edge.smtpPort, "127.0.0.9");
    if (!last.banner?.startsWith("421")) refused++;
    expect(last.banner).toMatch(/^421 4\.7\.0/);
    // The session cap ends the hogs and the slowloris client, however busy it keeps itself.
    await slow.waitClosed(10_000);
    await trickling;
    await waitFor(() => edge.agent.status().sessions.live === 0, {
      what: "every hog cut by the session cap",
      timeoutMs: 10_000,
    });
    const after = await smtpConnect(edge.smtpPort, "127.0.0.5");
    expect(after.banner).toMatch(/^220 .*demo mailbox/);
    tally.add("half-open / slowloris: live mode caps", { tried: 16, accepted: refused });
    for (const socket of hogs) socket.destroy();
  }, 60_000);
});

describe("handshake flood from one address", () => {
  afterAll(cleanupAgents);

  it("is rate limited while a legit home connects and a live SMTP session gets its banner", async () => {
    const box = await startMailbox();
    const edge = await makeEdge();
    await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${box.port}` }, "first");
    const late = await pairedHomeDir(await edge.token(), "late");
    let attempts = 0;
    let refusedHttp = 0;
    let stop = false;
    const flooder = async () => {
      while (!stop) {
        attempts++;
        const ws = new WebSocket(`${edge.url}${TUNNEL_PATH}`, [SUBPROTOCOL], { localAddress: "127.0.0.5" });
        ws.on("error", (error) => {
          if (/Unexpected server response: (429|503)/.test(error.message)) refusedHttp++;
        });
        ws.on("open", () => ws.send(randomBytes(96)));
        // Not events.once: it would reject on the 'error' a refused upgrade emits before 'close'.
        await new Promise((resolve) => ws.once("close", resolve));
      }
    };
    const flood = Array.from({ length: 32 }, flooder);
    try {
      await waitFor(() => edge.agent.tunnels.counters.rateLimited >= 100, {
        what: "the flood to be rate limited",
      });
      // During the flood: a legit home connects, and a live session is spliced and greeted.
      const home = await startTestHome(late.dir, { "postfix.inject": `127.0.0.1:${box.port}` });
      await home.agent.waitConnected(20_000);
      const { banner } = await smtpConnect(edge.smtpPort, "127.0.0.2");
      expect(banner).toMatch(/^220 .*demo mailbox/);
      expect(edge.agent.tunnels.counters.rateLimited).toBeGreaterThan(0);
    } finally {
      stop = true;
      await Promise.all(flood);
      await box.close();
    }
    const counters = edge.agent.tunnels.counters;
    console.info(
      `handshake flood: ${attempts} attempts from 127.0.0.5, ${refusedHttp} refused with 429/503 before any crypto, ` +
        `${counters.handshakesFailed} failed handshakes; legit home connected and SMTP banner served during it`,
    );
    tally.add("handshake flood (127.0.0.5)", { tried: attempts, accepted: 0 });
    expect(refusedHttp).toBeGreaterThan(attempts / 2);
    expect(edge.agent.status().homes.every((h) => h.connected)).toBe(true);
  }, 60_000);
});
