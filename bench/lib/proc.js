// Process plumbing for the benchmarks: spawning tools and agents (with a raised fd limit), waiting for
// them, and reading the OS's own accounting of a process (CPU time from /proc/PID/stat, memory from
// /proc/PID/status). Linux only, like the deployment target.
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import net from "node:net";

const CLK_TCK = 100; // getconf CLK_TCK on Linux/x86-64 and arm64

/** Spawns `cmd args` through sh so `ulimit -n` can be raised first; the shell execs, so pid is the tool's. */
export function spawnTool(
  cmd,
  args,
  { nofile = 65536, env, cwd, stdin = "ignore", label = cmd, maxOutput = 64 << 20 } = {},
) {
  const script = `ulimit -n ${nofile} 2>/dev/null || ulimit -n 20000; exec "$@"`;
  const child = spawn("sh", ["-c", script, "sh", cmd, ...args], {
    stdio: [stdin, "pipe", "pipe"],
    env: env ?? process.env,
    cwd,
  });
  let stdout = "";
  let stderr = "";
  // Kept up to maxOutput characters each (64 MiB: `queue --json` with thousands of entries is several
  // MiB, and a cut-off JSON document does not parse).
  child.stdout.setEncoding("utf8").on("data", (d) => {
    if (stdout.length < maxOutput) stdout += d;
  });
  child.stderr.setEncoding("utf8").on("data", (d) => {
    if (stderr.length < maxOutput) stderr += d;
  });
  const exited = new Promise((resolve) => {
    child.on("exit", (code, signal) => resolve({ code, signal }));
  });
  return {
    child,
    label,
    get pid() {
      return child.pid;
    },
    get stdout() {
      return stdout;
    },
    get stderr() {
      return stderr;
    },
    exited,
    async stop(signal = "SIGTERM", graceMs = 5000) {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill(signal);
      const timer = setTimeout(() => child.kill("SIGKILL"), graceMs);
      const result = await exited;
      clearTimeout(timer);
      return result;
    },
  };
}

/** Runs a command to completion; resolves with its exit status, output and wall time in ms. */
export async function runTool(cmd, args, options = {}) {
  const started = performance.now();
  const tool = spawnTool(cmd, args, options.input !== undefined ? { ...options, stdin: "pipe" } : options);
  if (options.input !== undefined) tool.child.stdin.end(options.input);
  const { code, signal } = await tool.exited;
  const ms = performance.now() - started;
  return { code, signal, ms, stdout: tool.stdout, stderr: tool.stderr };
}

/** Like runTool, but fails loudly on a non-zero exit. */
export async function mustRun(cmd, args, options = {}) {
  const result = await runTool(cmd, args, options);
  if (result.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited with ${result.code ?? result.signal}:\n${result.stderr || result.stdout}`,
    );
  }
  return result;
}

/** CPU seconds (user + system) the OS has charged to a process so far. */
export function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // Field 2 (comm) may contain spaces; count from after its closing parenthesis.
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const utime = Number(fields[11]);
    const stime = Number(fields[12]);
    return (utime + stime) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

/** Current and peak resident set size in MiB (VmRSS, VmHWM). */
export function memoryMiB(pid) {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const kb = (key) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? Number.NaN);
    return { rss: kb("VmRSS") / 1024, hwm: kb("VmHWM") / 1024 };
  } catch {
    return { rss: Number.NaN, hwm: Number.NaN };
  }
}

/** CPU seconds of several processes, keyed by label; call twice and subtract. */
export function cpuSnapshot(procs) {
  const out = {};
  for (const [name, pid] of Object.entries(procs)) out[name] = cpuSeconds(pid);
  return out;
}

export function cpuDelta(before, after) {
  const out = {};
  for (const key of Object.keys(before)) out[key] = after[key] - before[key];
  return out;
}

/** The machine's CPU time counters (/proc/stat's first line, in ticks); see idleShare. */
export function machineTicks() {
  return readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
}

/** The share of all CPU time that was idle between two machineTicks() readings. */
export function idleShare(before, after) {
  const delta = after.map((value, i) => value - before[i]);
  const total = delta.reduce((sum, value) => sum + value, 0);
  return total > 0 ? delta[3] / total : Number.NaN;
}

export async function freePort(host = "127.0.0.1") {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, host, resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(() => resolve()));
  return port;
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls until `check()` resolves truthy or the deadline passes. */
export async function waitFor(what, check, timeoutMs = 15_000, everyMs = 50) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      if (await check()) return;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(everyMs);
  }
}
