// A private, real Dovecot (IMAP only) for end-to-end tests: its own config, runtime folders and log in
// a temp folder, loopback only, one passwd-file user, and an IMAP listener that requires a PROXY header
// from loopback (what home's service connector speaks), plus a plain one for direct checks.
import { spawn } from "node:child_process";
import { rmSync } from "node:fs";
import { chmod, mkdir, mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { freePort } from "./ports.js";
import { ensureUser } from "./postfix.js";
import { toolPath } from "./require-tools.js";
import {
  groupAlive,
  isAlive,
  killQuietly,
  spawnReaper,
  waitFor,
  waitForEvent,
  waitForExit,
  waitForLogMatch,
} from "./wait.js";

export interface DovecotOptions {
  /** Default "alice" (created with `useradd -m` when missing). */
  user?: string;
  /** Default "secret". */
  password?: string;
  /** The user's Maildir (e.g. a Postfix lab's `maildir("alice")`); default ~user/Maildir. */
  maildir?: string;
  /** Also open Dovecot's auth service on a loopback port, for Postfix SASL (`dovecotAuthPort`). */
  authListener?: boolean;
}

export interface DovecotLab {
  dir: string;
  host: "127.0.0.1";
  /** IMAP with `haproxy = yes`: from 127.0.0.0/8 a PROXY v1/v2 header must come first. */
  imapPort: number;
  /** IMAP without PROXY. */
  plainImapPort: number;
  /** Dovecot auth service (SASL for Postfix), with the authListener option. */
  authPort?: number;
  user: string;
  password: string;
  masterPid: number;
  log(): Promise<string>;
  waitForLog(pattern: RegExp | string, timeoutMs?: number): Promise<string>;
  stop(): Promise<void>;
}

export async function startDovecot(options: DovecotOptions = {}): Promise<DovecotLab> {
  const dovecot = toolPath("dovecot");
  const user = options.user ?? "alice";
  const password = options.password ?? "secret";
  if (/[:\s]/.test(password)) throw new Error("the password must not hold ':' or white space (passwd-file)");
  const account = await ensureUser(user);

  const dir = await mkdtemp(path.join(os.tmpdir(), "mxtunnel-dovecot-lab-"));
  await chmod(dir, 0o755);
  const logFile = path.join(dir, "dovecot.log");
  const configFile = path.join(dir, "dovecot.conf");
  let masterPid: number | undefined;
  try {
    await mkdir(path.join(dir, "run"), { mode: 0o755 });
    await mkdir(path.join(dir, "state"), { mode: 0o750 });
    await writeFile(path.join(dir, "passwd"), `${user}:{PLAIN}${password}\n`, { mode: 0o644 });

    let ports: { imap: number; plain: number; auth: number | undefined } | undefined;
    for (let attempt = 1; ; attempt++) {
      ports = {
        imap: await freePort(),
        plain: await freePort(),
        auth: options.authListener ? await freePort() : undefined,
      };
      await writeFile(configFile, dovecotConf({ dir, account, user, ports, maildir: options.maildir }));
      const status = await runDaemonizing(dovecot, ["-c", configFile], path.join(dir, "startup.out"));
      if (status.ok) break;
      const text = `${status.message}\n${await readFile(logFile, "utf8").catch(() => "")}`;
      if (attempt < 4 && /address already in use/i.test(text)) continue;
      throw new Error(`dovecot -c ${configFile} failed: ${text}`);
    }

    // dovecot returns once its listeners are bound; the pid file follows right after.
    masterPid = await waitFor(
      async () => {
        const pid = Number((await readFile(path.join(dir, "run", "master.pid"), "utf8")).trim());
        return Number.isInteger(pid) && pid > 0 ? pid : undefined;
      },
      { timeoutMs: 10_000, what: "Dovecot's master.pid" },
    );
    const pid = masterPid;
    const reaperPid = spawnReaper(pid, dir);
    // For process "exit": synchronous and best effort; the reaper finishes the job if this does not.
    const cleanupOnExit = () => {
      killQuietly(-pid, "SIGTERM");
      try {
        rmSync(dir, { recursive: true, force: true, maxRetries: 2 });
      } catch {
        // still being written by a dying process: the reaper removes it
      }
    };
    onExit.add(cleanupOnExit);

    const readLog = () => readFile(logFile, "utf8").catch(() => "");
    const lab: DovecotLab = {
      dir,
      host: "127.0.0.1",
      imapPort: ports.imap,
      plainImapPort: ports.plain,
      user,
      password,
      masterPid: pid,
      log: readLog,
      waitForLog: (pattern, timeoutMs = 10_000) => waitForLogMatch(readLog, pattern, timeoutMs, "Dovecot"),
      async stop() {
        onExit.delete(cleanupOnExit);
        if (reaperPid !== undefined) killQuietly(reaperPid, "SIGKILL");
        await stopMaster(pid);
        await rm(dir, { recursive: true, force: true });
      },
    };
    if (ports.auth !== undefined) lab.authPort = ports.auth;
    return lab;
  } catch (error) {
    if (masterPid !== undefined) await stopMaster(masterPid).catch(() => {});
    await rm(dir, { recursive: true, force: true });
    throw error;
  }
}

function dovecotConf(p: {
  dir: string;
  account: { uid: number; gid: number; home: string };
  user: string;
  ports: { imap: number; plain: number; auth: number | undefined };
  maildir: string | undefined;
}): string {
  const auth =
    p.ports.auth === undefined
      ? []
      : ["service auth {", `  inet_listener auth-inet {`, `    port = ${p.ports.auth}`, "  }", "}"];
  return `${[
    "# Generated by test/e2e/lab/dovecot.ts: a private test instance.",
    `instance_name = ${path.basename(p.dir)}`,
    `base_dir = ${p.dir}/run`,
    `state_dir = ${p.dir}/state`,
    `log_path = ${p.dir}/dovecot.log`,
    "listen = 127.0.0.1",
    "protocols = imap",
    "ssl = no",
    // The PROXY source (e.g. 203.0.113.7) is not "secure" to Dovecot; plaintext LOGIN must still work.
    "disable_plaintext_auth = no",
    "auth_mechanisms = plain login",
    "auth_verbose = yes",
    "haproxy_trusted_networks = 127.0.0.0/8",
    `mail_location = maildir:${p.maildir ?? "~/Maildir"}`,
    "passdb {",
    "  driver = passwd-file",
    `  args = scheme=PLAIN username_format=%u ${p.dir}/passwd`,
    "}",
    "userdb {",
    "  driver = static",
    `  args = uid=${p.account.uid} gid=${p.account.gid} home=${p.account.home}`,
    "}",
    "service imap-login {",
    "  inet_listener imap {",
    `    port = ${p.ports.imap}`,
    "    haproxy = yes",
    "  }",
    "  inet_listener imap-plain {",
    `    port = ${p.ports.plain}`,
    "  }",
    "  inet_listener imaps {",
    "    port = 0",
    "  }",
    "}",
    ...auth,
  ].join("\n")}\n`;
}

/**
 * Runs a command that forks a daemon and exits, with its output going to a file. execFile would wait for
 * the pipes to close, and Dovecot's daemon keeps the inherited stderr open for ~20 s after start-up.
 */
async function runDaemonizing(
  command: string,
  args: string[],
  outFile: string,
): Promise<{ ok: true } | { ok: false; message: string }> {
  const out = await open(outFile, "w");
  try {
    const child = spawn(command, args, { stdio: ["ignore", out.fd, out.fd] });
    const [code, signal] = (await waitForEvent(child, "exit", 20_000)) as [number | null, string | null];
    if (code === 0) return { ok: true };
    const output = await readFile(outFile, "utf8").catch(() => "");
    return { ok: false, message: `${command} ${args.join(" ")} exited with ${code ?? signal}: ${output}` };
  } finally {
    await out.close();
  }
}

/** SIGTERM to the whole group: the master alone waits ~1 s for its children before it exits. */
async function stopMaster(pid: number): Promise<void> {
  if (!isAlive(pid)) return;
  killQuietly(-pid, "SIGTERM");
  killQuietly(pid, "SIGTERM");
  try {
    await waitForExit(pid, 10_000);
  } catch {
    killQuietly(pid, "SIGKILL");
    await waitForExit(pid, 5_000);
  }
  await waitFor(() => !groupAlive(pid), { timeoutMs: 5_000, what: "Dovecot's processes to exit" }).catch(() =>
    killQuietly(-pid, "SIGKILL"),
  );
}

const onExit = new Set<() => void>();
process.on("exit", () => {
  for (const cleanup of onExit) cleanup();
});
