// The tunnel pair end to end on loopback: pairing, authentication, hostile inputs, recovery.

import { randomBytes } from "node:crypto";
import { once } from "node:events";
import net from "node:net";
import { connectToEdge, EdgeLink, HomeState, pairWithEdge } from "@mxtunnel/home";
import {
  AGENT_VERSION,
  CloseCode,
  callAdminSocket,
  decodeKey,
  decodePairingToken,
  encodeFrame,
  encodePairingToken,
  encodePayload,
  generateKeyPair,
  HandshakeState,
  initiateHandshake,
  Mux,
  PAIR_PATH,
  PAIR_PROLOGUE,
  PROTOCOL_VERSION,
  pairingPsk,
  SUBPROTOCOL,
  TUNNEL_PATH,
  TUNNEL_PROLOGUE,
  tokenId,
} from "@mxtunnel/shared";
import { afterEach, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents, makeEdge, makeHome, pairedHomeDir, tempDir, testLogger } from "../helpers/agents.js";

afterEach(cleanupAgents);

function homeConnected(edge: Awaited<ReturnType<typeof makeEdge>>, name: string): boolean {
  return edge.agent.status().homes.find((h) => h.name === name)?.connected ?? false;
}

/** A raw, authenticated home connection driven by the test (to misbehave on purpose). */
async function rawTunnel(url: string, state: HomeState, edgePublicKey: string) {
  const transport = await connectToEdge(url, TUNNEL_PATH, 5000);
  const channel = await initiateHandshake(
    transport,
    {
      pattern: "IK",
      prologue: TUNNEL_PROLOGUE,
      staticKeyPair: state.keyPair,
      remoteStaticPublicKey: decodeKey(edgePublicKey, "edge key"),
      payload: { version: AGENT_VERSION, protocol: PROTOCOL_VERSION },
      timeoutMs: 5000,
    },
    (secure) => secure,
  );
  return { transport, channel };
}

describe("pairing", () => {
  it("pairs a home, brings the tunnel up and reports it connected on both sides", async () => {
    const edge = await makeEdge();
    const home = await makeHome(await edge.token(), {}, "alpha");
    expect(edge.agent.status().homes).toMatchObject([
      { name: "alpha", connected: true, domains: ["home.test"] },
    ]);
    expect(home.agent.status().edges).toMatchObject([{ hostname: "mx.edge.test", connected: true }]);
    expect(home.agent.status().edges[0]?.peerVersion).toBe(AGENT_VERSION);
  });

  it("is single use: a second home key with the same token is refused, naming the first key", async () => {
    const edge = await makeEdge();
    const token = await edge.token();
    const first = await pairedHomeDir(token, "first");
    const otherDir = await tempDir("home2");
    const other = await HomeState.open(otherDir, { create: true });
    const error = await pairWithEdge({ token, state: other, name: "second" }).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: "TOKEN_USED" });
    expect((error as Error).message).toContain(first.state.fingerprint);
    expect(edge.agent.state.homes().map((h) => h.name)).toEqual(["first"]);
    expect(other.edges()).toHaveLength(0);
  });

  it("succeeds again for the same token and the same key (a lost enrolment reply)", async () => {
    const edge = await makeEdge();
    const token = await edge.token();
    const { state } = await pairedHomeDir(token, "retry");
    const again = await pairWithEdge({ token, state, name: "retry" });
    expect(again.homeName).toBe("retry");
    expect(edge.agent.state.homes()).toHaveLength(1);
    expect(state.edges()).toHaveLength(1);
  });

  it("leaves the token usable when home disappears between message 2 and ENROL", async () => {
    const edge = await makeEdge();
    const token = await edge.token();
    const decoded = decodePairingToken(token);
    const crashedKey = generateKeyPair();
    const transport = await connectToEdge(decoded.url, PAIR_PATH, 5000);
    await initiateHandshake(
      transport,
      {
        pattern: "IKpsk2",
        prologue: PAIR_PROLOGUE,
        staticKeyPair: crashedKey,
        remoteStaticPublicKey: decoded.edgePublicKey,
        psk: pairingPsk(decoded.secret, decoded.edgePublicKey),
        payload: { tokenId: tokenId(decoded.secret), version: AGENT_VERSION },
        timeoutMs: 5000,
      },
      (channel) => channel,
    );
    transport.close(1000, "crash before ENROL");
    const { state } = await pairedHomeDir(token, "survivor");
    expect(edge.agent.state.homes().map((h) => h.fingerprint)).toEqual([state.fingerprint]);
  });

  it("refuses an expired token and changes nothing", async () => {
    const edge = await makeEdge();
    const token = await edge.agent.state.issueToken({
      ttlMs: 1000,
      domains: ["home.test"],
      url: edge.url,
      now: new Date(Date.now() - 60_000),
    });
    const state = await HomeState.open(await tempDir("home"), { create: true });
    await expect(pairWithEdge({ token, state, name: "late" })).rejects.toMatchObject({
      code: "TOKEN_EXPIRED",
    });
    expect(edge.agent.state.homes()).toHaveLength(0);
    expect(state.edges()).toHaveLength(0);
  });

  it("refuses a mistyped token by its checksum before dialling", async () => {
    const edge = await makeEdge();
    const token = await edge.token();
    const i = 20;
    const typo = token.slice(0, i) + (token[i] === "A" ? "B" : "A") + token.slice(i + 1);
    const state = await HomeState.open(await tempDir("home"), { create: true });
    await expect(pairWithEdge({ token: typo, state, name: "typo" })).rejects.toMatchObject({
      code: "TOKEN_CHECKSUM",
    });
    await expect(pairWithEdge({ token: "not-a-token", state, name: "junk" })).rejects.toMatchObject({
      code: "TOKEN_MALFORMED",
    });
    expect(edge.agent.status().handshakes.failed).toBe(0);
    expect(edge.agent.state.homes()).toHaveLength(0);
  });

  it("refuses a foreign token (another edge's key) at the handshake", async () => {
    const edge = await makeEdge();
    const other = await makeEdge();
    const foreign = decodePairingToken(await other.token());
    const token = encodePairingToken({ ...foreign, url: edge.url });
    const state = await HomeState.open(await tempDir("home"), { create: true });
    await expect(pairWithEdge({ token, state, name: "foreign" })).rejects.toMatchObject({
      code: "HANDSHAKE_FAILED",
    });
    expect(edge.agent.state.homes()).toHaveLength(0);
    expect(other.agent.state.homes()).toHaveLength(0);
  });
});

describe("hostile peers", () => {
  it("refuses an unpaired home key before the ss DH, and keeps serving the paired home", async () => {
    const edge = await makeEdge();
    await makeHome(await edge.token(), {}, "good");
    const { state: paired } = await pairedHomeDir(await edge.token(), "template");
    const strangerState = await HomeState.open(await tempDir("stranger"), { create: true });
    const link = new EdgeLink({
      edge: paired.edges()[0]!,
      keyPair: strangerState.keyPair,
      logger: testLogger,
      reconnect: { minDelayMs: 50, maxDelayMs: 100 },
      onStream: (stream) => stream.reset(1, "no"),
    });
    link.start();
    await waitFor(() => link.status().lastError?.includes("does not know this home"), {
      what: "UNKNOWN_PEER",
    });
    await link.stop();
    expect(link.status().connected).toBe(false);
    expect(homeConnected(edge, "good")).toBe(true);
    expect(edge.agent.status().handshakes.failed).toBeGreaterThan(0);
  });

  it("closes a WebSocket client that sends garbage, and keeps serving others", async () => {
    const edge = await makeEdge();
    const home = await makeHome(await edge.token(), {}, "good");
    const ws = new WebSocket(`${edge.url}${TUNNEL_PATH}`, [SUBPROTOCOL]);
    await once(ws, "open");
    ws.send(randomBytes(200));
    const [code] = (await once(ws, "close")) as [number];
    expect(code).toBe(CloseCode.HANDSHAKE_FAILED);
    const mux = [...home.agent.links.values()][0]!.currentMux!;
    expect(await mux.ping()).toBeGreaterThanOrEqual(0);
    expect(homeConnected(edge, "good")).toBe(true);
  });

  it("refuses a newer protocol version with a sentence naming both versions", async () => {
    const edge = await makeEdge();
    const ws = new WebSocket(`${edge.url}${TUNNEL_PATH}`, ["mxtunnel.v3"]);
    ws.on("error", () => {});
    const [, res] = (await once(ws, "unexpected-response")) as [unknown, import("node:http").IncomingMessage];
    let body = "";
    for await (const chunk of res) body += chunk;
    expect(res.statusCode).toBe(426);
    expect(body).toContain("mxtunnel.v2");
    expect(body).toContain("mxtunnel.v3");
    expect(body).toMatch(/upgrade mxtunnel on the edge/);
  });

  it("a client that resets right after a refused upgrade does not take the edge down", async () => {
    const edge = await makeEdge();
    const port = Number(new URL(edge.url).port);
    const uncaught: unknown[] = [];
    const record = (error: unknown) => uncaught.push(error);
    process.on("uncaughtException", record);
    try {
      // Refused before any WebSocket exists (404, 426): the HTTP server has let go of the socket.
      for (let i = 0; i < 40; i++) {
        const path = i % 2 === 0 ? "/nope" : TUNNEL_PATH;
        const protocol = i % 2 === 0 ? "mxtunnel.v2" : "mxtunnel.v9";
        const socket = net.connect(port, "127.0.0.1");
        socket.on("error", () => {});
        await once(socket, "connect");
        socket.write(
          `GET ${path} HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
            `Sec-WebSocket-Key: ${randomBytes(16).toString("base64")}\r\nSec-WebSocket-Version: 13\r\n` +
            `Sec-WebSocket-Protocol: ${protocol}\r\n\r\n`,
        );
        // Half the time before the refusal can be read, half after it arrived.
        if (i % 4 >= 2) await once(socket, "data");
        socket.resetAndDestroy();
        await once(socket, "close");
      }
      // The edge is still there and still pairs a home.
      const home = await makeHome(await edge.token(), {}, "after-resets");
      await waitFor(() => homeConnected(edge, "after-resets"), { what: "the home connected" });
      expect(home.agent.status().edges[0]?.connected).toBe(true);
    } finally {
      process.off("uncaughtException", record);
    }
    expect(uncaught).toEqual([]);
  });

  it("home names both versions when the edge speaks only a newer protocol", async () => {
    const server = net.createServer((socket) => {
      socket.once("data", () =>
        socket.end(
          "HTTP/1.1 426 Upgrade Required\r\nx-mxtunnel-supported: mxtunnel.v3\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        ),
      );
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.address() as net.AddressInfo).port;
    const error = await connectToEdge(`ws://127.0.0.1:${port}`, TUNNEL_PATH, 2000).catch((e: unknown) => e);
    server.close();
    expect(error).toMatchObject({ code: "VERSION_MISMATCH" });
    expect((error as Error).message).toBe(
      "protocol version mismatch: this home speaks mxtunnel.v2, the edge speaks mxtunnel.v3; upgrade mxtunnel on the home",
    );
  });

  it("a replayed message 1 never kicks the live tunnel", async () => {
    const edge = await makeEdge({ overrides: { "limits.authTimeout": 300 } });
    const home = await makeHome(await edge.token(), {}, "live");
    const before = edge.agent.status().homes[0]!.connectedSince;
    const record = home.state.edges()[0]!;
    const handshake = new HandshakeState({
      pattern: "IK",
      initiator: true,
      prologue: TUNNEL_PROLOGUE,
      staticKeyPair: home.state.keyPair,
      remoteStaticPublicKey: decodeKey(record.publicKey, "edge"),
    });
    const message1 = handshake.writeMessage(encodePayload({ version: AGENT_VERSION }));
    for (let i = 0; i < 2; i++) {
      const ws = new WebSocket(`${edge.url}${TUNNEL_PATH}`, [SUBPROTOCOL]);
      await once(ws, "open");
      ws.send(message1);
      await once(ws, "message"); // message 2, which the replayer cannot use
      const [code] = (await once(ws, "close")) as [number];
      expect(code).toBe(CloseCode.AUTH_TIMEOUT);
    }
    expect(edge.agent.status().homes[0]).toMatchObject({ connected: true, connectedSince: before });
    expect(home.agent.status().edges[0]?.connected).toBe(true);
  });

  it("a tampered transport message closes that tunnel only", async () => {
    const edge = await makeEdge();
    const good = await makeHome(await edge.token(), {}, "good");
    const { state } = await pairedHomeDir(await edge.token(), "evil");
    const { transport, channel } = await rawTunnel(edge.url, state, state.edges()[0]!.publicKey);
    const mux = new Mux(channel, { role: "home" });
    mux.sendControl({ type: "hello" });
    await waitFor(() => homeConnected(edge, "evil"), { what: "evil tunnel up" });
    transport.send(randomBytes(64)); // not a valid Noise transport message
    await once(mux, "close");
    await waitFor(() => !homeConnected(edge, "evil"), { what: "evil tunnel closed" });
    expect(homeConnected(edge, "good")).toBe(true);
    expect(await [...good.agent.links.values()][0]!.currentMux!.ping()).toBeGreaterThanOrEqual(0);
  });

  it("a malformed frame from a valid home closes that tunnel only", async () => {
    const edge = await makeEdge();
    const good = await makeHome(await edge.token(), {}, "good");
    const { state } = await pairedHomeDir(await edge.token(), "sloppy");
    const { channel } = await rawTunnel(edge.url, state, state.edges()[0]!.publicKey);
    channel.send(encodeFrame({ type: "control", message: { type: "hello" } }));
    await waitFor(() => homeConnected(edge, "sloppy"), { what: "sloppy tunnel up" });
    channel.send(Uint8Array.of(0x7f, 0, 0, 0, 1, 1, 2, 3)); // unknown frame type
    const [code] = (await once(channel, "close")) as [number];
    expect(code).not.toBe(1000);
    await waitFor(() => !homeConnected(edge, "sloppy"), { what: "sloppy tunnel closed" });
    expect(homeConnected(edge, "good")).toBe(true);
    expect(await [...good.agent.links.values()][0]!.currentMux!.ping()).toBeGreaterThanOrEqual(0);
  });
});

describe("lifecycle", () => {
  it("unpair closes the live tunnel at once and refuses reconnects", async () => {
    const edge = await makeEdge();
    const home = await makeHome(await edge.token(), {}, "doomed");
    const link = [...home.agent.links.values()][0]!;
    const down = once(link, "down");
    await callAdminSocket(edge.agent.state.paths.adminSocket, {
      command: "unpair",
      args: { home: "doomed" },
    });
    await down;
    expect(edge.agent.status().homes).toHaveLength(0);
    await waitFor(() => link.status().lastError?.includes("does not know this home"), {
      what: "reconnect refused",
    });
    expect(link.status().connected).toBe(false);
  });

  it("home reconnects by itself once a stopped edge is back", async () => {
    const edge = await makeEdge();
    const home = await makeHome(await edge.token(), {}, "patient");
    const link = [...home.agent.links.values()][0]!;
    const down = once(link, "down");
    await edge.stop();
    await down;
    expect(link.status().connected).toBe(false);
    const up = once(link, "up");
    await edge.restart();
    await up;
    await waitFor(() => homeConnected(edge, "patient"), { what: "edge sees the home again" });
  });

  it("a second tunnel from the same home replaces the first only once authenticated", async () => {
    const edge = await makeEdge();
    const { state } = await pairedHomeDir(await edge.token(), "twice");
    const first = await rawTunnel(edge.url, state, state.edges()[0]!.publicKey);
    const firstMux = new Mux(first.channel, { role: "home" });
    firstMux.sendControl({ type: "hello" });
    await waitFor(() => homeConnected(edge, "twice"), { what: "first tunnel" });
    const second = await rawTunnel(edge.url, state, state.edges()[0]!.publicKey);
    // Handshake done but no transport message yet: the first tunnel must still be the live one.
    expect(firstMux.closed).toBe(false);
    const secondMux = new Mux(second.channel, { role: "home" });
    const replaced = once(firstMux, "close");
    secondMux.sendControl({ type: "hello" });
    await replaced;
    expect(secondMux.closed).toBe(false);
    expect(homeConnected(edge, "twice")).toBe(true);
    secondMux.close();
  });

  it("serves an admin status request and refuses an unknown admin command", async () => {
    const edge = await makeEdge();
    const status = (await callAdminSocket(edge.agent.state.paths.adminSocket, { command: "status" })) as {
      agent: string;
    };
    expect(status.agent).toBe("edge");
    await expect(callAdminSocket(edge.agent.state.paths.adminSocket, { command: "explode" })).rejects.toThrow(
      /unknown admin command/,
    );
  });
});
