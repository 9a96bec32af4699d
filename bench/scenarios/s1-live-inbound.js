// Scenario 1: live inbound, many small messages. smtp-source (20 sessions, 4 KiB messages) into
// smtp-sink directly (the anchor, 1.0), through the bare Node proxy, through two of them in a row (the
// tunnel's two processes with neither crypto nor multiplexing), through the issue's throwaway two-hop
// WebSocket multiplexer (no crypto, no batching, no flow control) and the same with each message
// sealed by ChaCha20-Poly1305, through OpenSSH -L, and through edge → tunnel → home. Repetitions
// interleave the paths so every ratio compares the same moment. Also: CPU time per message of each
// two-process path, the machine's idle share during each, and a CPU profile of both agents.
import { mkdir, rm } from "node:fs/promises";
import { join } from "node:path";
import { startAgents } from "../lib/agents.js";
import { hottest, newestProfile } from "../lib/cpuprofile.js";
import { fmt, median } from "../lib/stats.js";
import {
  measuredLoad,
  smtpSource,
  startBareMux,
  startNodeProxy,
  startSink,
  startSshTunnel,
} from "../lib/tools.js";

export const title = "1. Live inbound, small messages (smtp-source → … → smtp-sink)";

export async function run({ quick, runs, resultsDir, log }) {
  const sessions = 20;
  const size = 4096;
  const messages = quick ? 1000 : 5000;
  const sshMessages = quick ? 200 : 1000;
  const sink = await startSink();
  const proxy = await startNodeProxy(sink.port);
  const twoHop = await startNodeProxy(proxy.port);
  const bareMux = await startBareMux(sink.port);
  const sealedMux = await startBareMux(sink.port, { chacha: true });
  let ssh;
  try {
    ssh = await startSshTunnel(sink.port);
  } catch (error) {
    log(`  ssh anchor unavailable: ${error.message.split("\n")[0]}`);
  }
  const agents = await startAgents({ inject: `127.0.0.1:${sink.port}` });
  const reps = [];
  let memory;
  try {
    // Untimed warm-up, the same load into every Node path and the direct one: the steady state of
    // long-lived agents is measured, not V8 compiling their hot paths during run 1 (which was 20-40 %
    // below runs 2-3 in every earlier run). OpenSSH is C and is not warmed.
    const warmUp = quick ? 200 : 1000;
    const paths = [sink.port, proxy.port, twoHop.port, bareMux.port, sealedMux.port, agents.smtpPort];
    for (const port of paths) await smtpSource(port, { sessions, messages: warmUp, size });
    // The CPU per message of a path's processes together, or of each agent (`split`).
    const measure = async (port, pids, { count = messages, split = false } = {}) => {
      const load = await measuredLoad(port, pids, { sessions, messages: count, size });
      return split ? load : { ...load, cpuPerMsgMs: load.totalCpuPerMsgMs };
    };
    for (let i = 0; i < runs; i++) {
      const rep = {};
      rep.direct = await measure(sink.port, {});
      rep.proxy = await measure(proxy.port, { proxy: proxy.pid });
      rep.twoHop = await measure(twoHop.port, { first: twoHop.pid, second: proxy.pid });
      rep.bareMux = await measure(bareMux.port, bareMux.pids);
      rep.sealedMux = await measure(sealedMux.port, sealedMux.pids);
      if (ssh) rep.ssh = await measure(ssh.port, ssh.pids, { count: sshMessages });
      rep.tunnel = await measure(agents.smtpPort, agents.pids(), { split: true });
      reps.push(rep);
      log(
        `  run ${i + 1}: direct ${fmt(rep.direct.rate)} msg/s, node proxy ${fmt(rep.proxy.rate)}, ` +
          `two node proxies ${fmt(rep.twoHop.rate)}, bare ws mux ${fmt(rep.bareMux.rate)}, ` +
          `sealed bare ws mux ${fmt(rep.sealedMux.rate)}, ` +
          `ssh -L ${rep.ssh ? fmt(rep.ssh.rate) : "n/a"}, tunnel ${fmt(rep.tunnel.rate)} ` +
          `(ratio ${fmt(rep.tunnel.rate / rep.direct.rate)})`,
      );
    }
    memory = agents.memory();
  } finally {
    await agents.stop();
  }

  // A profiled pass: fresh agents under --cpu-prof, one full smtp-source load, clean stop writes profiles.
  const profileDir = join(resultsDir, "profiles");
  await rm(profileDir, { recursive: true, force: true });
  const profiles = {};
  for (const role of ["edge", "home"]) await mkdir(join(profileDir, role), { recursive: true });
  const profiled = await startAgents({
    inject: `127.0.0.1:${sink.port}`,
    nodeArgs: {
      edge: ["--cpu-prof", `--cpu-prof-dir=${join(profileDir, "edge")}`],
      home: ["--cpu-prof", `--cpu-prof-dir=${join(profileDir, "home")}`],
    },
  });
  try {
    await smtpSource(profiled.smtpPort, { sessions, messages, size });
  } finally {
    await profiled.stop();
  }
  for (const role of ["edge", "home"]) {
    const file = await newestProfile(join(profileDir, role));
    if (file) profiles[role] = { file, ...(await hottest(file, { top: 5 })) };
  }
  await sealedMux.stop();
  await bareMux.stop();
  await twoHop.stop();
  await proxy.stop();
  await ssh?.stop();
  await sink.stop();

  const ratio = (path) => median(reps.filter((r) => r[path]).map((r) => r[path].rate / r.direct.rate));
  const result = {
    params: { sessions, size, messages, sshMessages, runs },
    msgsPerSec: {
      direct: median(reps.map((r) => r.direct.rate)),
      nodeProxy: median(reps.map((r) => r.proxy.rate)),
      twoNodeProxies: median(reps.map((r) => r.twoHop.rate)),
      bareWsMux: median(reps.map((r) => r.bareMux.rate)),
      sealedBareWsMux: median(reps.map((r) => r.sealedMux.rate)),
      ssh: ssh ? median(reps.map((r) => r.ssh.rate)) : null,
      tunnel: median(reps.map((r) => r.tunnel.rate)),
    },
    ratioToDirect: {
      nodeProxy: ratio("proxy"),
      twoNodeProxies: ratio("twoHop"),
      bareWsMux: ratio("bareMux"),
      sealedBareWsMux: ratio("sealedMux"),
      ssh: ssh ? ratio("ssh") : null,
      tunnel: ratio("tunnel"),
    },
    tunnelVsTwoNodeProxies: median(reps.map((r) => r.tunnel.rate / r.twoHop.rate)),
    tunnelVsSealedBareWsMux: median(reps.map((r) => r.tunnel.rate / r.sealedMux.rate)),
    tunnelVsSsh: ssh ? median(reps.map((r) => r.tunnel.rate / r.ssh.rate)) : null,
    tunnelVsNodeProxy: median(reps.map((r) => r.tunnel.rate / r.proxy.rate)),
    cpuPerMsgMs: {
      edge: median(reps.map((r) => r.tunnel.cpuPerMsgMs.edge)),
      home: median(reps.map((r) => r.tunnel.cpuPerMsgMs.home)),
      nodeProxy: median(reps.map((r) => r.proxy.cpuPerMsgMs)),
      twoNodeProxies: median(reps.map((r) => r.twoHop.cpuPerMsgMs)),
      bareWsMux: median(reps.map((r) => r.bareMux.cpuPerMsgMs)),
      sealedBareWsMux: median(reps.map((r) => r.sealedMux.cpuPerMsgMs)),
      sshClient: ssh ? median(reps.map((r) => r.ssh.cpuPerMsgMs)) : null,
    },
    idleShare: Object.fromEntries(
      ["direct", "proxy", "twoHop", "bareMux", "sealedMux", "tunnel"].map((path) => [
        path,
        median(reps.map((r) => r[path].idle)),
      ]),
    ),
    rssMiB: { edge: memory.edge, home: memory.home },
    profiles,
    reps,
  };
  log(
    `  median: tunnel ${fmt(result.msgsPerSec.tunnel)} msg/s = ${fmt(result.ratioToDirect.tunnel)} of direct ` +
      `(node proxy ${fmt(result.ratioToDirect.nodeProxy)}, two node proxies ` +
      `${fmt(result.ratioToDirect.twoNodeProxies)}, bare ws mux ${fmt(result.ratioToDirect.bareWsMux)}, ` +
      `sealed bare ws mux ${fmt(result.ratioToDirect.sealedBareWsMux)}, ssh ${fmt(result.ratioToDirect.ssh)}); ` +
      `CPU/msg edge ${fmt(result.cpuPerMsgMs.edge)} ms, home ${fmt(result.cpuPerMsgMs.home)} ms ` +
      `(two proxies ${fmt(result.cpuPerMsgMs.twoNodeProxies)}, sealed bare mux ${fmt(result.cpuPerMsgMs.sealedBareWsMux)}); ` +
      `machine idle: tunnel ${fmt(result.idleShare.tunnel * 100, 2)} %, two proxies ` +
      `${fmt(result.idleShare.twoHop * 100, 2)} %, sealed bare mux ${fmt(result.idleShare.sealedMux * 100, 2)} %`,
  );
  for (const [role, p] of Object.entries(profiles)) {
    log(
      `  hottest in ${role}: ${p.top.map((t) => `${t.fn} (${(t.shareOfBusy * 100).toFixed(1)}%)`).join("; ")}`,
    );
  }
  return result;
}
