// Hostile tunnel peers against a real edge, with a well-behaved home connected throughout whose tunnel
// must never notice: random bytes and truncated handshakes, a handshake flood from one address (the
// edge keeps serving a legit home and live SMTP sessions meanwhile), replayed handshakes and transport
// messages, a paired home sending malformed frames, streams past the limit, and credit abuse.
// (tunnel.test.ts already covers plain WebSocket garbage, version mismatch, a replayed message 1, a
// tampered transport message and one unknown frame type; these go further.)
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import net from "node:net";
import type { HomeState } from "@mxtunnel/home";
import {
  CloseCode,
  decodeMessage,
  encodeFrame,
  type Frame,
  Mux,
  type MuxStream,
  SUBPROTOCOL,
  TUNNEL_PATH,
} from "@mxtunnel/shared";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { type Mailbox, startMailbox } from "../../demo/src/mailbox.js";
import { waitFor } from "../e2e/lab/wait.js";
import {
  cleanupAgents,
  makeEdge,
  makeHome,
  pairedHomeDir,
  type TestEdge,
  type TestHome,
} from "../helpers/agents.js";
import { closeAllClients, homeConnected, rawTunnel, Tally } from "./support.js";

const tally = new Tally("tunnel-peers");
afterAll(() => tally.flush());
afterEach(() => closeAllClients());

/** Resolves with the close code once the WebSocket is closed (by either side). */
function closedCode(ws: WebSocket): Promise<number> {
  if (ws.readyState === WebSocket.CLOSED) return Promise.resolve(-1);
  return once(ws, "close").then(([code]) => code as number);
}

async function goodStillServed(edge: TestEdge, good: TestHome): Promise<void> {
  expect(homeConnected(edge, "good")).toBe(true);
  const mux = [...good.agent.links.values()][0]!.currentMux!;
  expect(await mux.ping()).toBeGreaterThanOrEqual(0);
}

describe("hostile tunnel peers", () => {
  let edge: TestEdge;
  let good: TestHome;
  let box: Mailbox;
  let evil: HomeState;

  beforeAll(async () => {
    box = await startMailbox();
    // Many handshakes from 127.0.0.1 in a row here: the per-IP limit is the flood test's subject, not this one's.
    edge = await makeEdge({
      overrides: {
        "limits.authTimeout": 500,
        "limits.handshakesPerIpPerSecond": 1000,
        "limits.handshakeBurst": 1000,
      },
    });
    good = await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${box.port}` }, "good");
    evil = (await pairedHomeDir(await edge.token(), "evil")).state;
  }, 60_000);
  afterAll(async () => {
    await cleanupAgents();
    await box?.close();
  });

  it("random bytes and truncated handshakes: each connection is closed, nothing else changes", async () => {
    const tunnelPort = edge.agent.addresses.tunnel.port;
    let tried = 0;
    let survived = 0;
    // Not even HTTP: random bytes on the tunnel port.
    for (let i = 0; i < 10; i++) {
      tried++;
      const socket = net.connect({ host: "127.0.0.1", port: tunnelPort });
      socket.on("error", () => {});
      await once(socket, "connect");
      socket.write(randomBytes(64 + i * 97));
      const closed = await Promise.race([
        once(socket, "close").then(() => true),
        new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 10_000)),
      ]);
      if (!closed) survived++;
      socket.destroy();
    }
    // A WebSocket that never says anything (auth deadline), and truncated or padded message 1s.
    const bodies: (Buffer | undefined)[] = [
      undefined,
      Buffer.alloc(0),
      randomBytes(1),
      randomBytes(31),
      randomBytes(95),
      randomBytes(4000),
    ];
    for (const body of bodies) {
      tried++;
      const ws = new WebSocket(`${edge.url}${TUNNEL_PATH}`, [SUBPROTOCOL]);
      ws.on("error", () => {});
      await once(ws, "open");
      const code = closedCode(ws);
      if (body) ws.send(body);
      const closedWith = await code;
      if (![CloseCode.HANDSHAKE_FAILED, CloseCode.AUTH_TIMEOUT, 1002, 1006].includes(closedWith)) survived++;
    }
    tally.add("hostile peer: random bytes / truncated handshakes", { tried, accepted: survived });
    expect(survived).toBe(0);
    await goodStillServed(edge, good);
    expect(edge.agent.tunnels.pendingHandshakes).toBe(0);
  }, 60_000);

  it("a replayed handshake with its transport messages is refused and never replaces the live tunnel", async () => {
    const recorded = await rawTunnel(edge.url, evil);
    const mux = new Mux(recorded.channel, { role: "home" });
    mux.sendControl({ type: "hello" });
    await waitFor(() => homeConnected(edge, "evil"), { what: "the recorded tunnel up" });
    const since = edge.agent.status().homes.find((h) => h.name === "evil")!.connectedSince;
    await mux.ping();
    const wire = [...recorded.sent];
    expect(wire.length).toBeGreaterThanOrEqual(2);
    let tried = 0;
    let accepted = 0;
    // Replayed on a new connection: message 2 differs (fresh ephemeral), so the transport messages fail.
    for (let i = 0; i < 3; i++) {
      tried++;
      const ws = new WebSocket(`${edge.url}${TUNNEL_PATH}`, [SUBPROTOCOL]);
      ws.on("error", () => {});
      await once(ws, "open");
      const code = closedCode(ws);
      for (const message of wire) ws.send(message);
      const closedWith = await code;
      if (closedWith === 1000) accepted++;
    }
    expect(edge.agent.status().homes.find((h) => h.name === "evil")).toMatchObject({
      connected: true,
      connectedSince: since,
    });
    // Replayed inside the live tunnel (a network attacker duplicating a message): that tunnel closes.
    tried++;
    const down = once(mux, "close");
    recorded.transport.send(wire.at(-1)!);
    await down;
    await waitFor(() => !homeConnected(edge, "evil"), { what: "the replayed-into tunnel closed" });
    tally.add("hostile peer: replayed handshakes and transport messages", { tried, accepted });
    expect(accepted).toBe(0);
    await goodStillServed(edge, good);
  }, 60_000);

  it("a paired home sending malformed frames: only its own tunnel closes, every time", async () => {
    const meta = {
      id: "x",
      mailFrom: "a@home.test",
      rcptTo: [{ address: "b@remote.test", params: {} }],
      params: {},
      size: 10,
    };
    const raw = (type: number, stream: number, payload: Uint8Array = new Uint8Array()) => {
      const out = new Uint8Array(5 + payload.length);
      out[0] = type;
      new DataView(out.buffer).setUint32(1, stream);
      out.set(payload, 5);
      return out;
    };
    const cases: { name: string; frames: Uint8Array[] }[] = [
      { name: "unknown frame type", frames: [raw(0x7f, 0)] },
      { name: "truncated header", frames: [Uint8Array.of(0x03, 0)] },
      {
        name: "DATA for a stream never opened",
        frames: [encodeFrame({ type: "data", stream: 99, data: randomBytes(10) })],
      },
      {
        name: "OPEN with the edge's parity",
        frames: [encodeFrame({ type: "open", stream: 2, kind: "relay", meta })],
      },
      {
        name: "OPEN reusing an id",
        frames: [
          encodeFrame({ type: "open", stream: 5, kind: "relay", meta }),
          encodeFrame({ type: "open", stream: 5, kind: "relay", meta }),
        ],
      },
      {
        name: "OPEN with an id below the last",
        frames: [
          encodeFrame({ type: "open", stream: 7, kind: "relay", meta }),
          encodeFrame({ type: "open", stream: 3, kind: "relay", meta }),
        ],
      },
      {
        name: "ACCEPT for its own stream",
        frames: [
          encodeFrame({ type: "open", stream: 1, kind: "relay", meta }),
          encodeFrame({ type: "accept", stream: 1 }),
        ],
      },
      {
        name: "DATA after END",
        frames: [
          encodeFrame({ type: "open", stream: 1, kind: "relay", meta }),
          encodeFrame({ type: "end", stream: 1 }),
          encodeFrame({ type: "data", stream: 1, data: randomBytes(10) }),
        ],
      },
      {
        name: "tunnel WINDOW past 2^31-1",
        frames: [
          encodeFrame({ type: "window", stream: 0, credit: 0x7fffffff }),
          encodeFrame({ type: "window", stream: 0, credit: 1 }),
        ],
      },
      { name: "unknown stream kind", frames: [raw(0x01, 1, Uint8Array.of(9, 0, 2, 0x7b, 0x7d))] },
      { name: "OPEN meta not JSON", frames: [raw(0x01, 1, Uint8Array.of(3, 0, 3, 0x7b, 0x7b, 0x7b))] },
      {
        name: "OPEN meta over 8 KiB",
        frames: [raw(0x01, 1, Buffer.concat([Buffer.from([3, 0x40, 0x01]), Buffer.alloc(0x4001, 0x20)]))],
      },
      { name: "empty message", frames: [new Uint8Array()] },
    ];
    let survived = 0;
    for (const c of cases) {
      const { channel } = await rawTunnel(edge.url, evil);
      channel.send(encodeFrame({ type: "control", message: { type: "hello" } }));
      await waitFor(() => homeConnected(edge, "evil"), { what: `tunnel up before "${c.name}"` });
      const closed = once(channel, "close");
      for (const frame of c.frames) channel.send(frame);
      const outcome = await Promise.race([
        closed.then(([code]) => code as number),
        new Promise<"open">((resolve) => setTimeout(() => resolve("open"), 10_000)),
      ]);
      if (outcome === "open" || outcome === 1000) survived++;
      expect(outcome, c.name).not.toBe("open");
      await waitFor(() => !homeConnected(edge, "evil"), { what: `tunnel closed after "${c.name}"` });
      await goodStillServed(edge, good);
    }
    tally.add("hostile peer: malformed frames from a paired home", {
      tried: cases.length,
      accepted: survived,
    });
    expect(survived).toBe(0);
  }, 90_000);

  it("streams opened past the limit are reset one by one; the tunnel and its other streams stay up", async () => {
    const { channel } = await rawTunnel(edge.url, evil);
    const mux = new Mux(channel, { role: "home" });
    mux.sendControl({ type: "hello" });
    await waitFor(() => homeConnected(edge, "evil"), { what: "tunnel up" });
    const limit = 1024; // the edge's default maxStreams
    const extra = 16;
    const streams: MuxStream[] = [];
    const tooMany: number[] = [];
    for (let i = 0; i < limit + extra; i++) {
      // A relay stream whose message never comes: the edge holds it open, waiting.
      const stream = mux.open("relay", {
        id: `s${i}`,
        mailFrom: "a@home.test",
        rcptTo: [{ address: "b@remote.test", params: {} }],
        params: {},
        size: 10,
      });
      stream.on("error", () => {});
      stream.on("reset", (code: number) => {
        if (code === 8) tooMany.push(i);
      });
      streams.push(stream);
    }
    await waitFor(() => tooMany.length >= extra, {
      what: `${extra} TOO_MANY_STREAMS resets`,
      timeoutMs: 20_000,
    });
    expect(tooMany.every((i) => i >= limit)).toBe(true);
    expect(await mux.ping()).toBeGreaterThanOrEqual(0);
    expect(mux.closed).toBe(false);
    tally.add("hostile peer: streams past the limit", {
      tried: extra,
      accepted: limit + extra - limit - tooMany.length,
    });
    mux.close();
    await waitFor(() => !homeConnected(edge, "evil"), { what: "evil tunnel gone" });
    await goodStillServed(edge, good);
  }, 60_000);
});

describe("credit abuse", () => {
  afterAll(cleanupAgents);

  it("a home that ignores credit on a live session is cut off; the other home's tunnel is untouched", async () => {
    const edge = await makeEdge();
    const evil = (await pairedHomeDir(await edge.token(), "evil")).state;
    const { channel } = await rawTunnel(edge.url, evil);
    const opens: Frame[] = [];
    channel.on("message", (bytes: Uint8Array) => {
      for (const frame of decodeMessage(bytes)) if (frame.type === "open") opens.push(frame);
    });
    channel.send(encodeFrame({ type: "window", stream: 0, credit: 4 * 1024 * 1024 }));
    await waitFor(() => homeConnected(edge, "evil"), { what: "evil tunnel up" });
    // A client that connects and never reads: the edge cannot pass on what the home sends.
    const client = net.connect({ host: "127.0.0.1", port: edge.smtpPort, localAddress: "127.0.0.2" });
    client.on("error", () => {});
    await waitFor(() => opens[0], { what: "the edge to open a forward stream to the evil home" });
    const stream = (opens[0] as { stream: number }).stream;
    channel.send(encodeFrame({ type: "accept", stream }));
    const box = await startMailbox();
    const good = await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${box.port}` }, "good");
    const closed = once(channel, "close");
    let sent = 0;
    const chunk = randomBytes(60_000);
    const limit = 64 * 1024 * 1024;
    while (!channel.closed && sent < limit) {
      channel.send(encodeFrame({ type: "data", stream, data: chunk }));
      sent += chunk.length;
      if (sent % (2 * 1024 * 1024) < chunk.length) await new Promise((resolve) => setImmediate(resolve));
    }
    const [code] = await Promise.race([
      closed,
      new Promise<[string]>((resolve) => setTimeout(() => resolve(["open"]), 20_000)),
    ]);
    tally.add("hostile peer: DATA beyond credit", { tried: 1, accepted: code === "open" ? 1 : 0 });
    expect(code).not.toBe("open");
    expect(code).not.toBe(1000);
    await waitFor(() => !homeConnected(edge, "evil"), { what: "the abusive tunnel closed" });
    await goodStillServed(edge, good);
    client.destroy();
    await box.close();
    console.info(
      `credit abuse: tunnel closed after ${(sent / 1048576).toFixed(1)} MiB sent against a client that never reads`,
    );
  }, 60_000);
});
