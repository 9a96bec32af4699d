// Scenario 2: added latency. Sequential connects timed from TCP connect to the complete 220 line, and
// sequential 4 KiB transactions on one session (MAIL, RCPT, DATA, body+dot, each awaiting its reply),
// direct to smtp-sink vs through edge → tunnel → home. p50/p99 and the difference.
import { startAgents } from "../lib/agents.js";
import { readBanner, timedTransactions } from "../lib/smtp-client.js";
import { fmt, median, percentile } from "../lib/stats.js";
import { startSink } from "../lib/tools.js";

export const title = "2. Added latency (connect → 220, per-message round trip)";

async function banners(port, count) {
  const times = [];
  for (let i = 0; i < count; i++) times.push((await readBanner(port)).ms);
  return times;
}

const summary = (t) => ({ p50: percentile(t, 50), p99: percentile(t, 99), n: t.length });

export async function run({ quick, runs, log }) {
  const bannerCount = quick ? 200 : 500;
  const txCount = quick ? 200 : 500;
  const sink = await startSink();
  const agents = await startAgents({ inject: `127.0.0.1:${sink.port}` });
  const reps = [];
  try {
    // Warm both paths (JIT, connection pools of nothing) before measuring.
    await banners(agents.smtpPort, 50);
    await timedTransactions(agents.smtpPort, { count: 50 });
    for (let i = 0; i < runs; i++) {
      const rep = {
        banner: {
          direct: summary(await banners(sink.port, bannerCount)),
          tunnel: summary(await banners(agents.smtpPort, bannerCount)),
        },
        transaction: {
          direct: summary(await timedTransactions(sink.port, { count: txCount })),
          tunnel: summary(await timedTransactions(agents.smtpPort, { count: txCount })),
        },
      };
      reps.push(rep);
      log(
        `  run ${i + 1}: banner p50 direct ${fmt(rep.banner.direct.p50)} ms, tunnel ${fmt(rep.banner.tunnel.p50)} ms; ` +
          `transaction p50 direct ${fmt(rep.transaction.direct.p50)} ms, tunnel ${fmt(rep.transaction.tunnel.p50)} ms`,
      );
    }
  } finally {
    await agents.stop();
    await sink.stop();
  }
  const pick = (kind, path, q) => median(reps.map((r) => r[kind][path][q]));
  const result = { params: { bannerCount, txCount, runs }, reps };
  for (const kind of ["banner", "transaction"]) {
    result[kind] = {};
    for (const q of ["p50", "p99"]) {
      const direct = pick(kind, "direct", q);
      const tunnel = pick(kind, "tunnel", q);
      result[kind][q] = {
        direct,
        tunnel,
        addedMs: median(reps.map((r) => r[kind].tunnel[q] - r[kind].direct[q])),
      };
    }
  }
  log(
    `  median: banner p50 +${fmt(result.banner.p50.addedMs)} ms (p99 +${fmt(result.banner.p99.addedMs)} ms), ` +
      `transaction p50 +${fmt(result.transaction.p50.addedMs)} ms (p99 +${fmt(result.transaction.p99.addedMs)} ms)`,
  );
  return result;
}
