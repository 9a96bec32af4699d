// A private, real Postfix for end-to-end tests: one instance per call, in its own 0755 temp folder, on
// loopback only, with free ports, its own log file and its own mailboxes.
//
// Postfix runs `postfix -c DIR` only when DIR is listed, word for word, in the *default* main.cf's
// alternate_config_directories (no wildcards, no parent folders). So every instance adds its own config
// folder there and removes it on stop. The read-modify-write of that one system file happens under an
// exclusive lock file (O_EXCL, owner pid inside, taken over when the owner is dead), because vitest
// workers start instances concurrently and two `postconf -e` runs would otherwise drop each other's
// entry. Entries of earlier labs whose folder is gone are pruned on the way; nothing else is touched.
//
// Mail is delivered by local(8) into DIR/mail/<user>/ (mail_spool_directory ending in "/", i.e. Maildir)
// rather than ~user/Maildir: concurrent labs deliver to the same system users, and each test must see only
// its own messages. The users still exist in /etc/passwd (local(8) delivers with their uid).
import { execFile } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import {
  chmod,
  chown,
  mkdir,
  mkdtemp,
  open,
  readdir,
  readFile,
  rename,
  rm,
  stat,
  unlink,
  utimes,
  writeFile,
} from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { freePort, hasIPv6Loopback } from "./ports.js";
import { toolPath } from "./require-tools.js";
import {
  groupAlive,
  isAlive,
  killQuietly,
  spawnReaper,
  waitFor,
  waitForExit,
  waitForLogMatch,
} from "./wait.js";

const run = promisify(execFile);

export interface PostfixOptions {
  /** message_size_limit in bytes (default 10 MB; large-message tests use ~60 MB). */
  messageSizeLimit?: number;
  /** Local users to receive mail (created with `useradd -m` when missing). Default ["alice", "bob"]. */
  users?: string[];
  /** Also listen on [::1] for the inject port and accept TCP6 PROXY headers. Default: when ::1 exists. */
  ipv6?: boolean;
  /** STARTTLS with a generated self-signed certificate (default true). */
  tls?: boolean;
  /** The mail domain in mydestination (default "home.test"). */
  domain?: string;
  /** Use this folder (must be missing or empty; removed on stop) instead of a new temp folder. */
  dir?: string;
  /** Adds a submission listener with SASL AUTH against Dovecot's auth service at inet:127.0.0.1:PORT. */
  dovecotAuthPort?: number;
}

export interface PostfixLab {
  dir: string;
  host: "127.0.0.1";
  /** Plain smtpd, no PROXY protocol; loopback is in mynetworks here. */
  smtpPort: number;
  /** The tunnel-facing smtpd: PROXY (haproxy) required, mynetworks empty, bare newlines rejected. */
  injectPort: number;
  /** Submission with SASL AUTH via Dovecot; present only with the dovecotAuthPort option. */
  submissionPort?: number;
  /** True when injectPort also listens on [::1] and TCP6 PROXY headers are accepted. */
  ipv6: boolean;
  domain: string;
  hostname: string;
  users: string[];
  /** The self-signed certificate STARTTLS presents (PEM), when tls is on. */
  certFile?: string;
  masterPid: number;
  maildir(user: string): string;
  /** Full texts of the messages in the user's Maildir new/ and cur/, oldest first. */
  messages(user: string): Promise<string[]>;
  waitForMessages(user: string, count: number, timeoutMs?: number): Promise<string[]>;
  log(): Promise<string>;
  /** Polls the log until it matches; returns the log. */
  waitForLog(pattern: RegExp | string, timeoutMs?: number): Promise<string>;
  /** Runs `postconf -c DIR/etc ...args`; when the arguments edit the config, Postfix is reloaded. */
  postconf(args: string[]): Promise<string>;
  /** `postfix reload`, resolved once the master has logged it. */
  reload(): Promise<void>;
  stop(): Promise<void>;
}

const labPrefix = "mxtunnel-postfix-lab-";
const markerFile = ".postfix-lab.json";
const systemMainCf = "/etc/postfix/main.cf";
const lockFile = "/etc/postfix/.mxtunnel-lab.lock";

interface Marker {
  configDir: string;
  masterPid?: number;
  reaperPid?: number;
}

export async function startPostfix(options: PostfixOptions = {}): Promise<PostfixLab> {
  const started = Date.now();
  const postfix = toolPath("postfix");
  const postconfBin = toolPath("postconf");
  const domain = options.domain ?? "home.test";
  const hostname = `mx.${domain}`;
  const users = options.users ?? ["alice", "bob"];
  const ipv6 = (options.ipv6 ?? true) && hasIPv6Loopback();
  const tls = options.tls ?? true;
  const messageSizeLimit = options.messageSizeLimit ?? 10_240_000;

  const dir = await makeLabDir(options.dir);
  const configDir = path.join(dir, "etc");
  const queueDir = path.join(dir, "queue");
  const dataDir = path.join(dir, "data");
  const mailDir = path.join(dir, "mail");
  const logFile = path.join(dir, "maillog");
  const marker: Marker = { configDir };
  await writeFile(path.join(dir, markerFile), JSON.stringify(marker));

  let registered = false;
  let masterPid: number | undefined;
  try {
    for (const d of [configDir, queueDir, dataDir, mailDir]) await mkdir(d, { mode: 0o755 });
    const postfixUser = await lookupUser("postfix");
    await chown(dataDir, postfixUser.uid, postfixUser.gid);
    for (const user of users) {
      const account = await ensureUser(user);
      const box = path.join(mailDir, user);
      for (const sub of ["", "tmp", "new", "cur"]) {
        await mkdir(path.join(box, sub), { mode: 0o700 });
        await chown(path.join(box, sub), account.uid, account.gid);
      }
    }

    const certFile = path.join(configDir, "cert.pem");
    const keyFile = path.join(configDir, "key.pem");
    if (tls) await makeCertificate(hostname, certFile, keyFile);

    await registerConfigDir(configDir, postconfBin);
    registered = true;

    const main = mainCf({ dir, domain, hostname, users, ipv6, tls, messageSizeLimit, certFile, keyFile });
    await writeFile(path.join(configDir, "main.cf"), main);
    await backdate(path.join(configDir, "main.cf"));

    // A port found free can be taken by another worker before Postfix binds it: retry with new ports.
    let ports: Ports | undefined;
    for (let attempt = 1; ; attempt++) {
      ports = {
        smtp: await freePort(),
        inject: await freePort({ ipv6 }),
        submission: options.dovecotAuthPort === undefined ? undefined : await freePort(),
      };
      await writeFile(path.join(configDir, "master.cf"), masterCf(ports, ipv6, tls, options.dovecotAuthPort));
      await backdate(path.join(configDir, "master.cf"));
      try {
        await run(postfix, ["-c", configDir, "start"], { timeout: 30_000 });
        break;
      } catch (error) {
        const log = await readFile(logFile, "utf8").catch(() => "");
        if (attempt < 4 && /address already in use/i.test(log)) {
          await writeFile(logFile, "");
          continue;
        }
        throw new Error(`postfix -c ${configDir} start failed: ${errorText(error)}\n--- maillog ---\n${log}`);
      }
    }

    const pid = await readMasterPid(queueDir);
    masterPid = pid;
    marker.masterPid = pid;
    const reaperPid = spawnReaper(pid, dir);
    if (reaperPid !== undefined) marker.reaperPid = reaperPid;
    await writeFile(path.join(dir, markerFile), JSON.stringify(marker));
    const cleanupOnExit = () => killAndRemoveSync(dir, pid);
    onExit.add(cleanupOnExit);

    const maildir = (user: string) => path.join(mailDir, user);
    const readLog = () => readFile(logFile, "utf8").catch(() => "");
    const lab: PostfixLab = {
      dir,
      host: "127.0.0.1",
      smtpPort: ports.smtp,
      injectPort: ports.inject,
      ipv6,
      domain,
      hostname,
      users,
      masterPid: pid,
      maildir,
      messages: (user) => readMaildir(maildir(user)),
      async waitForMessages(user, count, timeoutMs = 15_000) {
        return waitFor(
          async () => {
            const found = await readMaildir(maildir(user));
            return found.length >= count ? found : undefined;
          },
          { timeoutMs, intervalMs: 50, what: `${count} message(s) in ${maildir(user)}` },
        );
      },
      log: readLog,
      waitForLog: (pattern, timeoutMs = 10_000) => waitForLogMatch(readLog, pattern, timeoutMs, "Postfix"),
      async postconf(args) {
        const { stdout } = await run(postconfBin, ["-c", configDir, ...args]);
        if (editsConfig(args)) {
          for (const file of ["main.cf", "master.cf"]) await backdate(path.join(configDir, file));
          await lab.reload();
        }
        return stdout;
      },
      async reload() {
        const count = (text: string) => text.split("reload -- version").length;
        const before = count(await readLog());
        await run(postfix, ["-c", configDir, "reload"]);
        await waitFor(async () => count(await readLog()) > before, {
          timeoutMs: 10_000,
          what: "Postfix to log its reload",
        });
      },
      async stop() {
        onExit.delete(cleanupOnExit);
        if (reaperPid !== undefined) killQuietly(reaperPid, "SIGKILL");
        const t0 = Date.now();
        await stopMaster(pid, configDir, postfix);
        const t1 = Date.now();
        await unregisterConfigDir(configDir, postconfBin);
        await rm(dir, { recursive: true, force: true });
        if (process.env.MXTUNNEL_LAB_DEBUG) {
          console.error(`postfix lab stopped: master ${t1 - t0} ms, total ${Date.now() - t0} ms`);
        }
      },
    };
    if (ports.submission !== undefined) lab.submissionPort = ports.submission;
    if (tls) lab.certFile = certFile;
    if (process.env.MXTUNNEL_LAB_DEBUG) console.error(`postfix lab up in ${Date.now() - started} ms: ${dir}`);
    return lab;
  } catch (error) {
    if (masterPid !== undefined) await stopMaster(masterPid, configDir, postfix).catch(() => {});
    else await run(postfix, ["-c", configDir, "stop"]).catch(() => {});
    if (registered) await unregisterConfigDir(configDir, postconfBin).catch(() => {});
    await rm(dir, { recursive: true, force: true });
    throw error;
  }
}

/** Stops a lab started elsewhere (the CLI's `stop --dir D`, or after a crash) and removes its folder. */
export async function stopPostfixDir(dir: string): Promise<void> {
  const markerPath = path.join(dir, markerFile);
  if (!existsSync(markerPath)) throw new Error(`${dir} is not a Postfix lab folder (no ${markerFile})`);
  const marker = JSON.parse(await readFile(markerPath, "utf8")) as Marker;
  if (marker.reaperPid !== undefined) killQuietly(marker.reaperPid, "SIGKILL");
  const pid = marker.masterPid ?? (await readMasterPid(path.join(dir, "queue")).catch(() => undefined));
  if (pid !== undefined) await stopMaster(pid, marker.configDir, toolPath("postfix"));
  await unregisterConfigDir(marker.configDir, toolPath("postconf"));
  await rm(dir, { recursive: true, force: true });
}

interface Ports {
  smtp: number;
  inject: number;
  submission: number | undefined;
}

function mainCf(p: {
  dir: string;
  domain: string;
  hostname: string;
  users: string[];
  ipv6: boolean;
  tls: boolean;
  messageSizeLimit: number;
  certFile: string;
  keyFile: string;
}): string {
  const first = p.users[0] ?? "root";
  const lines = [
    "# Generated by test/e2e/lab/postfix.ts: a private test instance.",
    "compatibility_level = 3.6",
    `queue_directory = ${p.dir}/queue`,
    `data_directory = ${p.dir}/data`,
    "meta_directory = /etc/postfix",
    // No syslog on these machines; without both keys `postfix start` exits 1 without a word.
    `maillog_file = ${p.dir}/maillog`,
    `maillog_file_prefixes = ${p.dir}`,
    `myhostname = ${p.hostname}`,
    `mydomain = ${p.domain}`,
    "myorigin = $mydomain",
    "mydestination = $mydomain, localhost",
    "relay_domains =",
    "relayhost =",
    "inet_interfaces = loopback-only",
    // TCP6 PROXY headers are refused ("unsupported protocol type") unless IPv6 is enabled.
    `inet_protocols = ${p.ipv6 ? "ipv4, ipv6" : "ipv4"}`,
    `mynetworks = 127.0.0.0/8${p.ipv6 ? " [::1]/128" : ""}`,
    "smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated defer_unauth_destination",
    "smtpd_forbid_bare_newline = reject",
    // Reverse lookups of documentation addresses only add DNS timeouts; the client shows as unknown[ip].
    "smtpd_peername_lookup = no",
    "smtpd_banner = $myhostname ESMTP $mail_name (mxtunnel lab)",
    "biff = no",
    "append_dot_mydomain = no",
    "readme_directory = no",
    "recipient_delimiter = +",
    `alias_maps = inline:{ {postmaster=${first}}, {root=${first}} }`,
    "alias_database =",
    "home_mailbox =",
    `mail_spool_directory = ${p.dir}/mail/`,
    "mailbox_size_limit = 0",
    `message_size_limit = ${p.messageSizeLimit}`,
    // Tests that take a next hop down and up again should not wait minutes for a retry.
    "queue_run_delay = 1s",
    "minimal_backoff_time = 1s",
    "maximal_backoff_time = 5s",
    "delay_warning_time = 0",
  ];
  if (p.tls) {
    lines.push(
      `smtpd_tls_cert_file = ${p.certFile}`,
      `smtpd_tls_key_file = ${p.keyFile}`,
      "smtpd_tls_security_level = may",
      "smtpd_tls_loglevel = 1",
      "smtp_tls_security_level = may",
    );
  }
  return `${lines.join("\n")}\n`;
}

function masterCf(ports: Ports, ipv6: boolean, tls: boolean, dovecotAuthPort: number | undefined): string {
  const inject = [
    "  -o syslog_name=postfix/inject",
    "  -o smtpd_upstream_proxy_protocol=haproxy",
    "  -o mynetworks=",
    "  -o smtpd_forbid_bare_newline=reject",
  ];
  const lines = [
    "# Generated by test/e2e/lab/postfix.ts. chroot is off everywhere: the queue is a temp folder.",
    `127.0.0.1:${ports.smtp} inet n - n - - smtpd`,
    `127.0.0.1:${ports.inject} inet n - n - - smtpd`,
    ...inject,
  ];
  if (ipv6) lines.push(`[::1]:${ports.inject} inet n - n - - smtpd`, ...inject);
  if (ports.submission !== undefined && dovecotAuthPort !== undefined) {
    lines.push(
      `127.0.0.1:${ports.submission} inet n - n - - smtpd`,
      "  -o syslog_name=postfix/submission",
      "  -o mynetworks=",
      `  -o smtpd_tls_security_level=${tls ? "encrypt" : "none"}`,
      "  -o smtpd_sasl_auth_enable=yes",
      "  -o smtpd_sasl_type=dovecot",
      `  -o smtpd_sasl_path=inet:127.0.0.1:${dovecotAuthPort}`,
      "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject",
      "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
    );
  }
  lines.push(
    "pickup    unix  n       -       n       60      1       pickup",
    "cleanup   unix  n       -       n       -       0       cleanup",
    "qmgr      unix  n       -       n       300     1       qmgr",
    "tlsmgr    unix  -       -       n       1000?   1       tlsmgr",
    "rewrite   unix  -       -       n       -       -       trivial-rewrite",
    "bounce    unix  -       -       n       -       0       bounce",
    "defer     unix  -       -       n       -       0       bounce",
    "trace     unix  -       -       n       -       0       bounce",
    "verify    unix  -       -       n       -       1       verify",
    "flush     unix  n       -       n       1000?   0       flush",
    "proxymap  unix  -       -       n       -       -       proxymap",
    "proxywrite unix -       -       n       -       1       proxymap",
    "smtp      unix  -       -       n       -       -       smtp",
    "relay     unix  -       -       n       -       -       smtp",
    "showq     unix  n       -       n       -       -       showq",
    "error     unix  -       -       n       -       -       error",
    "retry     unix  -       -       n       -       -       error",
    "discard   unix  -       -       n       -       -       discard",
    "local     unix  -       n       n       -       -       local",
    "virtual   unix  -       n       n       -       -       virtual",
    "lmtp      unix  -       -       n       -       -       lmtp",
    "anvil     unix  -       -       n       -       1       anvil",
    "scache    unix  -       -       n       -       1       scache",
    "postlog   unix-dgram n  -       n       -       1       postlogd",
  );
  return `${lines.join("\n")}\n`;
}

async function makeLabDir(requested: string | undefined): Promise<string> {
  let dir: string;
  if (requested === undefined) {
    dir = await mkdtemp(path.join(os.tmpdir(), labPrefix));
  } else {
    dir = path.resolve(requested);
    await mkdir(dir, { recursive: true });
    // The folder is removed on stop: refuse one that holds anything.
    if ((await readdir(dir)).length > 0) throw new Error(`${dir} is not empty; give a new or empty folder`);
  }
  // mkdtemp makes 0700; Postfix's unprivileged daemons must traverse it to reach their queue.
  await chmod(dir, 0o755);
  for (let parent = path.dirname(dir); parent !== path.dirname(parent); parent = path.dirname(parent)) {
    const mode = (await stat(parent)).mode;
    if ((mode & 0o001) === 0)
      throw new Error(`${parent} is not searchable by others; Postfix cannot reach ${dir}`);
  }
  return dir;
}

async function makeCertificate(hostname: string, certFile: string, keyFile: string): Promise<void> {
  await run(toolPath("openssl"), [
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-days",
    "30",
    "-subj",
    `/CN=${hostname}`,
    "-addext",
    `subjectAltName=DNS:${hostname},IP:127.0.0.1`,
    "-keyout",
    keyFile,
    "-out",
    certFile,
  ]);
  await chmod(keyFile, 0o600);
}

interface Account {
  uid: number;
  gid: number;
  home: string;
}

async function lookupUser(name: string): Promise<Account> {
  const { stdout } = await run("getent", ["passwd", name]);
  const fields = stdout.trim().split(":");
  const uid = Number(fields[2]);
  const gid = Number(fields[3]);
  if (!Number.isInteger(uid) || !Number.isInteger(gid)) throw new Error(`getent passwd ${name}: ${stdout}`);
  return { uid, gid, home: fields[5] ?? "" };
}

/** Creates the user when missing. Concurrent workers may race: "already exists" and a busy lock are fine. */
export async function ensureUser(name: string): Promise<Account> {
  if (!/^[a-z_][a-z0-9_-]*$/.test(name)) throw new Error(`not a valid test user name: ${name}`);
  return waitFor(
    async () => {
      const existing = await lookupUser(name).catch(() => undefined);
      if (existing) return existing;
      await run(toolPath("useradd"), ["-m", "-s", "/usr/sbin/nologin", name]).catch(() => undefined);
      return lookupUser(name).catch(() => undefined);
    },
    { timeoutMs: 15_000, intervalMs: 100, what: `user ${name} to exist` },
  );
}

/** Holds an exclusive lock on the system main.cf while `body` runs. */
async function withMainCfLock<T>(body: () => Promise<T>): Promise<T> {
  await waitFor(
    async () => {
      try {
        const handle = await open(lockFile, "wx", 0o644);
        await handle.writeFile(String(process.pid));
        await handle.close();
        return true;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
        const owner = Number(await readFile(lockFile, "utf8").catch(() => ""));
        // An empty file is a lock being written right now; a dead owner's lock is taken over.
        if (Number.isInteger(owner) && owner > 0 && !isAlive(owner)) await unlink(lockFile).catch(() => {});
        return false;
      }
    },
    { timeoutMs: 20_000, intervalMs: 10, what: `the lock ${lockFile}` },
  );
  try {
    return await body();
  } finally {
    await unlink(lockFile).catch(() => {});
  }
}

async function editAlternateDirs(postconfBin: string, edit: (dirs: string[]) => string[]): Promise<void> {
  await withMainCfLock(async () => {
    const { stdout } = existsSync(systemMainCf)
      ? await run(postconfBin, ["-c", path.dirname(systemMainCf), "-h", "alternate_config_directories"])
      : { stdout: "" };
    const current = stdout.split(/[\s,]+/).filter(Boolean);
    const next = edit(current);
    if (next.join(" ") === current.join(" ")) return;
    await setMainCfParameter(systemMainCf, "alternate_config_directories", next.join(" "));
  });
}

/**
 * Rewrites one parameter of a main.cf the way `postconf -e` would, but lands the new file by rename with
 * an mtime already a minute old: a `postfix -c` elsewhere reading it a moment later must not stall (see
 * backdate). Debian's "No configuration" leaves no main.cf at all; then one is created.
 */
async function setMainCfParameter(file: string, name: string, value: string): Promise<void> {
  const text = await readFile(file, "utf8").catch(() => "");
  const kept: string[] = [];
  let skipping = false;
  for (const line of text.split("\n")) {
    if (/^\S/.test(line)) skipping = new RegExp(`^${name}\\s*=`).test(line);
    else if (line.trim() === "" || line.startsWith("#")) skipping = false;
    if (!skipping) kept.push(line);
  }
  while (kept.length > 0 && kept[kept.length - 1] === "") kept.pop();
  kept.push(`${name} = ${value}`, "");
  const temp = `${file}.mxtunnel-${process.pid}.tmp`;
  await writeFile(temp, kept.join("\n"), { mode: 0o644 });
  await backdate(temp);
  await rename(temp, file);
}

function registerConfigDir(configDir: string, postconfBin: string): Promise<void> {
  return editAlternateDirs(postconfBin, (dirs) => [
    ...dirs.filter((d) => d !== configDir && !(d.includes(labPrefix) && !existsSync(d))),
    configDir,
  ]);
}

function unregisterConfigDir(configDir: string, postconfBin: string): Promise<void> {
  return editAlternateDirs(postconfBin, (dirs) =>
    dirs.filter((d) => d !== configDir && !(d.includes(labPrefix) && !existsSync(d))),
  );
}

/**
 * Postfix refuses to trust a config file modified within the last ~2 seconds (it might still be being
 * written): every program that reads it sleeps in 300 ms steps until the file is old enough, which
 * made each `postfix start` take 2 s. Files we have finished writing are dated a minute back.
 */
async function backdate(file: string): Promise<void> {
  const info = await stat(file).catch(() => undefined);
  if (info === undefined) return;
  const past = new Date(Date.now() - 60_000);
  if (info.mtime > past) await utimes(file, info.atime, past);
}

async function readMasterPid(queueDir: string): Promise<number> {
  const text = await readFile(path.join(queueDir, "pid", "master.pid"), "utf8");
  const pid = Number(text.trim());
  if (!Number.isInteger(pid) || pid <= 0) throw new Error(`bad master.pid: ${JSON.stringify(text)}`);
  return pid;
}

/**
 * SIGTERM to the master, which takes its children down with it (they share its process group, since
 * `postfix start` makes the master a session leader); resolved once the whole group is gone.
 */
async function stopMaster(masterPid: number, configDir: string, postfix: string): Promise<void> {
  if (!isAlive(masterPid)) return;
  killQuietly(masterPid, "SIGTERM");
  try {
    await waitForExit(masterPid, 10_000);
  } catch {
    await run(postfix, ["-c", configDir, "abort"]).catch(() => {});
    killQuietly(masterPid, "SIGKILL");
    await waitForExit(masterPid, 5_000);
  }
  await waitFor(() => !groupAlive(masterPid), {
    timeoutMs: 10_000,
    what: `Postfix processes of ${configDir}`,
  }).catch(() => killQuietly(-masterPid, "SIGKILL"));
}

/** One "exit" listener for all labs of this process (no MaxListeners warning with many labs). */
const onExit = new Set<() => void>();
process.on("exit", () => {
  for (const cleanup of onExit) cleanup();
});

/** For process "exit": synchronous, best effort; the reaper finishes the job if this does not. */
function killAndRemoveSync(dir: string, masterPid: number): void {
  killQuietly(masterPid, "SIGTERM");
  try {
    rmSync(dir, { recursive: true, force: true, maxRetries: 2 });
  } catch {
    // the reaper removes it
  }
}

async function readMaildir(box: string): Promise<string[]> {
  const entries: { file: string; mtime: number; name: string }[] = [];
  for (const sub of ["new", "cur"]) {
    const names = await readdir(path.join(box, sub)).catch(() => [] as string[]);
    for (const name of names) {
      const file = path.join(box, sub, name);
      const info = await stat(file).catch(() => undefined);
      if (info?.isFile()) entries.push({ file, mtime: info.mtimeMs, name });
    }
  }
  entries.sort((a, b) => a.mtime - b.mtime || a.name.localeCompare(b.name));
  const texts: string[] = [];
  for (const entry of entries) {
    const text = await readFile(entry.file, "utf8").catch(() => undefined);
    if (text !== undefined) texts.push(text);
  }
  return texts;
}

/** `postconf name=value`, `-e`, `-X`, `-#` and `-M/-P ... =` edit; `-n`, `-h`, `-d`, plain names only read. */
function editsConfig(args: string[]): boolean {
  return args.some((a) => (a.startsWith("-") ? /^-[A-Za-z#]*[eX#]/.test(a) : a.includes("=")));
}

function errorText(error: unknown): string {
  if (error && typeof error === "object" && "stderr" in error) {
    const e = error as { message?: string; stderr?: string };
    return `${e.message ?? ""} ${e.stderr ?? ""}`.trim();
  }
  return String(error);
}
