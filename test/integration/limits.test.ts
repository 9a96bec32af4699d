// Issue 3's edge limits and stability rules, end to end on loopback with both agents in-process and the
// demo mailbox standing in for Postfix: per-IP and total connection caps (421 4.7.0 while others are
// served), the stability delay after a tunnel comes up (421 4.3.2, then spliced), the idle timeout,
// and openTimeout against a home that receives OPEN and never answers. Also issue 9's per-forward
// limits and the goodbye of a forwarded service that cannot be served live.
import net from "node:net";
import { connectToEdge } from "@mxtunnel/home";
import {
  AGENT_VERSION,
  decodeKey,
  initiateHandshake,
  Mux,
  type MuxStream,
  PROTOCOL_VERSION,
  parseEdgeConfig,
  TUNNEL_PATH,
  TUNNEL_PROLOGUE,
} from "@mxtunnel/shared";
import { afterEach, describe, expect, it } from "vitest";
import { type Mailbox, startMailbox } from "../../demo/src/mailbox.js";
import { freePort } from "../e2e/lab/ports.js";
import { waitFor } from "../e2e/lab/wait.js";
import {
  cleanupAgents,
  makeEdge,
  makeHome,
  pairedHomeDir,
  startTestHome,
  type TestEdge,
} from "../helpers/agents.js";

const mailboxes: Mailbox[] = [];
const clients: net.Socket[] = [];

afterEach(async () => {
  for (const socket of clients.splice(0)) socket.destroy();
  await cleanupAgents();
  for (const mailbox of mailboxes.splice(0)) await mailbox.close();
});

async function mailbox(): Promise<Mailbox> {
  const box = await startMailbox();
  mailboxes.push(box);
  return box;
}

/** A raw line client from a chosen loopback address: everything the server said, and whether it closed. */
interface Client {
  socket: net.Socket;
  text(): string;
  closed(): boolean;
  /** Resolves with all text once `pattern` matches what arrived after `from` (default: from the start). */
  until(pattern: RegExp, from?: number): Promise<string>;
  /** Sends a line and resolves with the next complete SMTP reply. */
  command(line: string): Promise<string>;
  /** Resolves once the server has closed the connection. */
  waitClosed(): Promise<void>;
}

async function connect(port: number, localAddress: string): Promise<Client> {
  const socket = net.connect({ host: "127.0.0.1", port, localAddress });
  clients.push(socket);
  let text = "";
  let closed = false;
  socket.setEncoding("utf8");
  socket.on("data", (chunk: string) => {
    text += chunk;
  });
  socket.on("error", () => {});
  socket.on("close", () => {
    closed = true;
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("connect", resolve);
    socket.once("error", reject);
  });
  const client: Client = {
    socket,
    text: () => text,
    closed: () => closed,
    until: (pattern, from = 0) =>
      waitFor(() => pattern.test(text.slice(from)) && text, {
        timeoutMs: 10_000,
        intervalMs: 5,
        what: `${pattern} from the server (got ${JSON.stringify(text.slice(from, from + 200))})`,
      }),
    async command(line) {
      const from = text.length;
      socket.write(`${line}\r\n`);
      const all = await client.until(/^\d{3} [^\r\n]*\r\n/m, from);
      return all.slice(from);
    },
    async waitClosed() {
      await waitFor(() => closed, {
        timeoutMs: 10_000,
        intervalMs: 5,
        what: "the server to close the connection",
      });
    },
  };
  return client;
}

/** Connects and waits for the first complete SMTP reply (the banner, or a refusal). */
async function greeting(port: number, localAddress: string): Promise<{ client: Client; reply: string }> {
  const client = await connect(port, localAddress);
  const reply = await client.until(/^\d{3} [^\r\n]*\r\n/m);
  return { client, reply };
}

async function edgeWithMailbox(overrides: Record<string, unknown>) {
  const box = await mailbox();
  const edge = await makeEdge({ overrides });
  const home = await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${box.port}` });
  return { edge, home, box };
}

const live = (edge: TestEdge) => edge.agent.status().sessions.live;

describe("connection limits on port 25", () => {
  it("over maxConnectionsPerIp: 421 4.7.0 for the next connection from that address, others still served", async () => {
    const { edge } = await edgeWithMailbox({ "limits.maxConnectionsPerIp": 2, "limits.maxConnections": 10 });
    const first = await greeting(edge.smtpPort, "127.0.0.2");
    const second = await greeting(edge.smtpPort, "127.0.0.2");
    expect(first.reply).toMatch(/^220 .*demo mailbox/);
    expect(second.reply).toMatch(/^220 .*demo mailbox/);

    const third = await greeting(edge.smtpPort, "127.0.0.2");
    expect(third.reply).toMatch(/^421 4\.7\.0 mx\.edge\.test too many connections/);
    await third.client.waitClosed();

    const other = await greeting(edge.smtpPort, "127.0.0.3");
    expect(other.reply).toMatch(/^220 .*demo mailbox/);
    expect(await other.client.command("EHLO other.example")).toMatch(/^250 /m);
    // The two sessions already open from 127.0.0.2 are untouched.
    expect(await first.client.command("EHLO first.example")).toMatch(/^250 /m);
    expect(edge.agent.status().sessions.overLimit).toBe(1);

    // A slot freed by QUIT is available again to that address.
    expect(await first.client.command("QUIT")).toMatch(/^221 /);
    await waitFor(() => live(edge) === 2, { what: "the QUIT session to be counted out" });
    const again = await greeting(edge.smtpPort, "127.0.0.2");
    expect(again.reply).toMatch(/^220 .*demo mailbox/);
  });

  it("over maxConnections: 421 4.7.0 for the next connection from any address, open sessions keep working", async () => {
    const { edge } = await edgeWithMailbox({ "limits.maxConnectionsPerIp": 5, "limits.maxConnections": 2 });
    const a = await greeting(edge.smtpPort, "127.0.0.2");
    const b = await greeting(edge.smtpPort, "127.0.0.3");
    expect(a.reply).toMatch(/^220 /);
    expect(b.reply).toMatch(/^220 /);

    const refused = await greeting(edge.smtpPort, "127.0.0.4");
    expect(refused.reply).toMatch(/^421 4\.7\.0 /);
    await refused.client.waitClosed();
    expect(await a.client.command("EHLO a.example")).toMatch(/^250 /m);
    expect(await b.client.command("EHLO b.example")).toMatch(/^250 /m);

    expect(await b.client.command("QUIT")).toMatch(/^221 /);
    await waitFor(() => live(edge) === 1, { what: "the QUIT session to be counted out" });
    const next = await greeting(edge.smtpPort, "127.0.0.4");
    expect(next.reply).toMatch(/^220 .*demo mailbox/);
  });

  it("closes an idle session after idleTimeout while a busy one keeps working", async () => {
    const { edge } = await edgeWithMailbox({ "limits.idleTimeout": 1000 });
    const idle = await greeting(edge.smtpPort, "127.0.0.2");
    const busy = await greeting(edge.smtpPort, "127.0.0.3");
    expect(idle.reply).toMatch(/^220 /);
    // Back-to-back NOOPs (no pauses) keep traffic on the busy session until the edge drops the idle one.
    let noops = 0;
    const deadline = Date.now() + 15_000; // ends the loop if the edge never drops the idle session
    while (!idle.client.closed() && Date.now() < deadline) {
      expect(await busy.client.command("NOOP")).toMatch(/^250 /);
      noops++;
    }
    expect(idle.client.closed()).toBe(true);
    expect(busy.client.closed()).toBe(false);
    expect(await busy.client.command("EHLO busy.example")).toMatch(/^250 /m);
    // The idle client never said a word: the close came from the edge.
    expect(idle.client.text()).not.toMatch(/^221 /m);
    await waitFor(() => live(edge) === 1, { what: "the idle session to be counted out" });
    expect(noops).toBeGreaterThan(0);
  });
});

// Until the edge spools, port 25 answered `421 4.3.2` when it could not splice; with the backup MX
// it answers itself. Either way the session is not spliced: port 25 is checked for that, and a
// `submission` forward (same ForwardListener, never spooled) for the exact 421 4.3.2 line.
const NOT_SPLICED = /^\d{3} mx\.edge\.test /;
const NOT_READY = /^421 4\.3\.2 mx\.edge\.test mail server not ready, try again later\r\n/;

describe("stability delay (stableAfter)", () => {
  it("does not splice while the tunnel is younger than stableAfter (421 4.3.2), splices once it is older, again after a flap", async () => {
    const stableAfter = 3000;
    const submissionPort = await freePort();
    const box = await mailbox();
    const edge = await makeEdge({
      overrides: {
        stableAfter,
        forwards: [{ listen: `127.0.0.1:${submissionPort}`, service: "submission" }],
      },
    });
    const home = await makeHome(await edge.token(), {
      "postfix.inject": `127.0.0.1:${box.port}`,
      services: { submission: { target: `127.0.0.1:${box.port}` } },
    });
    const tunnel = () => edge.agent.tunnels.liveTunnels().find((t) => !t.mux.closed);
    const firstUp = tunnel()?.connectedAt;
    expect(firstUp).toBeDefined();

    const early = await greeting(submissionPort, "127.0.0.2");
    expect(early.reply).toMatch(NOT_READY);
    await early.client.waitClosed();
    const early25 = await greeting(edge.smtpPort, "127.0.0.2");
    expect(early25.reply).toMatch(NOT_SPLICED);
    expect(early25.reply).not.toMatch(/demo mailbox/);
    expect(edge.agent.status().sessions.fallbacks).toBe(2);

    await waitFor(() => Date.now() - (tunnel()?.connectedAt ?? Date.now()) >= stableAfter, {
      timeoutMs: stableAfter + 5000,
      intervalMs: 50,
      what: "the tunnel to have been up for stableAfter",
    });
    const stable = await greeting(submissionPort, "127.0.0.2");
    expect(stable.reply).toMatch(/^220 .*demo mailbox/);
    expect(await stable.client.command("QUIT")).toMatch(/^221 /);
    const stable25 = await greeting(edge.smtpPort, "127.0.0.2");
    expect(stable25.reply).toMatch(/^220 .*demo mailbox/);
    expect(await stable25.client.command("QUIT")).toMatch(/^221 /);

    // The line flaps: the home's tunnel drops and comes back; the new tunnel must earn trust again.
    const link = [...home.agent.links.values()][0]!;
    link.currentMux?.close(1001, "test: line flap");
    const reconnected = await waitFor(
      () => {
        const t = tunnel();
        return t && t.connectedAt > (firstUp ?? 0) ? t : undefined;
      },
      { timeoutMs: 10_000, what: "the home to reconnect" },
    );
    const afterFlap = await greeting(submissionPort, "127.0.0.2");
    expect(afterFlap.reply).toMatch(NOT_READY);
    await waitFor(() => Date.now() - reconnected.connectedAt >= stableAfter, {
      timeoutMs: stableAfter + 5000,
      intervalMs: 50,
      what: "the new tunnel to have been up for stableAfter",
    });
    const settled = await greeting(submissionPort, "127.0.0.2");
    expect(settled.reply).toMatch(/^220 .*demo mailbox/);
  });
});

describe("openTimeout", () => {
  it("a home that receives OPEN and never answers: the client gets 421 4.3.2, the edge keeps serving", async () => {
    const box = await mailbox();
    const submissionPort = await freePort();
    const edge = await makeEdge({
      overrides: {
        openTimeout: 500,
        forwards: [{ listen: `127.0.0.1:${submissionPort}`, service: "submission" }],
      },
    });
    const { dir, state } = await pairedHomeDir(await edge.token(), "mute");
    const edgeRecord = state.edges()[0]!;

    // A raw home: authenticates, records every OPEN, never sends ACCEPT or RESET.
    const transport = await connectToEdge(edge.url, TUNNEL_PATH, 5000);
    const channel = await initiateHandshake(
      transport,
      {
        pattern: "IK",
        prologue: TUNNEL_PROLOGUE,
        staticKeyPair: state.keyPair,
        remoteStaticPublicKey: decodeKey(edgeRecord.publicKey, "edge key"),
        payload: { version: AGENT_VERSION, protocol: PROTOCOL_VERSION },
        timeoutMs: 5000,
      },
      (secure) => secure,
    );
    const mux = new Mux(channel, { role: "home" });
    const opened: MuxStream[] = [];
    mux.on("stream", (stream) => opened.push(stream));
    mux.sendControl({ type: "hello" });
    await waitFor(() => edge.agent.status().homes[0]?.connected, { what: "the mute home's tunnel" });

    const first = await greeting(submissionPort, "127.0.0.2");
    expect(first.reply).toMatch(NOT_READY);
    await first.client.waitClosed();
    expect(opened).toHaveLength(1);
    const stream = opened[0]!;
    expect(stream.kind).toBe("forward");
    expect(stream.meta).toMatchObject({ service: "submission", client: { address: "127.0.0.2" } });
    // The edge gives up on the stream too, so nothing is left half-open on either side.
    await waitFor(() => stream.destroyed, { what: "the edge to reset the unanswered stream" });
    expect(stream.resetReason).toBe("open-timeout");

    // Still serving: port 25 opens a stream too, gives up on it the same way and answers itself.
    const second = await greeting(edge.smtpPort, "127.0.0.3");
    expect(second.reply).toMatch(NOT_SPLICED);
    expect(second.reply).not.toMatch(/demo mailbox/);
    expect(opened).toHaveLength(2);
    expect(opened[1]?.meta).toMatchObject({ service: "smtp", client: { address: "127.0.0.3" } });
    await waitFor(() => opened[1]?.destroyed, { what: "the edge to reset the second stream" });
    expect(opened[1]?.resetReason).toBe("open-timeout");
    expect(mux.closed).toBe(false);

    // A real home with the same key replaces the mute one, and sessions are spliced again.
    const real = await startTestHome(dir, {
      "postfix.inject": `127.0.0.1:${box.port}`,
      services: { submission: { target: `127.0.0.1:${box.port}` } },
    });
    await real.agent.waitConnected(10_000);
    // The edge registers (and replaces) a tunnel on its first transport message: a PONG proves it has.
    for (const link of real.agent.links.values()) await link.currentMux?.ping();
    await waitFor(() => mux.closed, { what: "the mute tunnel to be replaced" });
    const served = await greeting(submissionPort, "127.0.0.2");
    expect(served.reply).toMatch(/^220 .*demo mailbox/);
    expect(await served.client.command("EHLO back.example")).toMatch(/^250 /m);
    const served25 = await greeting(edge.smtpPort, "127.0.0.2");
    expect(served25.reply).toMatch(/^220 .*demo mailbox/);
    expect(edge.agent.status().sessions.fallbacks).toBe(2);
  });
});

describe("per-forward limits and goodbyes (issue 9)", () => {
  it("parses a forward's own limits, each key defaulting to the edge's limits", () => {
    const config = parseEdgeConfig({
      hostname: "mx.example.net",
      domains: ["example.org"],
      limits: { maxConnectionsPerIp: 7, idleTimeout: "20m" },
      forwards: [
        {
          listen: "0.0.0.0:993",
          service: "imaps",
          limits: { maxConnectionsPerIp: 50, sessionTimeout: "12h" },
        },
        { listen: "0.0.0.0:587", service: "submission" },
      ],
    });
    expect(config.forwards.map((f) => f.limits)).toEqual([
      { maxConnections: 1000, maxConnectionsPerIp: 50, idleTimeout: 1_200_000, sessionTimeout: 43_200_000 },
      { maxConnections: 1000, maxConnectionsPerIp: 7, idleTimeout: 1_200_000, sessionTimeout: 1_800_000 },
    ]);
    expect(() =>
      parseEdgeConfig({
        hostname: "mx.example.net",
        domains: ["example.org"],
        forwards: [{ listen: "0.0.0.0:993", service: "imaps", limits: { maxConection: 5 } }],
      }),
    ).toThrow(/forwards\[0\]\.limits\.maxConection: unknown key \(did you mean "maxConnections"\?\)/);
  });

  it("a forward counts its own connections under its own limits; port 25 keeps the edge's", async () => {
    const box = await mailbox();
    const imapPort = await freePort();
    const edge = await makeEdge({
      overrides: {
        "limits.maxConnectionsPerIp": 5,
        forwards: [{ listen: `127.0.0.1:${imapPort}`, service: "imap", limits: { maxConnectionsPerIp: 1 } }],
      },
    });
    // The mailbox stands in for the IMAP server: all the edge sees is bytes.
    await makeHome(await edge.token(), {
      "postfix.inject": `127.0.0.1:${box.port}`,
      services: { imap: { target: `127.0.0.1:${box.port}` } },
    });
    const one = await greeting(imapPort, "127.0.0.2");
    expect(one.reply).toMatch(/^220 .*demo mailbox/);
    const refused = await connect(imapPort, "127.0.0.2");
    await refused.waitClosed();
    expect(refused.text()).toBe("* BYE too many connections\r\n");
    // Same address on port 25: its own limit (5), not the forward's.
    const smtpA = await greeting(edge.smtpPort, "127.0.0.2");
    const smtpB = await greeting(edge.smtpPort, "127.0.0.2");
    expect(smtpA.reply).toMatch(/^220 /);
    expect(smtpB.reply).toMatch(/^220 /);
    // Another address on the forward is still served.
    const other = await greeting(imapPort, "127.0.0.3");
    expect(other.reply).toMatch(/^220 /);
  });

  it("a forward that cannot be served live closes at once: a BYE for plaintext imap, nothing for a TLS port", async () => {
    const [imapPort, imapsPort] = [await freePort(), await freePort()];
    const edge = await makeEdge({
      overrides: {
        forwards: [
          { listen: `127.0.0.1:${imapPort}`, service: "imap" },
          { listen: `127.0.0.1:${imapsPort}`, service: "imaps" },
        ],
      },
    });
    // No home at all: no tunnel.
    const imap = await connect(imapPort, "127.0.0.2");
    await imap.waitClosed();
    expect(imap.text()).toBe("* BYE mail server unreachable\r\n");
    const imaps = await connect(imapsPort, "127.0.0.2");
    imaps.socket.write(Buffer.from("160301", "hex")); // the start of a TLS ClientHello
    await imaps.waitClosed();
    expect(imaps.text()).toBe("");
    expect(edge.agent.status().sessions.fallbacks).toBe(2);
  });
});
