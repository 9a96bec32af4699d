// Scenario 7: the tunnel alone over a real WebSocket on loopback.
// (a) Noise IK handshakes in-process with the shared HandshakeState (initiator + responder in one
//     thread; the responder's share timed separately, since that is what a flood costs the edge);
// (b) full tunnel handshakes against the real edge process: many concurrent WebSocket connects, each a
//     complete IK handshake, closed before any transport message (so the live tunnel is never replaced);
//     dialled by a lean initiator (bench/lib/tunnel-dialer.js: raw socket, same bytes on the wire) so the
//     load generator does not starve the edge of the shared CPUs, and also by home's own `ws` client;
// (c) encrypted stream throughput: one TCP stream through a forwarded port (edge → tunnel → home →
//     byte sink) with full-size frames, vs the same bytes direct and through the bare Node proxy.
import { startAgents } from "../lib/agents.js";
import { cpuDelta, cpuSnapshot, freePort } from "../lib/proc.js";
import { fmt, median } from "../lib/stats.js";
import { pushBytes, startByteSink, startNodeProxy, startSink } from "../lib/tools.js";
import { dialTunnel } from "../lib/tunnel-dialer.js";

export const title = "7. Tunnel alone: handshakes/s and encrypted stream throughput";

async function inProcessHandshakes(count) {
  const { HandshakeState, generateKeyPair, TUNNEL_PROLOGUE } = await import("@mxtunnel/shared");
  const responderKey = generateKeyPair();
  const initiatorKey = generateKeyPair();
  const payload = new TextEncoder().encode('{"version":"bench","protocol":1}');
  let responderMs = 0;
  const started = performance.now();
  for (let i = 0; i < count; i++) {
    const initiator = new HandshakeState({
      pattern: "IK",
      initiator: true,
      prologue: TUNNEL_PROLOGUE,
      staticKeyPair: initiatorKey,
      remoteStaticPublicKey: responderKey.publicKey,
    });
    const m1 = initiator.writeMessage(payload);
    const t0 = performance.now();
    const responder = new HandshakeState({
      pattern: "IK",
      initiator: false,
      prologue: TUNNEL_PROLOGUE,
      staticKeyPair: responderKey,
    });
    responder.readMessage(m1);
    const m2 = responder.writeMessage(payload);
    responder.split();
    responderMs += performance.now() - t0;
    initiator.readMessage(m2);
    initiator.split();
  }
  const totalMs = performance.now() - started;
  return { count, perSecond: count / (totalMs / 1000), responderPerSecond: count / (responderMs / 1000) };
}

/** `client`: "lean" (tunnel-dialer) or "ws" (home's WebSocket client and handshake driver). */
async function edgeHandshakes(agents, count, concurrency, client) {
  const { HomeState } = await import("@mxtunnel/home");
  const shared = await import("@mxtunnel/shared");
  const { default: WebSocket } = await import("ws");
  // Dials like home does (same subprotocol and ws options), without home's error wording.
  const connectToEdge = (baseUrl, path) =>
    new Promise((resolve, reject) => {
      const ws = new WebSocket(new URL(path, `${baseUrl}/`), [shared.SUBPROTOCOL], {
        maxPayload: shared.WS_MAX_PAYLOAD,
        perMessageDeflate: false,
      });
      ws.once("open", () => {
        ws.removeAllListeners();
        resolve(new shared.WebSocketTransport(ws));
      });
      ws.once("error", reject);
      ws.once("unexpected-response", (_req, res) => reject(new Error(`HTTP ${res.statusCode}`)));
    });
  const homeState = await HomeState.open(agents.homeDir, {});
  const edge = homeState.edges()[0];
  const remote = shared.decodeKey(edge.publicKey, "edge key");
  const { port } = new URL(edge.url);
  const payload = shared.encodePayload({ version: shared.AGENT_VERSION, protocol: shared.PROTOCOL_VERSION });
  const lean = async () => {
    const state = new shared.HandshakeState({
      pattern: "IK",
      initiator: true,
      prologue: shared.TUNNEL_PROLOGUE,
      staticKeyPair: homeState.keyPair,
      remoteStaticPublicKey: remote,
    });
    await dialTunnel({
      host: "127.0.0.1",
      port: Number(port),
      path: shared.TUNNEL_PATH,
      subprotocol: shared.SUBPROTOCOL,
      writeMessage1: () => state.writeMessage(payload),
      readMessage2: (message) => {
        shared.decodePayload(state.readMessage(message));
        state.split();
      },
    });
  };
  let done = 0;
  let failed = 0;
  const viaWs = async () => {
    const transport = await connectToEdge(edge.url, shared.TUNNEL_PATH);
    const channel = await shared.initiateHandshake(
      transport,
      {
        pattern: "IK",
        prologue: shared.TUNNEL_PROLOGUE,
        staticKeyPair: homeState.keyPair,
        remoteStaticPublicKey: remote,
        payload: { version: shared.AGENT_VERSION, protocol: shared.PROTOCOL_VERSION },
        timeoutMs: 10_000,
      },
      (secure) => secure,
    );
    channel.close();
  };
  const one = client === "lean" ? lean : viaWs;
  const c0 = cpuSnapshot({ edge: agents.edge.pid, bench: process.pid });
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (done + failed < count) {
        try {
          done++;
          await one();
        } catch {
          done--;
          failed++;
        }
      }
    }),
  );
  const ms = performance.now() - started;
  const cpu = cpuDelta(c0, cpuSnapshot({ edge: agents.edge.pid, bench: process.pid }));
  return {
    count: done,
    failed,
    perSecond: done / (ms / 1000),
    edgeCpuPerHandshakeMs: (cpu.edge * 1000) / done,
    // The initiators' CPU (this process): when it exceeds the edge's, the client sets the rate.
    clientCpuPerHandshakeMs: (cpu.bench * 1000) / done,
  };
}

export async function run({ quick, runs, log }) {
  const streamBytes = (quick ? 256 : 1024) * 1024 * 1024;
  const inProcessCount = quick ? 1000 : 3000;
  const edgeCount = quick ? 300 : 1000;
  const byteSink = await startByteSink();
  const smtpSink = await startSink();
  const forwardPort = await freePort();
  const agents = await startAgents({
    inject: `127.0.0.1:${smtpSink.port}`,
    edge: {
      forwards: [{ listen: `127.0.0.1:${forwardPort}`, service: "bulk" }],
      "limits.handshakesPerIpPerSecond": 100_000,
      "limits.handshakeBurst": 100_000,
      "limits.maxPendingHandshakes": 10_000,
    },
    home: { services: { bulk: { target: `127.0.0.1:${byteSink.port}`, proxyProtocol: "off" } } },
  });
  const proxy = await startNodeProxy(byteSink.port);
  const reps = [];
  try {
    await pushBytes(forwardPort, 16 * 1024 * 1024); // warm-up
    // The edge (and the bench's initiators) need a couple of thousand handshakes to settle: before
    // that, a handshake costs the edge ~0.9 ms of CPU instead of ~0.55-0.65 ms (JIT, young heap).
    await edgeHandshakes(agents, quick ? 500 : 2000, 32, "lean");
    await edgeHandshakes(agents, quick ? 100 : 500, 32, "ws");
    for (let i = 0; i < runs; i++) {
      const rep = {};
      rep.inProcess = await inProcessHandshakes(inProcessCount);
      rep.edge = await edgeHandshakes(agents, edgeCount, 32, "lean");
      rep.edgeWsClient = await edgeHandshakes(agents, edgeCount, 32, "ws");
      rep.direct = await pushBytes(byteSink.port, streamBytes);
      rep.proxy = await pushBytes(proxy.port, streamBytes);
      const c0 = cpuSnapshot(agents.pids());
      rep.tunnel = await pushBytes(forwardPort, streamBytes);
      const cpu = cpuDelta(c0, cpuSnapshot(agents.pids()));
      const mb = streamBytes / 1e6;
      rep.tunnel.cpuPerMBms = { edge: (cpu.edge * 1000) / mb, home: (cpu.home * 1000) / mb };
      reps.push(rep);
      log(
        `  run ${i + 1}: in-process ${fmt(rep.inProcess.perSecond)} handshakes/s (responder alone ` +
          `${fmt(rep.inProcess.responderPerSecond)}/s); real edge ${fmt(rep.edge.perSecond)}/s ` +
          `(${rep.edge.failed} failed; CPU per handshake edge ${fmt(rep.edge.edgeCpuPerHandshakeMs)} ms, ` +
          `client ${fmt(rep.edge.clientCpuPerHandshakeMs)} ms), with the ws client ${fmt(rep.edgeWsClient.perSecond)}/s ` +
          `(edge ${fmt(rep.edgeWsClient.edgeCpuPerHandshakeMs)} ms, client ${fmt(rep.edgeWsClient.clientCpuPerHandshakeMs)} ms); stream direct ${fmt(rep.direct.mbps)} MB/s, node proxy ` +
          `${fmt(rep.proxy.mbps)}, tunnel ${fmt(rep.tunnel.mbps)} MB/s`,
      );
    }
  } finally {
    await agents.stop();
    await proxy.stop();
    await byteSink.stop();
    await smtpSink.stop();
  }
  const result = {
    params: { streamBytes, inProcessCount, edgeCount, edgeConcurrency: 32, runs },
    handshakesPerSecond: {
      inProcessPair: median(reps.map((r) => r.inProcess.perSecond)),
      inProcessResponderOnly: median(reps.map((r) => r.inProcess.responderPerSecond)),
      realEdge: median(reps.map((r) => r.edge.perSecond)),
      realEdgeWsClient: median(reps.map((r) => r.edgeWsClient.perSecond)),
    },
    edgeCpuPerHandshakeMs: median(reps.map((r) => r.edge.edgeCpuPerHandshakeMs)),
    clientCpuPerHandshakeMs: median(reps.map((r) => r.edge.clientCpuPerHandshakeMs)),
    wsClient: {
      edgeCpuPerHandshakeMs: median(reps.map((r) => r.edgeWsClient.edgeCpuPerHandshakeMs)),
      clientCpuPerHandshakeMs: median(reps.map((r) => r.edgeWsClient.clientCpuPerHandshakeMs)),
    },
    streamMBps: {
      direct: median(reps.map((r) => r.direct.mbps)),
      nodeProxy: median(reps.map((r) => r.proxy.mbps)),
      tunnel: median(reps.map((r) => r.tunnel.mbps)),
    },
    ratioToDirect: median(reps.map((r) => r.tunnel.mbps / r.direct.mbps)),
    cpuPerMBms: {
      edge: median(reps.map((r) => r.tunnel.cpuPerMBms.edge)),
      home: median(reps.map((r) => r.tunnel.cpuPerMBms.home)),
    },
    reps,
  };
  log(
    `  median: ${fmt(result.handshakesPerSecond.realEdge)} handshakes/s on the real edge ` +
      `(${fmt(result.handshakesPerSecond.realEdgeWsClient)} with the ws client), ` +
      `${fmt(result.streamMBps.tunnel)} MB/s encrypted stream (${fmt(result.ratioToDirect)} of direct)`,
  );
  return result;
}
