// Scenario 4: 1000 concurrent SMTP sessions held open on the edge, idle after their banner. Live part:
// each spliced through the tunnel to smtp-sink; edge and home RSS with them held, and the banner
// latency of further sessions meanwhile. Spool part (s4-spool.js, also "4-spool" on its own): the
// same with home away, the edge answering as backup MX; compared with the live part of the same run.
// Each run is a wave (1000 opened, held, dropped), waveCount() of them one after another: what a
// wave leaves behind (sessions not yet released, garbage not yet collected) shows in the peak RSS.
import { startAgents } from "../lib/agents.js";
import { cpuDelta, cpuSnapshot, sleep } from "../lib/proc.js";
import { holdSessions, probeBanners as probe } from "../lib/smtp-client.js";
import { fmt, median } from "../lib/stats.js";
import { startSink } from "../lib/tools.js";
import { run as runSpool, waveCount } from "./s4-spool.js";

export const title = "4. Idle sessions held open (live path, then spool mode)";

export async function run({ quick, runs, log }) {
  const sessions = quick ? 500 : 1000;
  const waves = waveCount({ quick, runs });
  const sink = await startSink();
  const agents = await startAgents({ inject: `127.0.0.1:${sink.port}` });
  const reps = [];
  try {
    await probe(agents.smtpPort, 20);
    for (let i = 0; i < waves; i++) {
      const before = agents.memory();
      const unloaded = await probe(agents.smtpPort, 20);
      const c0 = cpuSnapshot(agents.pids());
      const opened = await holdSessions(agents.smtpPort, sessions);
      const cpu = cpuDelta(c0, cpuSnapshot(agents.pids()));
      const held = opened.sockets;
      const refused = opened.refused;
      const openMs = opened.openMs;
      const cpuPerSessionMs = { edge: (cpu.edge * 1000) / sessions, home: (cpu.home * 1000) / sessions };
      await sleep(500);
      const memory = agents.memory();
      const loaded = await probe(agents.smtpPort, 20);
      for (const socket of held) socket.destroy();
      await sleep(1000);
      const rep = { sessions, refused, openMs, cpuPerSessionMs, before, memory, unloaded, loaded };
      reps.push(rep);
      log(
        `  wave ${i + 1}: ${sessions} held (${refused} not 220) in ${fmt(openMs)} ms; RSS edge ` +
          `${fmt(memory.edge.rss)} MiB (idle ${fmt(before.edge.rss)}), home ${fmt(memory.home.rss)} MiB ` +
          `(idle ${fmt(before.home.rss)}); new-session banner p50 ${fmt(loaded.p50)} ms (unloaded ${fmt(unloaded.p50)})`,
      );
    }
  } finally {
    await agents.stop();
    await sink.stop();
  }
  const result = {
    params: { sessions, waves },
    rssMiB: {
      edge: median(reps.map((r) => r.memory.edge.rss)),
      home: median(reps.map((r) => r.memory.home.rss)),
      edgePeak: Math.max(...reps.map((r) => r.memory.edge.hwm)),
      homePeak: Math.max(...reps.map((r) => r.memory.home.hwm)),
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
    cpuPerSessionMs: {
      edge: median(reps.map((r) => r.cpuPerSessionMs.edge)),
      home: median(reps.map((r) => r.cpuPerSessionMs.home)),
    },
    refused: reps.map((r) => r.refused),
    reps,
  };
  log(
    `  median of ${waves} waves: edge ${fmt(result.rssMiB.edge)} MiB, home ${fmt(result.rssMiB.home)} MiB at ${sessions} sessions ` +
      `(peak ${fmt(result.rssMiB.edgePeak)} / ${fmt(result.rssMiB.homePeak)}); ` +
      `banner p50 with them held ${fmt(result.bannerMs.loadedP50)} ms`,
  );
  // Spool part, fresh agents, same session count and runs.
  log("  spool part (home away, the edge answers as backup MX):");
  result.spool = await runSpool({ quick, runs, log });
  result.spoolVsLive = {
    edgeRss: result.spool.rssMiB.edge / result.rssMiB.edge,
    edgePerSessionKiB: result.spool.perSessionKiB.edge / result.perSessionKiB.edge,
    bannerLoadedP50: result.spool.bannerMs.loadedP50 / result.bannerMs.loadedP50,
  };
  log(
    `  spool vs live: edge RSS ×${fmt(result.spoolVsLive.edgeRss)}, per session ×${fmt(result.spoolVsLive.edgePerSessionKiB)}, ` +
      `new-session banner p50 ×${fmt(result.spoolVsLive.bannerLoadedP50)}`,
  );
  return result;
}
