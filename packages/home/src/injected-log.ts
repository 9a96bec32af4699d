// The durable record of spooled messages home has handed to Postfix. Written (and fsynced) after
// Postfix's 250 and before home reports success to the edge, so a lost acknowledgement makes the
// edge send again and home answer "already delivered" instead of delivering twice.
//
// The record is bounded: an id is kept for INJECTED_ID_HORIZON_MS after it was recorded, then
// dropped when the file is compacted (at open, and while running once enough lines were appended).
// Compaction rewrites the file with writeFileAtomic (temp, fsync, rename, fsync dir): a crash leaves
// the old file or the new one, and a temp file left behind is removed at the next open.
import { createHash } from "node:crypto";
import { type FileHandle, open, readdir, readFile, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { type Logger, MAX_DURATION_MS, writeFileAtomic } from "@mxtunnel/shared";

const DAY_MS = 86_400_000;

/**
 * How long an id is remembered. The edge sends a spooled message again only while it is younger
 * than its `spool.maxAge` (spool-drain.ts gives up on anything older: DSN or quarantine, never
 * another attempt), measured from when the edge received it — which is before home recorded it. No
 * duration in the config may exceed MAX_DURATION_MS (~24.9 days), so no edge, whatever its
 * configuration, re-sends an id more than ~24.9 days after home recorded it. On top: the last
 * attempt may start just before the expiry and take up to its result timeout (10 minutes), and
 * either clock may be stepped (NTP, a wrong RTC at boot) — home's clock judges the age. Five days of
 * margin covers those with room; the cost is only a few more lines kept (spool mode carries little
 * mail: only what arrives while home is away).
 */
export const INJECTED_ID_HORIZON_MS = MAX_DURATION_MS + 5 * DAY_MS;

/** Compact while running once this many lines were appended (or as many as the last compaction kept). */
const COMPACT_AFTER_LINES = 10_000;

/**
 * The spool header's id pattern (spool-file.ts validates every header against it before home looks an
 * id up here), alone or as a recipientKey(). A line whose first field does not match can never answer
 * a re-send.
 */
const SPOOL_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}(\/[0-9a-f]{32})?$/;

/**
 * The key recording one recipient of a spooled message as delivered, for a message Postfix took for
 * only some of its recipients: `<id>/<first 128 bits of SHA-256 of the address, hex>`. A re-send
 * then goes only to the recipients not recorded. A message delivered whole is recorded by its id.
 */
export function recipientKey(id: string, address: string): string {
  return `${id}/${createHash("sha256").update(address).digest("hex").slice(0, 32)}`;
}

export interface InjectedLogOptions {
  logger: Logger;
  /** The clock (tests). */
  now?: () => number;
  /** Compact while running after this many appended lines (tests); default 10 000. */
  compactAfterLines?: number;
}

export class InjectedLog {
  /** id → when it was recorded (ms, home's clock). */
  private readonly recordedAt: Map<string, number>;
  private handle: FileHandle | undefined;
  /** Appends and compactions run one at a time, in order. */
  private queue: Promise<void> = Promise.resolve();
  private appendedSinceCompaction = 0;
  private keptAtCompaction = 0;
  private compacting = false;
  private closed = false;

  private constructor(
    private readonly path: string,
    private readonly options: InjectedLogOptions,
    recordedAt: Map<string, number>,
  ) {
    this.recordedAt = recordedAt;
  }

  static async open(path: string, options: InjectedLogOptions): Promise<InjectedLog> {
    const now = options.now ?? Date.now;
    await removeAbandonedTemps(path, options.logger);
    let text = "";
    try {
      text = await readFile(path, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
    }
    const parsed = parseInjectedLog(text, now());
    if (parsed.skipped.length) {
      // Skipped, not fatal: such a line cannot hold an id the edge could send (see SPOOL_ID), so
      // dropping it never lets a message through twice; refusing to start would stop all inbound
      // mail over damage that cannot matter.
      options.logger.warn(
        {
          file: path,
          count: parsed.skipped.length,
          lines: parsed.skipped.slice(0, 20).map((s) => s.line),
          first: parsed.skipped[0]!.sample,
        },
        "injected-id log: skipped lines that are not records of a delivered spool id",
      );
    }
    if (parsed.undated)
      options.logger.warn(
        { file: path, count: parsed.undated },
        "injected-id log: ids without a readable time are kept and aged from now",
      );
    const log = new InjectedLog(path, options, parsed.recordedAt);
    const canonical = log.keepYoung(now());
    log.keptAtCompaction = log.size;
    // Rewritten whenever anything changes: expired ids, skipped lines, or a torn tail (which the next
    // append would otherwise run into).
    if (canonical !== text) await writeFileAtomic(path, canonical, { mode: 0o600 });
    log.handle = await open(path, "a", 0o600);
    return log;
  }

  has(id: string): boolean {
    return this.recordedAt.has(id);
  }

  get size(): number {
    return this.recordedAt.size;
  }

  /** Records ids or recipientKey()s, in one synced append. */
  async record(...keys: string[]): Promise<void> {
    await this.serially(async () => {
      const handle = this.handle ?? (await open(this.path, "a", 0o600));
      // After close (a delivery finishing during shutdown) the id is still written, with a handle of
      // its own: Postfix has the message, and an unrecorded id would be delivered again.
      if (!this.closed) this.handle = handle;
      try {
        const at = this.now();
        await handle.appendFile(keys.map((key) => recordLine(key, at)).join(""));
        await handle.datasync();
        for (const key of keys) this.recordedAt.set(key, at);
        this.appendedSinceCompaction += keys.length;
      } finally {
        if (this.closed) {
          if (this.handle === handle) this.handle = undefined;
          await handle.close();
        }
      }
    });
    const due = Math.max(this.options.compactAfterLines ?? COMPACT_AFTER_LINES, this.keptAtCompaction);
    if (!this.compacting && this.appendedSinceCompaction >= due) {
      this.compacting = true;
      void this.compact()
        .catch((error: Error) =>
          this.options.logger.warn(
            { file: this.path, err: error.message },
            "injected-id log: compaction failed; the log keeps growing until the next attempt",
          ),
        )
        .finally(() => {
          this.compacting = false;
        });
    }
  }

  /** Drops ids older than the horizon from memory and from the file (atomically). */
  compact(): Promise<void> {
    return this.serially(async () => {
      const canonical = this.keepYoung(this.now());
      await writeFileAtomic(this.path, canonical, { mode: 0o600 });
      // The old handle appends to the replaced file: the next record opens the new one.
      const old = this.handle;
      this.handle = undefined;
      await old?.close();
      this.appendedSinceCompaction = 0;
      this.keptAtCompaction = this.recordedAt.size;
    });
  }

  close(): Promise<void> {
    this.closed = true;
    return this.serially(async () => {
      await this.handle?.close();
      this.handle = undefined;
    });
  }

  /** Forgets ids past the horizon; returns the file's content for the ones kept. */
  private keepYoung(now: number): string {
    let text = "";
    for (const [id, at] of this.recordedAt) {
      if (now - at > INJECTED_ID_HORIZON_MS) this.recordedAt.delete(id);
      else text += recordLine(id, at);
    }
    return text;
  }

  private now(): number {
    return (this.options.now ?? Date.now)();
  }

  private serially(step: () => Promise<void>): Promise<void> {
    const run = this.queue.then(step);
    this.queue = run.catch(() => undefined);
    return run;
  }
}

function recordLine(id: string, at: number): string {
  return `${id} ${new Date(at).toISOString()}\n`;
}

interface ParsedLog {
  recordedAt: Map<string, number>;
  /** Complete lines that are not `<spool id> <time>`: 1-based line numbers and a short sample. */
  skipped: { line: number; sample: string }[];
  /** Ids whose time is unreadable: kept, aged from `now` (the safe side). */
  undated: number;
}

/** Reads `<id> <ISO time>` lines. */
function parseInjectedLog(text: string, now: number): ParsedLog {
  const recordedAt = new Map<string, number>();
  const skipped: ParsedLog["skipped"] = [];
  let undated = 0;
  const lines = text.split("\n");
  // The part after the last newline: "" for a whole file, else a line torn by a crash mid-append.
  const tail = lines.pop() ?? "";
  lines.forEach((line, index) => {
    const space = line.indexOf(" ");
    const id = space < 0 ? line : line.slice(0, space);
    if (!SPOOL_ID.test(id)) {
      skipped.push({ line: index + 1, sample: JSON.stringify(line.slice(0, 40)) });
      return;
    }
    let at = space < 0 ? Number.NaN : Date.parse(line.slice(space + 1));
    if (Number.isNaN(at)) {
      undated++;
      at = now;
    }
    recordedAt.set(id, Math.max(at, recordedAt.get(id) ?? at));
  });
  // A torn line whose id is complete (the space after it was written) is kept, as before: the line
  // is only written after Postfix's 250, so that message was delivered. Without the space the id
  // may be cut short, and the line is ignored.
  const space = tail.indexOf(" ");
  const tornId = tail.slice(0, space);
  if (space > 0 && SPOOL_ID.test(tornId) && !recordedAt.has(tornId)) recordedAt.set(tornId, now);
  return { recordedAt, skipped, undated };
}

/** writeFileAtomic's temp files for this log (`.<name>.<pid>.<hex>.tmp`) left by a crash mid-compaction. */
async function removeAbandonedTemps(path: string, logger: Logger): Promise<void> {
  const prefix = `.${basename(path)}.`;
  let names: string[];
  try {
    names = await readdir(dirname(path));
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
    throw error;
  }
  for (const name of names) {
    if (!name.startsWith(prefix) || !/^\d+\.[0-9a-f]+\.tmp$/.test(name.slice(prefix.length))) continue;
    // Never the log itself: the rename that would have made it so did not happen.
    logger.info({ file: join(dirname(path), name) }, "injected-id log: removing an unfinished compaction");
    await unlink(join(dirname(path), name)).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== "ENOENT") throw error;
    });
  }
}
