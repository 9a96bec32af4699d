// Scenario 5: backup MX. With home away, smtp-source (20 sessions, 4 KiB) into the edge, which seals
// and fsyncs each message before its 250 — against a real Postfix accepting into its own queue and
// against smtp-sink (no disk), in the same run, on the same filesystem. An fsync anchor (write 4 KiB,
// fsync, rename, fsync the directory) says what the disk allows. Then home comes back and the spool
// drains into that Postfix (its PROXY-protocol inject port, as in the product): drain rate.
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtemp, open, readdir, rename, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EDGE_CLI, editJson, HOME_CLI, HOME_NODE_FLAGS, homeConnected, startAgents } from "../lib/agents.js";
import { cpuDelta, cpuSnapshot, idleShare, machineTicks, mustRun, spawnTool, waitFor } from "../lib/proc.js";
import { fmt, median } from "../lib/stats.js";
import { smtpSource, startSink } from "../lib/tools.js";

export const title = "5. Spool acceptance with home away (4 KiB, fsync'd) vs Postfix's own queue; drain rate";

async function fsyncAnchor(dir, count) {
  const samples = [];
  const handle = await open(dir, "r");
  const block = randomBytes(4096);
  for (let i = 0; i < count; i++) {
    const t0 = performance.now();
    const tmp = join(dir, `.a${i}.tmp`);
    const file = await open(tmp, "w");
    await file.write(block);
    await file.sync();
    await file.close();
    await rename(tmp, join(dir, `a${i}`));
    await handle.sync();
    samples.push(performance.now() - t0);
  }
  await handle.close();
  return median(samples);
}

async function startPostfixLab() {
  // Node itself with tsx's loader, not `npx tsx`: npx exits on SIGTERM without passing it on, and the
  // orphaned lab would keep Postfix running and this process's pipes open (the bench never exited).
  const args = ["--import", "tsx", "scripts/postfix-lab.ts", "start", "--no-tls", "--no-ipv6"];
  const lab = spawnTool(process.execPath, args, {
    label: "postfix-lab",
    cwd: join(import.meta.dirname, "..", ".."),
  });
  await waitFor("the Postfix lab", () => lab.stdout.includes("\n"), 60_000, 100);
  const info = JSON.parse(lab.stdout.split("\n")[0]);
  return { info, stop: () => lab.stop("SIGTERM", 10_000) };
}

/** Messages in the lab Postfix's queue (incoming, active, deferred, hold, maildrop), counted as files. */
async function postfixQueued(labDir) {
  let count = 0;
  for (const name of ["incoming", "active", "deferred", "hold", "maildrop"]) {
    const entries = await readdir(join(labDir, "queue", name), {
      recursive: true,
      withFileTypes: true,
    }).catch(() => []);
    count += entries.filter((entry) => entry.isFile()).length;
  }
  return count;
}

async function spoolSize(edgeDir) {
  const out = await mustRun(process.execPath, [EDGE_CLI, "queue", "--json", "--dir", edgeDir]);
  return JSON.parse(out.stdout).spool.length;
}

export async function run({ quick, runs, log }) {
  const sessions = 20;
  const size = 4096;
  const messages = quick ? 500 : 2000;
  const filesystem = execFileSync("df", ["-T", tmpdir()], { encoding: "utf8" })
    .split("\n")[1]
    ?.split(/\s+/)[1];
  const anchorDir = await mkdtemp(join(tmpdir(), "mxt-fsync-"));
  const sink = await startSink();
  const postfix = await startPostfixLab();
  // The spooled mail is for the lab Postfix's user, so that the drain delivers it there.
  const rcpt = `alice@${postfix.info.domain}`;
  const recipients = join(anchorDir, "recipients");
  await writeFile(recipients, `${rcpt}\n`);
  const agents = await startAgents({
    inject: `127.0.0.1:${sink.port}`,
    edge: {
      domains: ["bench.test", postfix.info.domain],
      "spool.messagesPerIpPerMinute": 1_000_000,
      "spool.drainConcurrency": 8,
    },
    home: { "recipients.file": recipients },
  });
  const reps = [];
  try {
    await waitFor("the recipient list synced", async () => {
      const status = await mustRun(process.execPath, [EDGE_CLI, "status", "--json", "--dir", agents.edgeDir]);
      return JSON.parse(status.stdout).homes[0]?.recipients !== null;
    });
    await agents.home.stop();
    await waitFor("the edge to see home gone", async () => !(await homeConnected(agents.edgeDir)));
    // Untimed warm-up, the same load into both: the steady state is measured, not the edge's JIT
    // compiling its hot paths during the first run (Postfix's C has nothing to warm up but caches).
    // 500 was not enough: in the 2 000 messages after it the edge still spent 0.82 ms of user CPU per
    // message against 0.57 from then on (BENCHMARKS.md, "Scenario 5"); after 2 500 run 1 is steady.
    const warmUp = quick ? 500 : 2500;
    // Postfix delivers what it accepted (local(8) into a maildir) for seconds after a load ends: every
    // timed load after it waits for that, or it would share the CPUs and the disk with the anchor's
    // leftover work (the edge's runs and Postfix's own next run alike).
    const postfixIdle = () =>
      waitFor(
        "Postfix's queue to empty",
        async () => (await postfixQueued(postfix.info.dir)) === 0,
        600_000,
        100,
      );
    await smtpSource(postfix.info.smtpPort, { sessions, messages: warmUp, size, to: rcpt });
    await postfixIdle();
    await smtpSource(agents.smtpPort, { sessions, messages: warmUp, size, to: rcpt });
    for (let i = 0; i < runs; i++) {
      const rep = {};
      rep.fsyncMs = await fsyncAnchor(anchorDir, 200);
      rep.sink = await smtpSource(sink.port, { sessions, messages, size });
      rep.postfix = await smtpSource(postfix.info.smtpPort, { sessions, messages, size, to: rcpt });
      await postfixIdle();
      const c0 = cpuSnapshot({ edge: agents.edge.pid });
      rep.spool = await smtpSource(agents.smtpPort, { sessions, messages, size, to: rcpt });
      rep.spool.cpuPerMsgMs = (cpuDelta(c0, cpuSnapshot({ edge: agents.edge.pid })).edge * 1000) / messages;
      rep.queued = await spoolSize(agents.edgeDir);
      reps.push(rep);
      log(
        `  run ${i + 1}: smtp-sink ${fmt(rep.sink.rate)} msg/s, Postfix queue ${fmt(rep.postfix.rate)}, ` +
          `edge spool ${fmt(rep.spool.rate)} (${fmt(rep.spool.rate / rep.postfix.rate)}× Postfix), ` +
          `fsync+rename+dirsync ${fmt(rep.fsyncMs)} ms, spooled ${rep.queued}`,
      );
    }
    // Home returns, now injecting into the lab Postfix: how fast does the spool drain into it?
    await postfixIdle();
    const waiting = await spoolSize(agents.edgeDir);
    await editJson(join(agents.homeDir, "home.json"), {
      "postfix.inject": `127.0.0.1:${postfix.info.injectPort}`,
      "postfix.proxyProtocol": "v2",
    });
    const home = spawnTool(process.execPath, [...HOME_NODE_FLAGS, HOME_CLI, "run", "--dir", agents.homeDir], {
      label: "home",
    });
    const t0 = performance.now();
    const pids = { edge: agents.edge.pid, home: home.pid };
    const c0 = cpuSnapshot(pids);
    const ticks0 = machineTicks();
    await waitFor("the spool to drain", async () => (await spoolSize(agents.edgeDir)) === 0, 600_000, 200);
    const drainMs = performance.now() - t0;
    const drainIdle = idleShare(ticks0, machineTicks());
    const drainCpu = cpuDelta(c0, cpuSnapshot(pids));
    await home.stop();
    const drainCpuPerMsgMs = {
      edge: (drainCpu.edge * 1000) / waiting,
      home: (drainCpu.home * 1000) / waiting,
    };
    log(
      `  drain into Postfix: ${waiting} messages in ${fmt(drainMs / 1000)} s = ${fmt(waiting / (drainMs / 1000))} msg/s; ` +
        `CPU per message edge ${fmt(drainCpuPerMsgMs.edge)} ms, home ${fmt(drainCpuPerMsgMs.home)} ms; machine idle ${fmt(100 * drainIdle)} %`,
    );
    const spoolRate = median(reps.map((r) => r.spool.rate));
    return {
      filesystem,
      fsyncRenameDirsyncMs: median(reps.map((r) => r.fsyncMs)),
      smtpSinkRate: median(reps.map((r) => r.sink.rate)),
      postfixQueueRate: median(reps.map((r) => r.postfix.rate)),
      spoolRate,
      ratioToPostfix: median(reps.map((r) => r.spool.rate / r.postfix.rate)),
      ratioToSink: median(reps.map((r) => r.spool.rate / r.sink.rate)),
      postfixToSink: median(reps.map((r) => r.postfix.rate / r.sink.rate)),
      edgeCpuPerMsgMs: median(reps.map((r) => r.spool.cpuPerMsgMs)),
      drain: {
        into: "postfix",
        messages: waiting,
        seconds: drainMs / 1000,
        rate: waiting / (drainMs / 1000),
        cpuPerMsgMs: drainCpuPerMsgMs,
        idle: drainIdle,
      },
      runs: reps.map((r) => ({
        sink: r.sink.rate,
        postfix: r.postfix.rate,
        spool: r.spool.rate,
        fsyncMs: r.fsyncMs,
      })),
    };
  } finally {
    await agents.stop();
    await postfix.stop();
    await sink.stop();
    await rm(anchorDir, { recursive: true, force: true });
  }
}
