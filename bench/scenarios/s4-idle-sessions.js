// Scenario 4 (live part): 1000 concurrent SMTP sessions held open on the edge, each spliced through
// the tunnel to smtp-sink and idle after its banner. Edge and home RSS with them held, and the banner
// latency of further sessions meanwhile. Spool mode is not built yet.
import { startAgents } from "../lib/agents.js";
import { sleep } from "../lib/proc.js";
import { readBanner } from "../lib/smtp-client.js";
import { fmt, median, percentile } from "../lib/stats.js";
import { startSink } from "../lib/tools.js";

export const title = "4. Idle sessions held open (live path)";

async function probe(port, count) {
  const times = [];
  for (let i = 0; i < count; i++) times.push((await readBanner(port)).ms);
  return { p50: percentile(times, 50), max: Math.max(...times) };
}

export async function run({ quick, runs, log }) {
  const sessions = quick ? 500 : 1000;
  const sink = await startSink();
  const agents = await startAgents({ inject: `127.0.0.1:${sink.port}` });
  const reps = [];
  try {
    await probe(agents.smtpPort, 20);
    for (let i = 0; i < runs; i++) {
      const before = agents.memory();
      const unloaded = await probe(agents.smtpPort, 20);
      const held = [];
      const started = performance.now();
      let refused = 0;
      for (let opened = 0; opened < sessions; opened += 50) {
        const batch = await Promise.all(
          Array.from({ length: Math.min(50, sessions - opened) }, () =>
            readBanner(agents.smtpPort, { quit: false }),
          ),
        );
        for (const b of batch) {
          if (!b.line.startsWith("220")) refused++;
          held.push(b.socket);
        }
      }
      const openMs = performance.now() - started;
      await sleep(500);
      const memory = agents.memory();
      const loaded = await probe(agents.smtpPort, 20);
      for (const socket of held) socket.destroy();
      await sleep(1000);
      const rep = { sessions, refused, openMs, before, memory, unloaded, loaded };
      reps.push(rep);
      log(
        `  run ${i + 1}: ${sessions} held (${refused} not 220) in ${fmt(openMs)} ms; RSS edge ` +
          `${fmt(memory.edge.rss)} MiB (idle ${fmt(before.edge.rss)}), home ${fmt(memory.home.rss)} MiB ` +
          `(idle ${fmt(before.home.rss)}); new-session banner p50 ${fmt(loaded.p50)} ms (unloaded ${fmt(unloaded.p50)})`,
      );
    }
  } finally {
    await agents.stop();
    await sink.stop();
  }
  const result = {
    params: { sessions, runs },
    rssMiB: {
      edge: median(reps.map((r) => r.memory.edge.rss)),
      home: median(reps.map((r) => r.memory.home.rss)),
      edgeIdleBefore: median(reps.map((r) => r.before.edge.rss)),
      homeIdleBefore: median(reps.map((r) => r.before.home.rss)),
    },
    perSessionKiB: {
      edge: median(reps.map((r) => ((r.memory.edge.rss - r.before.edge.rss) * 1024) / sessions)),
      home: median(reps.map((r) => ((r.memory.home.rss - r.before.home.rss) * 1024) / sessions)),
    },
    bannerMs: {
      unloadedP50: median(reps.map((r) => r.unloaded.p50)),
      loadedP50: median(reps.map((r) => r.loaded.p50)),
      loadedMax: median(reps.map((r) => r.loaded.max)),
    },
    refused: reps.map((r) => r.refused),
    reps,
  };
  log(
    `  median: edge ${fmt(result.rssMiB.edge)} MiB, home ${fmt(result.rssMiB.home)} MiB at ${sessions} sessions; ` +
      `banner p50 with them held ${fmt(result.bannerMs.loadedP50)} ms`,
  );
  return result;
}
