// The load and the anchors: Postfix's smtp-sink and smtp-source, the bare Node proxy, an OpenSSH -L
// tunnel on loopback, a byte sink, and a bulk stream writer.
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  cpuDelta,
  cpuSnapshot,
  freePort,
  idleShare,
  machineTicks,
  mustRun,
  runTool,
  spawnTool,
  waitFor,
} from "./proc.js";
import { readBanner } from "./smtp-client.js";

const HERE = dirname(fileURLToPath(import.meta.url));
export const SMTP_SINK = "/usr/sbin/smtp-sink";
export const SMTP_SOURCE = "/usr/sbin/smtp-source";

function portOpen(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** smtp-sink on a loopback port (root must name a user to drop to). */
export async function startSink({ backlog = 4096 } = {}) {
  const port = await freePort();
  const proc = spawnTool(SMTP_SINK, ["-u", "nobody", "-m", "10000", `127.0.0.1:${port}`, String(backlog)], {
    label: "smtp-sink",
  });
  await waitFor("smtp-sink", async () => (await readBanner(port)).line.startsWith("220"));
  return { port, proc, pid: proc.pid, stop: () => proc.stop() };
}

/**
 * smtp-source: `sessions` parallel sessions, `messages` messages of `size` bytes; wall time and rate.
 * Each message is its own TCP session (smtp-source's default), or with `persistent` all of a
 * session's messages go over one connection (`-d`), as Postfix's connection cache does under load.
 */
export async function smtpSource(
  port,
  { sessions, messages, size, to = "user@bench.test", from = "bench@client.test", persistent = false },
) {
  // smtp-source writes its own header, with From: <sender> (the -f address), To, Date and a Message-Id.
  const args = ["-s", String(sessions), "-m", String(messages), "-l", String(size)];
  if (persistent) args.push("-d"); // the next message over the same connection
  args.push("-f", from, "-t", to, `127.0.0.1:${port}`);
  const result = await runTool(SMTP_SOURCE, args);
  if (result.code !== 0) throw new Error(`smtp-source failed (${result.code}): ${result.stderr.slice(-500)}`);
  return { ms: result.ms, rate: messages / (result.ms / 1000), stderr: result.stderr };
}

/**
 * One smtp-source load (`smtpSource`'s options) through `port`, with the CPU time per message of each
 * process in `pids` ({label: pid}, in ms), their sum, and the share of the machine left idle meanwhile.
 */
export async function measuredLoad(port, pids, load) {
  const cpu0 = cpuSnapshot(pids);
  const ticks0 = machineTicks();
  const result = await smtpSource(port, load);
  const idle = idleShare(ticks0, machineTicks());
  const cpu = cpuDelta(cpu0, cpuSnapshot(pids));
  const cpuPerMsgMs = Object.fromEntries(
    Object.entries(cpu).map(([label, seconds]) => [label, (seconds * 1000) / load.messages]),
  );
  const totalCpuPerMsgMs = Object.values(cpuPerMsgMs).reduce((sum, ms) => sum + ms, 0);
  return { ...result, idle, cpuPerMsgMs, totalCpuPerMsgMs };
}

export async function startNodeProxy(targetPort) {
  const port = await freePort();
  const proc = spawnTool(process.execPath, [join(HERE, "tcp-proxy.js"), String(port), String(targetPort)], {
    label: "node-proxy",
  });
  await waitFor("the node proxy", () => portOpen(port));
  return { port, proc, pid: proc.pid, stop: () => proc.stop() };
}

/**
 * The throwaway two-hop WebSocket multiplexer (bare-mux.js): a front process taking clients
 * and a back process connecting to `targetPort`, joined by one WebSocket; `chacha` seals each message.
 */
export async function startBareMux(targetPort, { chacha = false } = {}) {
  const port = await freePort();
  const wsPort = await freePort();
  const script = join(HERE, "bare-mux.js");
  const mode = chacha ? ["chacha"] : [];
  const front = spawnTool(process.execPath, [script, "front", String(port), String(wsPort), ...mode], {
    label: "bare-mux front",
  });
  await waitFor("the bare mux's front", () => portOpen(wsPort));
  const back = spawnTool(process.execPath, [script, "back", String(wsPort), String(targetPort), ...mode], {
    label: "bare-mux back",
  });
  await waitFor("the bare mux's back", () => portOpen(port));
  return {
    port,
    pids: { front: front.pid, back: back.pid },
    stop: async () => {
      await Promise.all([front.stop(), back.stop()]);
    },
  };
}

export async function startByteSink() {
  const port = await freePort();
  const proc = spawnTool(process.execPath, [join(HERE, "byte-sink.js"), String(port)], {
    label: "byte-sink",
  });
  await waitFor("the byte sink", () => portOpen(port));
  return { port, proc, pid: proc.pid, stop: () => proc.stop() };
}

/** Writes `totalBytes` in `chunkSize` chunks, half-closes, waits for the sink's count; MB/s (10^6). */
export function pushBytes(port, totalBytes, chunkSize = 64 * 1024) {
  return new Promise((resolve, reject) => {
    const chunk = Buffer.alloc(chunkSize, 0x61);
    const started = performance.now();
    const socket = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true });
    let sent = 0;
    let reply = "";
    const pump = () => {
      while (sent < totalBytes) {
        const piece = sent + chunkSize <= totalBytes ? chunk : chunk.subarray(0, totalBytes - sent);
        sent += piece.length;
        if (!socket.write(piece)) return socket.once("drain", pump);
      }
      socket.end();
    };
    socket.once("connect", pump);
    socket.setEncoding("utf8");
    socket.on("data", (d) => {
      reply += d;
    });
    socket.on("error", reject);
    socket.on("end", () => {
      const ms = performance.now() - started;
      const received = Number(reply.trim());
      if (received !== totalBytes)
        reject(
          new Error(
            `port ${port}: sink counted '${reply.trim()}' of ${totalBytes} bytes after ${ms.toFixed(0)} ms`,
          ),
        );
      else resolve({ ms, mbps: totalBytes / 1e6 / (ms / 1000) });
      socket.destroy();
    });
  });
}

/**
 * An OpenSSH `-L` tunnel on loopback, the DIY way: a private sshd on a free port with a throwaway host
 * key and client key, and `ssh -N -L` forwarding a local port to `targetPort`. Undefined if no OpenSSH.
 */
export async function startSshTunnel(targetPort) {
  if (!existsSync("/usr/sbin/sshd") || !existsSync("/usr/bin/ssh")) return undefined;
  const dir = await mkdtemp(join(tmpdir(), "mxt-bench-ssh-"));
  await mkdir("/run/sshd", { recursive: true });
  await mustRun("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(dir, "host_key")]);
  await mustRun("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(dir, "client_key")]);
  const { readFile } = await import("node:fs/promises");
  await writeFile(join(dir, "authorized_keys"), await readFile(join(dir, "client_key.pub")));
  const sshPort = await freePort();
  const user = process.env.USER || "root";
  await writeFile(
    join(dir, "sshd_config"),
    [
      `Port ${sshPort}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${join(dir, "host_key")}`,
      `AuthorizedKeysFile ${join(dir, "authorized_keys")}`,
      `PidFile ${join(dir, "sshd.pid")}`,
      "PermitRootLogin prohibit-password",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "UsePAM no",
      "StrictModes no",
      "AllowTcpForwarding yes",
      "MaxSessions 1000",
      "MaxStartups 1000",
      "",
    ].join("\n"),
  );
  const sshd = spawnTool("/usr/sbin/sshd", ["-D", "-e", "-f", join(dir, "sshd_config")], { label: "sshd" });
  await waitFor("sshd", () => portOpen(sshPort));
  const localPort = await freePort();
  const ssh = spawnTool(
    "/usr/bin/ssh",
    [
      "-N",
      "-o",
      "BatchMode=yes",
      "-o",
      "StrictHostKeyChecking=no",
      "-o",
      "UserKnownHostsFile=/dev/null",
      "-o",
      "ExitOnForwardFailure=yes",
      "-i",
      join(dir, "client_key"),
      "-p",
      String(sshPort),
      "-L",
      `127.0.0.1:${localPort}:127.0.0.1:${targetPort}`,
      `${user}@127.0.0.1`,
    ],
    { label: "ssh" },
  );
  try {
    await waitFor(
      "the ssh -L forward",
      async () => (await readBanner(localPort)).line.startsWith("220"),
      15_000,
      200,
    );
  } catch (error) {
    await ssh.stop();
    await sshd.stop();
    throw new Error(`${error.message}\nssh: ${ssh.stderr.slice(-400)}\nsshd: ${sshd.stderr.slice(-400)}`);
  }
  return {
    port: localPort,
    pids: { ssh: ssh.pid },
    async stop() {
      await ssh.stop();
      await sshd.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
