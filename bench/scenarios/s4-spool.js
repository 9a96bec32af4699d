// Scenario 4 (spool part): the same 1000 idle sessions, but with home away, so the edge answers each
// one itself as backup MX (smtp-server, banner "backup MX") instead of splicing it through the tunnel.
// Edge RSS with them held, edge CPU per session opened, and the banner latency of further sessions
// meanwhile. Run on its own as "4-spool"; scenario 4 runs it after the live part, in the same run.
import { homeConnected, startAgents } from "../lib/agents.js";
import { cpuDelta, cpuSnapshot, sleep, waitFor } from "../lib/proc.js";
import { holdSessions, probeBanners, readBanner } from "../lib/smtp-client.js";
import { fmt, median } from "../lib/stats.js";
import { startSink } from "../lib/tools.js";

export const title = "4-spool. Idle sessions held open on the edge in spool mode (home away)";

/** Waves of sessions one after another: 10 (4 with --quick), more with --runs; enough for leftovers to add up. */
export function waveCount({ quick, runs }) {
  return Math.max(runs, quick ? 4 : 10);
}

export async function run({ quick, runs, log }) {
  const sessions = quick ? 500 : 1000;
  const waves = waveCount({ quick, runs });
  const sink = await startSink();
  // Paired and live first (as in the live part), then home stops: every session is the edge's own.
  const agents = await startAgents({ inject: `127.0.0.1:${sink.port}` });
  const reps = [];
  let banner;
  try {
    await agents.home.stop();
    await waitFor("the edge to see home gone", async () => !(await homeConnected(agents.edgeDir)));
    banner = (await readBanner(agents.smtpPort)).line;
    await probeBanners(agents.smtpPort, 20);
    for (let i = 0; i < waves; i++) {
      const before = agents.memory();
      const unloaded = await probeBanners(agents.smtpPort, 20);
      const c0 = cpuSnapshot({ edge: agents.edge.pid });
      const held = await holdSessions(agents.smtpPort, sessions);
      const cpu = cpuDelta(c0, cpuSnapshot({ edge: agents.edge.pid }));
      await sleep(500);
      const memory = agents.memory();
      const loaded = await probeBanners(agents.smtpPort, 20);
      for (const socket of held.sockets) socket.destroy();
      await sleep(1000);
      const rep = {
        sessions,
        refused: held.refused,
        openMs: held.openMs,
        edgeCpuPerSessionMs: (cpu.edge * 1000) / sessions,
        before,
        memory,
        unloaded: { p50: unloaded.p50, max: unloaded.max },
        loaded: { p50: loaded.p50, max: loaded.max },
      };
      reps.push(rep);
      log(
        `  wave ${i + 1}: ${sessions} held in spool mode (${held.refused} not 220) in ${fmt(held.openMs)} ms; ` +
          `RSS edge ${fmt(memory.edge.rss)} MiB (idle ${fmt(before.edge.rss)}); edge CPU ${fmt(rep.edgeCpuPerSessionMs)} ms ` +
          `per session opened; new-session banner p50 ${fmt(loaded.p50)} ms, max ${fmt(loaded.max)} (unloaded ${fmt(unloaded.p50)})`,
      );
    }
  } finally {
    await agents.stop();
    await sink.stop();
  }
  const result = {
    params: { sessions, waves },
    banner,
    rssMiB: {
      edge: median(reps.map((r) => r.memory.edge.rss)),
      edgeIdleBefore: median(reps.map((r) => r.before.edge.rss)),
      edgePeak: Math.max(...reps.map((r) => r.memory.edge.hwm)),
    },
    perSessionKiB: {
      edge: median(reps.map((r) => ((r.memory.edge.rss - r.before.edge.rss) * 1024) / sessions)),
    },
    edgeCpuPerSessionMs: median(reps.map((r) => r.edgeCpuPerSessionMs)),
    openMs: median(reps.map((r) => r.openMs)),
    bannerMs: {
      unloadedP50: median(reps.map((r) => r.unloaded.p50)),
      loadedP50: median(reps.map((r) => r.loaded.p50)),
      loadedMax: median(reps.map((r) => r.loaded.max)),
    },
    refused: reps.map((r) => r.refused),
    reps,
  };
  log(
    `  median of ${waves} waves (spool): edge ${fmt(result.rssMiB.edge)} MiB at ${sessions} sessions (idle ` +
      `${fmt(result.rssMiB.edgeIdleBefore)}, peak ${fmt(result.rssMiB.edgePeak)}); ` +
      `banner p50 with them held ${fmt(result.bannerMs.loadedP50)} ms (unloaded ${fmt(result.bannerMs.unloadedP50)})`,
  );
  return result;
}
