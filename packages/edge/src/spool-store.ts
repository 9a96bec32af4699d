// The edge's spool directory: sealed messages waiting for home, one file each, plus a small state
// file with delivery attempts. The edge can list, age and check files (length and hash) but
// cannot read them. A file that fails its check at start is quarantined, never delivered.
import { mkdir, readdir, rename, unlink } from "node:fs/promises";
import { join } from "node:path";
import {
  fsyncDirectory,
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
}

interface AttemptState {
  tries: number;
  nextAttemptAt: number;
  lastError: string | null;
  /** The sender check made at spool time (absent: unknown, treated as failed). */
  auth?: SenderAuth;
}

export class SpoolStore {
  private readonly entries = new Map<string, SpoolEntry>();
  private attempts: Record<string, AttemptState> = {};
  readonly quarantineDir: string;
  readonly tmpDir: string;
  private readonly statePath: string;

  private constructor(
    readonly dir: string,
    private readonly logger: Logger,
  ) {
    this.quarantineDir = join(dir, "quarantine");
    this.tmpDir = join(dir, "tmp");
    this.statePath = join(dir, "attempts.json");
  }

  static async open(dir: string, logger: Logger): Promise<SpoolStore> {
    const store = new SpoolStore(dir, logger);
    for (const d of [dir, store.quarantineDir, store.tmpDir])
      await mkdir(d, { recursive: true, mode: 0o700 });
    // A temporary file is a session that never got its 250: the sender still has the message.
    for (const name of await readdir(store.tmpDir)) await unlink(join(store.tmpDir, name)).catch(() => {});
    store.attempts = (await readJsonFile<Record<string, AttemptState>>(store.statePath)) ?? {};
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
    return store;
  }

  /** Registers a committed file (after its rename and directory fsync). */
  async add(path: string): Promise<SpoolEntry> {
    const meta = await readSpoolMeta(path);
    const { header } = meta;
    const attempt = this.attempts[header.id];
    const entry: SpoolEntry = {
      id: header.id,
      path,
      header,
      homeKey: String(header.extra.homeKey ?? ""),
      size: meta.fileSize,
      receivedAt: Date.parse(header.receivedAt),
      tries: attempt?.tries ?? 0,
      nextAttemptAt: attempt?.nextAttemptAt ?? 0,
      lastError: attempt?.lastError ?? null,
      auth: attempt?.auth ?? null,
    };
    this.entries.set(entry.id, entry);
    return entry;
  }

  get(id: string): SpoolEntry | undefined {
    return this.entries.get(id);
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

  async setAuth(id: string, auth: SenderAuth): Promise<void> {
    const entry = this.entries.get(id);
    if (!entry) return;
    entry.auth = auth;
    this.attempts[id] = {
      tries: entry.tries,
      nextAttemptAt: entry.nextAttemptAt,
      lastError: entry.lastError,
      ...this.attempts[id],
      auth,
    };
    await this.saveAttempts();
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

  private saving: Promise<void> | undefined;
  private queued: Promise<void> | undefined;

  /**
   * Persists the attempts map. Writes are coalesced: while one write runs, every caller waits for
   * a single follow-up write that includes all changes made meanwhile (under load, one write per
   * burst instead of one per message).
   */
  private saveAttempts(): Promise<void> {
    if (this.queued) return this.queued;
    const write = () => writeFileAtomic(this.statePath, JSON.stringify(this.attempts), { mode: 0o600 });
    if (!this.saving) {
      this.saving = write().finally(() => {
        this.saving = undefined;
      });
      return this.saving;
    }
    this.queued = this.saving
      .catch(() => {})
      .then(() => {
        this.queued = undefined;
        return this.saveAttempts();
      });
    return this.queued;
  }
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
