// Scenario 3: bulk. One 100 MiB message with smtp-source (-m 1 -l SIZE) directly into smtp-sink vs
// through edge → tunnel → home; MB/s, CPU per MB of each agent, and peak RSS (VmHWM) of the agents.
import { startAgents } from "../lib/agents.js";
import { cpuDelta, cpuSnapshot } from "../lib/proc.js";
import { fmt, median } from "../lib/stats.js";
import { smtpSource, startSink } from "../lib/tools.js";

export const title = "3. Bulk: one 100 MiB message";

export async function run({ quick, runs, log }) {
  const size = (quick ? 32 : 100) * 1024 * 1024;
  const mb = size / 1e6;
  const sink = await startSink();
  const agents = await startAgents({ inject: `127.0.0.1:${sink.port}` });
  const idle = agents.memory();
  const reps = [];
  let memory;
  try {
    // Untimed warm-up (a quarter of the size through both paths), as in scenarios 1 and 5: run 1 was
    // the agents' JIT warming up. Peak RSS is a high-water mark, so the warm-up cannot lower it.
    await smtpSource(sink.port, { sessions: 1, messages: 1, size: size / 4 });
    await smtpSource(agents.smtpPort, { sessions: 1, messages: 1, size: size / 4 });
    for (let i = 0; i < runs; i++) {
      const direct = await smtpSource(sink.port, { sessions: 1, messages: 1, size });
      const c0 = cpuSnapshot(agents.pids());
      const tunnel = await smtpSource(agents.smtpPort, { sessions: 1, messages: 1, size });
      const cpu = cpuDelta(c0, cpuSnapshot(agents.pids()));
      const rep = {
        directMBps: mb / (direct.ms / 1000),
        tunnelMBps: mb / (tunnel.ms / 1000),
        cpuPerMBms: { edge: (cpu.edge * 1000) / mb, home: (cpu.home * 1000) / mb },
      };
      rep.ratio = rep.tunnelMBps / rep.directMBps;
      reps.push(rep);
      log(
        `  run ${i + 1}: direct ${fmt(rep.directMBps)} MB/s, tunnel ${fmt(rep.tunnelMBps)} MB/s (ratio ${fmt(rep.ratio)})`,
      );
    }
    memory = agents.memory();
  } finally {
    await agents.stop();
    await sink.stop();
  }
  const result = {
    params: { sizeBytes: size, runs },
    MBps: { direct: median(reps.map((r) => r.directMBps)), tunnel: median(reps.map((r) => r.tunnelMBps)) },
    ratio: median(reps.map((r) => r.ratio)),
    cpuPerMBms: {
      edge: median(reps.map((r) => r.cpuPerMBms.edge)),
      home: median(reps.map((r) => r.cpuPerMBms.home)),
    },
    rssIdleMiB: { edge: idle.edge.rss, home: idle.home.rss },
    peakRssMiB: { edge: memory.edge.hwm, home: memory.home.hwm },
    reps,
  };
  log(
    `  median: tunnel ${fmt(result.MBps.tunnel)} MB/s = ${fmt(result.ratio)} of direct; peak RSS edge ` +
      `${fmt(result.peakRssMiB.edge)} MiB, home ${fmt(result.peakRssMiB.home)} MiB`,
  );
  return result;
}
