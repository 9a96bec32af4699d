// The edge's spool directory: sealed messages waiting for home, one file each, plus a small state
// file with delivery attempts and an append-only log of sender-check verdicts (one JSON line per
// message, compacted at start). The edge can list, age and check files (length and hash) but
// cannot read them. A file that fails its check at start is quarantined, never delivered.
import { mkdir, open, readdir, readFile, rename, unlink } from "node:fs/promises";
import { join } from "node:path";
import {
  fsyncDirectory,
  GroupCommit,
  type Logger,
  readJsonFile,
  readSpoolMeta,
  type SpoolHeader,
  verifySpoolFile,
  writeFileAtomic,
} from "@mxtunnel/shared";
import type { SenderAuth } from "./sender-auth.js";

export interface SpoolEntry {
  id: string;
  path: string;
  header: SpoolHeader;
  homeKey: string;
  size: number;
  receivedAt: number;
  tries: number;
  nextAttemptAt: number;
  lastError: string | null;
  auth: SenderAuth | null;
  /** The recipients still to deliver, when home delivered to some already; null: all of them. */
  remaining: string[] | null;
}

interface AttemptState {
  tries: number;
  nextAttemptAt: number;
  lastError: string | null;
  remaining?: string[];
  /** Written by versions before auth.log; read at start and moved there. */
  auth?: SenderAuth;
}

export class SpoolStore {
  private readonly entries = new Map<string, SpoolEntry>();
  private attempts: Record<string, AttemptState> = {};
  readonly quarantineDir: string;
  readonly tmpDir: string;
  private readonly statePath: string;
  private readonly authLogPath: string;
  /** Verdicts read at start, until their files are registered. */
  private authAtStart = new Map<string, SenderAuth>();
  /** Verdict lines waiting for the next append, and how many lines auth.log holds. */
  private pendingVerdicts: string[] = [];
  private verdictLines = 0;
  /**
   * At most one append per VERDICT_APPEND_INTERVAL_MS: a backlog's verdicts go out together (the
   * appends cost the edge's one thread more than the lines), a lone verdict at once.
   */
  private readonly verdictWrites = new GroupCommit(() => this.writeVerdicts(), VERDICT_APPEND_INTERVAL_MS);

  private constructor(
    readonly dir: string,
    private readonly logger: Logger,
  ) {
    this.quarantineDir = join(dir, "quarantine");
    this.tmpDir = join(dir, "tmp");
    this.statePath = join(dir, "attempts.json");
    this.authLogPath = join(dir, "auth.log");
  }

  static async open(dir: string, logger: Logger): Promise<SpoolStore> {
    const store = new SpoolStore(dir, logger);
    for (const d of [dir, store.quarantineDir, store.tmpDir])
      await mkdir(d, { recursive: true, mode: 0o700 });
    // A temporary file is a session that never got its 250: the sender still has the message.
    for (const name of await readdir(store.tmpDir)) await unlink(join(store.tmpDir, name)).catch(() => {});
    store.attempts = (await readJsonFile<Record<string, AttemptState>>(store.statePath)) ?? {};
    for (const [id, attempt] of Object.entries(store.attempts)) {
      if (attempt.auth) store.authAtStart.set(id, attempt.auth);
      delete attempt.auth;
    }
    for (const [id, auth] of await readAuthLog(store.authLogPath)) store.authAtStart.set(id, auth);
    for (const name of (await readdir(dir)).sort()) {
      if (!name.endsWith(".spool")) continue;
      const path = join(dir, name);
      try {
        await verifySpoolFile(path);
        await store.add(path);
      } catch (error) {
        await store.quarantineFile(path, name.slice(0, -6), (error as Error).message);
      }
    }
    store.authAtStart.clear();
    await store.compactVerdicts();
    return store;
  }

  /** Registers a committed file (after its rename and directory fsync), reading its header. */
  async add(path: string): Promise<SpoolEntry> {
    const meta = await readSpoolMeta(path);
    return this.register(path, meta.header, meta.fileSize);
  }

  /** Registers a file this process has just committed: what add() would read back from it. */
  register(path: string, header: SpoolHeader, fileSize: number): SpoolEntry {
    const attempt = this.attempts[header.id];
    const entry: SpoolEntry = {
      id: header.id,
      path,
      header,
      homeKey: String(header.extra.homeKey ?? ""),
      size: fileSize,
      receivedAt: Date.parse(header.receivedAt),
      tries: attempt?.tries ?? 0,
      nextAttemptAt: attempt?.nextAttemptAt ?? 0,
      lastError: attempt?.lastError ?? null,
      auth: this.authAtStart.get(header.id) ?? null,
      remaining: attempt?.remaining ?? null,
    };
    this.entries.set(entry.id, entry);
    return entry;
  }

  get(id: string): SpoolEntry | undefined {
    return this.entries.get(id);
  }

  /**
   * The entries oldest first without sorting: in the order they were registered, which is file-name
   * order at start and spool order afterwards (ids begin with the time in base 36).
   */
  inOrder(): IterableIterator<SpoolEntry> {
    return this.entries.values();
  }

  list(): SpoolEntry[] {
    return [...this.entries.values()].sort((a, b) => a.receivedAt - b.receivedAt || a.id.localeCompare(b.id));
  }

  get size(): number {
    return this.entries.size;
  }

  /** Delivered: the file goes, durably. */
  async remove(id: string): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) return;
    this.entries.delete(id);
    await unlink(entry.path).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== "ENOENT") throw error;
    });
    await fsyncDirectory(this.dir);
    if (this.attempts[id]) {
      delete this.attempts[id];
      await this.saveAttempts();
    }
  }

  async deferred(id: string, error: string, delayMs: number, now = Date.now()): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) return;
    entry.tries++;
    entry.lastError = error;
    entry.nextAttemptAt = now + delayMs;
    this.attempts[id] = {
      ...this.attempts[id],
      tries: entry.tries,
      nextAttemptAt: entry.nextAttemptAt,
      lastError: error,
    };
    await this.saveAttempts();
  }

  /** Home delivered to some recipients (or they failed for good): only `remaining` are retried. */
  async narrow(id: string, remaining: string[]): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) return;
    entry.remaining = remaining;
    this.attempts[id] = {
      tries: entry.tries,
      nextAttemptAt: entry.nextAttemptAt,
      lastError: entry.lastError,
      ...this.attempts[id],
      remaining,
    };
    await this.saveAttempts();
  }

  async quarantine(id: string, reason: string): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) return;
    this.entries.delete(id);
    await this.quarantineFile(entry.path, id, reason);
    if (this.attempts[id]) {
      delete this.attempts[id];
      await this.saveAttempts();
    }
  }

  /**
   * Records the sender check's verdict: one line appended to auth.log. Lines that arrive while an
   * append runs go out together in the next (GroupCommit). Appends are not synced: a process crash
   * keeps what was written, and a verdict lost to a power cut leaves its message unauthenticated,
   * the safe side (quarantine, never a DSN), so the log costs no fsync next to the spool files'.
   */
  async setAuth(id: string, auth: SenderAuth): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) return;
    entry.auth = auth;
    this.pendingVerdicts.push(authLine(id, auth));
    await this.verdictWrites.request();
  }

  /** Makes every entry due now (queue flush). */
  flush(): number {
    for (const entry of this.entries.values()) entry.nextAttemptAt = 0;
    return this.entries.size;
  }

  private async quarantineFile(path: string, id: string, reason: string): Promise<void> {
    this.logger.error({ id, reason }, "spool file quarantined: it will not be delivered");
    await rename(path, join(this.quarantineDir, `${id}.spool`)).catch(() => {});
    await writeFileAtomic(join(this.quarantineDir, `${id}.reason`), `${reason}\n`, { mode: 0o600 });
    await fsyncDirectory(this.dir);
  }

  private async writeVerdicts(): Promise<void> {
    const lines = this.pendingVerdicts;
    this.pendingVerdicts = [];
    if (lines.length === 0) return;
    // Delivered messages' lines stay until a compaction: one when they outnumber the live ones.
    if (this.verdictLines + lines.length > 2 * this.entries.size + VERDICT_LOG_SLACK) {
      await this.compactVerdicts();
      return;
    }
    const handle = await open(this.authLogPath, "a", 0o600);
    try {
      await handle.appendFile(lines.join(""));
    } finally {
      await handle.close();
    }
    this.verdictLines += lines.length;
  }

  /** Rewrites auth.log with the verdicts of the messages still spooled (atomically, synced). */
  private async compactVerdicts(): Promise<void> {
    const lines: string[] = [];
    for (const entry of this.entries.values()) if (entry.auth) lines.push(authLine(entry.id, entry.auth));
    await writeFileAtomic(this.authLogPath, lines.join(""), { mode: 0o600 });
    this.verdictLines = lines.length;
  }

  private readonly attemptsWrites = new GroupCommit(() =>
    writeFileAtomic(this.statePath, JSON.stringify(this.attempts), { mode: 0o600 }),
  );

  /**
   * Persists the attempts map. Writes are grouped: while one write runs, every caller waits for a
   * single follow-up write that includes all changes made meanwhile.
   */
  private saveAttempts(): Promise<void> {
    return this.attemptsWrites.request();
  }
}

/** auth.log gets at most one append per this many ms; the verdicts in between share it. */
const VERDICT_APPEND_INTERVAL_MS = 100;

/** auth.log may hold this many lines beyond twice the live verdicts before it is compacted. */
const VERDICT_LOG_SLACK = 1000;

function authLine(id: string, auth: SenderAuth): string {
  return `${JSON.stringify({ id, auth })}\n`;
}

/** The verdicts in auth.log, later lines winning. A torn last line (a crash mid-append) is skipped. */
async function readAuthLog(path: string): Promise<Map<string, SenderAuth>> {
  const verdicts = new Map<string, SenderAuth>();
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return verdicts;
    throw error;
  }
  for (const line of text.split("\n")) {
    if (line === "") continue;
    try {
      const record = JSON.parse(line) as { id?: unknown; auth?: unknown };
      if (typeof record.id === "string" && typeof record.auth === "object" && record.auth !== null) {
        verdicts.set(record.id, record.auth as SenderAuth);
      }
    } catch {
      // not a whole line: the append it belonged to never finished
    }
  }
  return verdicts;
}

/** What `mxtunnel-edge queue` shows of the spool: never content, never addresses. */
export function spoolQueueEntries(store: SpoolStore, now = Date.now()) {
  return store.list().map((entry) => ({
    id: entry.id,
    queue: "spool" as const,
    ageSeconds: Math.round((now - entry.receivedAt) / 1000),
    size: entry.size,
    recipients: entry.header.envelope.rcptTo.length,
    tries: entry.tries,
    nextAttempt: entry.nextAttemptAt > now ? new Date(entry.nextAttemptAt).toISOString() : "now",
    lastError: entry.lastError,
    state: entry.tries === 0 ? "waiting for home" : "deferred",
  }));
}

export function renderSpoolQueue(rows: ReturnType<typeof spoolQueueEntries>): string {
  if (rows.length === 0) return "spool: empty (nothing waiting for home)";
  const lines = [
    `spool: ${rows.length} message(s) waiting for home`,
    "ID                          AGE      SIZE      RCPT  TRIES  NEXT / LAST ERROR",
  ];
  for (const row of rows) {
    lines.push(
      `${row.id.padEnd(27)} ${`${row.ageSeconds}s`.padEnd(8)} ${String(row.size).padEnd(9)} ${String(row.recipients).padEnd(5)} ${String(row.tries).padEnd(6)} ${row.lastError ?? row.nextAttempt}`,
    );
  }
  return lines.join("\n");
}
