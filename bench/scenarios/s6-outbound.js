// Scenario 6: outbound. smtp-source (10 sessions, 4 KiB, sender and header From in the home's domain)
// into the home's relay listener → relay stream through the tunnel → the edge's durable outbound
// queue → delivery (DKIM-signed) to smtp-sink acting as the remote MX (edge `transports`), against
// smtp-source → smtp-sink directly in the same run. Accepted msg/s (smtp-source's wall time: the relay
// answers 250 only once the edge has the message on disk), end-to-end delivered msg/s (until the
// edge's `queue --json` shows the outbound queue empty), CPU per message of each agent. Then the DKIM
// signing cost per message, measured directly with the edge's own signer and its key from `init`.
import { sign } from "node:crypto";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { EDGE_CLI, startAgents } from "../lib/agents.js";
import { cpuDelta, cpuSnapshot, freePort, mustRun, waitFor } from "../lib/proc.js";
import { readBanner } from "../lib/smtp-client.js";
import { fmt, median } from "../lib/stats.js";
import { smtpSource, startSink } from "../lib/tools.js";

export const title =
  "6. Outbound: smtp-source → relay listener → tunnel → edge queue → smtp-sink (remote MX) vs direct; DKIM cost";

const FROM = "bench@bench.test"; // the bench home's domain (edge init --domain bench.test)
const TO = "user@remote.test"; // routed by the edge's `transports` to smtp-sink
// "per-message": a TCP session per message (smtp-source's default, as in scenario 1); "persistent":
// each of the sessions sends its messages over one connection (smtp-source -d), as Postfix does
// towards its relayhost under load (connection cache). Both against the direct path in the same mode.
const MODES = ["per-message", "persistent"];

async function outboundQueue(edgeDir) {
  const out = await mustRun(process.execPath, [EDGE_CLI, "queue", "--json", "--dir", edgeDir]);
  return JSON.parse(out.stdout).outbound;
}

async function today(edgeDir) {
  const out = await mustRun(process.execPath, [EDGE_CLI, "status", "--json", "--dir", edgeDir]);
  return JSON.parse(out.stdout).today ?? {};
}

/** A message as smtp-source writes one (From, To, Date, Message-Id) plus Subject, with `size` body bytes. */
function message(size) {
  const head =
    `From: <${FROM}>\r\nTo: <${TO}>\r\nSubject: dkim bench\r\n` +
    `Date: ${new Date().toUTCString()}\r\nMessage-Id: <bench.${size}@bench.test>\r\n\r\n`;
  const row = `${"X".repeat(78)}\r\n`;
  return Buffer.from(head + row.repeat(Math.ceil(size / row.length)).slice(0, size - 2) + "\r\n", "latin1");
}

function timeEach(count, fn) {
  for (let i = 0; i < Math.min(20, count); i++) fn(); // warm-up
  const samples = [];
  for (let i = 0; i < count; i++) {
    const t0 = performance.now();
    fn();
    samples.push(performance.now() - t0);
  }
  return median(samples);
}

/** The edge's own signer (packages/edge/dist/dkim.js) with the key `init` made for bench.test. */
async function dkimCost(edgeDir, quick) {
  const dkim = await import(pathToFileURL(join(EDGE_CLI, "..", "dkim.js")).href);
  const key = (await dkim.loadDkimKeys(edgeDir)).get("bench.test");
  if (!key) throw new Error("the edge has no DKIM key for bench.test");
  const small = message(4096);
  const large = message(100 * 1024);
  const n = quick ? 100 : 500;
  const keyBits = key.privateKey.asymmetricKeyDetails?.modulusLength;
  return {
    keyBits,
    signature4KiBMs: timeEach(n, () => dkim.dkimSignature(small, key)),
    signature100KiBMs: timeEach(Math.ceil(n / 2), () => dkim.dkimSignature(large, key)),
    // The fixed part: one RSA signature over a header-sized input, nothing else.
    rsaSignOnlyMs: timeEach(n, () => sign("sha256", small.subarray(0, 400), key.privateKey)),
    // The per-byte part: the body canonicalization (split, regexes, join) of the 100 KiB message.
    relaxedBody100KiBMs: timeEach(Math.ceil(n / 2), () => dkim.relaxedBody(dkim.splitMessage(large).body)),
    samples: { small: n, large: Math.ceil(n / 2) },
  };
}

export async function run({ quick, runs, log }) {
  const sessions = 10;
  const size = 4096;
  const messages = quick ? 500 : 2000;
  const sink = await startSink();
  const relayPort = await freePort();
  const agents = await startAgents({
    inject: `127.0.0.1:${sink.port}`,
    edge: {
      transports: { "remote.test": `127.0.0.1:${sink.port}` },
      "outbound.messagesPerHour": 10_000_000,
    },
    home: {
      relayListen: `127.0.0.1:${relayPort}`,
      "relayLimits.messagesPerHour": 10_000_000,
    },
  });
  const reps = [];
  let memory;
  let dkim;
  try {
    await waitFor("the relay listener", async () => (await readBanner(relayPort)).line.startsWith("220"));
    // One message first, end to end: the route works and the first-use costs are paid.
    await smtpSource(relayPort, { sessions: 1, messages: 1, size, from: FROM, to: TO });
    await waitFor(
      "the warm-up message delivered",
      async () => (await outboundQueue(agents.edgeDir)).length === 0,
    );
    for (let i = 0; i < runs; i++) {
      const rep = {};
      for (const mode of MODES) {
        const load = { sessions, messages, size, from: FROM, to: TO, persistent: mode === "persistent" };
        const direct = await smtpSource(sink.port, load);
        const before = await today(agents.edgeDir);
        const c0 = cpuSnapshot(agents.pids());
        const t0 = performance.now();
        const relay = await smtpSource(relayPort, load);
        const c1 = cpuSnapshot(agents.pids());
        await waitFor(
          "the outbound queue to empty",
          async () => (await outboundQueue(agents.edgeDir)).length === 0,
          600_000,
          200,
        );
        const e2eMs = performance.now() - t0;
        const c2 = cpuSnapshot(agents.pids());
        const after = await today(agents.edgeDir);
        const accept = cpuDelta(c0, c1);
        const total = cpuDelta(c0, c2);
        const r = { direct, relay };
        r.delivered = {
          ms: e2eMs,
          rate: messages / (e2eMs / 1000),
          count: (after.delivered ?? Number.NaN) - (before.delivered ?? Number.NaN),
          relayed: (after.relayed ?? Number.NaN) - (before.relayed ?? Number.NaN),
          failed: (after.failed ?? Number.NaN) - (before.failed ?? Number.NaN),
        };
        // The whole run (acceptance, and delivery, which overlaps it) and the acceptance phase alone.
        r.cpuPerMsgMs = {
          edge: (total.edge * 1000) / messages,
          home: (total.home * 1000) / messages,
          edgeDuringAccept: (accept.edge * 1000) / messages,
          homeDuringAccept: (accept.home * 1000) / messages,
        };
        rep[mode] = r;
        log(
          `  run ${i + 1}, ${mode}: direct ${fmt(direct.rate)} msg/s; relay accepted ${fmt(relay.rate)} msg/s ` +
            `(${fmt(relay.rate / direct.rate)} of direct), delivered end to end ${fmt(r.delivered.rate)} msg/s ` +
            `(${r.delivered.count} delivered, ${r.delivered.relayed} relayed, ${r.delivered.failed} failed); ` +
            `CPU/msg edge ${fmt(r.cpuPerMsgMs.edge)} ms, home ${fmt(r.cpuPerMsgMs.home)} ms`,
        );
      }
      reps.push(rep);
    }
    memory = agents.memory();
    dkim = await dkimCost(agents.edgeDir, quick);
  } finally {
    await agents.stop();
    await sink.stop();
  }
  log(
    `  DKIM (edge's signer, RSA-${dkim.keyBits}): 4 KiB ${fmt(dkim.signature4KiBMs)} ms, 100 KiB ${fmt(dkim.signature100KiBMs)} ms ` +
      `per message (RSA sign alone ${fmt(dkim.rsaSignOnlyMs)} ms; relaxed body of 100 KiB ${fmt(dkim.relaxedBody100KiBMs)} ms)`,
  );
  const summary = (mode) => {
    const rs = reps.map((rep) => rep[mode]);
    return {
      msgsPerSec: {
        direct: median(rs.map((r) => r.direct.rate)),
        relayAccepted: median(rs.map((r) => r.relay.rate)),
        deliveredEndToEnd: median(rs.map((r) => r.delivered.rate)),
      },
      ratioToDirect: {
        relayAccepted: median(rs.map((r) => r.relay.rate / r.direct.rate)),
        deliveredEndToEnd: median(rs.map((r) => r.delivered.rate / r.direct.rate)),
      },
      cpuPerMsgMs: {
        edge: median(rs.map((r) => r.cpuPerMsgMs.edge)),
        home: median(rs.map((r) => r.cpuPerMsgMs.home)),
        edgeDuringAccept: median(rs.map((r) => r.cpuPerMsgMs.edgeDuringAccept)),
        homeDuringAccept: median(rs.map((r) => r.cpuPerMsgMs.homeDuringAccept)),
      },
      delivered: rs.map((r) => r.delivered.count),
    };
  };
  const result = {
    params: { sessions, size, messages, runs, from: FROM, to: TO },
    modes: Object.fromEntries(MODES.map((mode) => [mode, summary(mode)])),
    dkim,
    rssMiB: memory,
    reps,
  };
  for (const mode of MODES) {
    const m = result.modes[mode];
    log(
      `  median, ${mode}: accepted ${fmt(m.msgsPerSec.relayAccepted)} msg/s = ${fmt(m.ratioToDirect.relayAccepted)} of direct, ` +
        `delivered ${fmt(m.msgsPerSec.deliveredEndToEnd)} msg/s = ${fmt(m.ratioToDirect.deliveredEndToEnd)}; ` +
        `CPU/msg edge ${fmt(m.cpuPerMsgMs.edge)} ms, home ${fmt(m.cpuPerMsgMs.home)} ms`,
    );
  }
  return result;
}
