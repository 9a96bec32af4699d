// Durability primitives (DESIGN.md "Durability"): every state change is write-temp, fsync, rename,
// fsync-dir, so a crash leaves either the old file or the new one, never a torn one; plus the lock
// file that keeps two CLI commands from writing the same state directory at once.
import { randomBytes } from "node:crypto";
import { close as closeFd, fchmod, fsync as fsyncFd, open as openFd, write as writeFd } from "node:fs";
import { link, open, readFile, rename, stat, unlink } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { StateError } from "./errors.js";

export interface WriteFileAtomicOptions {
  /** File mode, applied exactly (not filtered by the umask). Default: 0o666 minus the umask. */
  mode?: number;
  /** Fail with EEXIST instead of replacing an existing file (the final step is link(), not rename()). */
  exclusive?: boolean;
}

/**
 * A file descriptor behind node:fs's callback calls: no FileHandle object to create, track and close
 * for a file written per message (the spool, the outbound queue, the directory fsync after every
 * durable rename). Whoever opens one closes it on every path.
 */
export class DescriptorFile {
  private constructor(readonly fd: number) {}

  static open(path: string, flags: string, mode?: number): Promise<DescriptorFile> {
    return new Promise((resolve, reject) =>
      openFd(path, flags, mode, (error, fd) => (error ? reject(error) : resolve(new DescriptorFile(fd)))),
    );
  }

  write(buffer: Uint8Array, offset: number, length: number): Promise<{ bytesWritten: number }> {
    return new Promise((resolve, reject) =>
      writeFd(this.fd, buffer, offset, length, null, (error, bytesWritten) =>
        error ? reject(error) : resolve({ bytesWritten }),
      ),
    );
  }

  /** Writes all of `data`, continuing after a short write. */
  async writeAll(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? Buffer.from(data) : data;
    for (let offset = 0; offset < bytes.byteLength; ) {
      offset += (await this.write(bytes, offset, bytes.byteLength - offset)).bytesWritten;
    }
  }

  chmod(mode: number): Promise<void> {
    return new Promise((resolve, reject) =>
      fchmod(this.fd, mode, (error) => (error ? reject(error) : resolve())),
    );
  }

  sync(): Promise<void> {
    return new Promise((resolve, reject) => fsyncFd(this.fd, (error) => (error ? reject(error) : resolve())));
  }

  close(): Promise<void> {
    return new Promise((resolve, reject) => closeFd(this.fd, (error) => (error ? reject(error) : resolve())));
  }
}

export interface StageFileOptions {
  /** The new file's mode, filtered by the umask unless `exactMode`. Default 0o666. */
  mode?: number;
  /** Applies `mode` exactly (an fchmod after the open), not filtered by the umask. */
  exactMode?: boolean;
}

/**
 * Writes `data` to a new temporary file beside `path` and fsyncs it; the caller puts it in place
 * (rename, or link for no-clobber) and syncs the directory. The temporary file lives in the same
 * directory (rename is only atomic within a file system) and is removed if a step fails; the error
 * (ENOSPC, EACCES, …) propagates. Returns the temporary file's path.
 */
export async function stageFile(
  path: string,
  data: string | Uint8Array,
  options: StageFileOptions = {},
): Promise<string> {
  const temp = join(dirname(path), `.${basename(path)}.${process.pid}.${randomBytes(6).toString("hex")}.tmp`);
  const mode = options.mode ?? 0o666;
  const file = await DescriptorFile.open(temp, "wx", mode);
  try {
    try {
      if (options.exactMode) await file.chmod(mode);
      await file.writeAll(data);
      await file.sync();
    } finally {
      await file.close();
    }
  } catch (error) {
    await unlink(temp).catch(() => undefined);
    throw error;
  }
  return temp;
}

/**
 * Replaces `path` with `data` atomically and durably (stageFile, then rename or link, then the
 * directory's fsync). If any step fails the error propagates and the old file, if any, is untouched.
 */
export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  options: WriteFileAtomicOptions = {},
): Promise<void> {
  const temp = await stageFile(
    path,
    data,
    options.mode === undefined ? {} : { mode: options.mode, exactMode: true },
  );
  let placed = false;
  try {
    if (options.exclusive) {
      await link(temp, path);
      await unlink(temp);
    } else {
      await rename(temp, path);
    }
    placed = true;
    await fsyncDirectory(dirname(path));
  } finally {
    if (!placed) await unlink(temp).catch(() => undefined);
  }
}

/** Makes a rename or unlink in `dir` durable. */
export async function fsyncDirectory(dir: string): Promise<void> {
  const file = await DescriptorFile.open(dir, "r");
  try {
    await file.sync();
  } finally {
    await file.close();
  }
}

/** Parsed JSON, or undefined when the file does not exist. Bad JSON throws StateError STATE_CORRUPT naming the file. */
export async function readJsonFile<T>(path: string): Promise<T | undefined> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw error;
  }
  return parseJsonText(text, path) as T;
}

/**
 * JSON.parse with an error that names the file and the line and column. The parser's own message is
 * not repeated: newer V8 versions quote the surrounding text, which may hold a secret.
 */
export function parseJsonText(text: string, fileName: string): unknown {
  try {
    return JSON.parse(text);
  } catch (error) {
    const message = error instanceof Error ? error.message : "";
    const position = /at position (\d+)/.exec(message);
    let where: string;
    if (position) {
      const before = text.slice(0, Number(position[1]));
      const line = before.split("\n").length;
      const column = before.length - before.lastIndexOf("\n");
      where = `${fileName}:${line}:${column}: not valid JSON at line ${line}, column ${column}`;
    } else if (/end of (JSON )?input/i.test(message) || text.trim() === "") {
      where = `${fileName}: not valid JSON: it ends early (empty or cut short)`;
    } else {
      where = `${fileName}: not valid JSON`;
    }
    throw new StateError("STATE_CORRUPT", where);
  }
}

interface LockContent {
  pid: number;
  purpose: string;
  since: string;
  nonce: string;
}

/**
 * An exclusive lock file holding the owner's pid and purpose. The content is written to a temporary
 * file first and put in place with link(), which fails if the lock exists, so a lock file is never
 * seen half-written. A lock whose pid is no longer alive (or whose content is unreadable) is stale and
 * is taken over.
 */
export class FileLock {
  readonly path: string;
  readonly purpose: string;
  readonly #nonce: string;
  #released = false;

  private constructor(path: string, purpose: string, nonce: string) {
    this.path = path;
    this.purpose = purpose;
    this.#nonce = nonce;
  }

  static async acquire(path: string, purpose: string): Promise<FileLock> {
    const nonce = randomBytes(8).toString("hex");
    const content: LockContent = { pid: process.pid, purpose, since: new Date().toISOString(), nonce };
    const temp = join(dirname(path), `.${basename(path)}.${process.pid}.${nonce}.tmp`);
    await writeFileAtomic(temp, `${JSON.stringify(content)}\n`, { mode: 0o600 });
    try {
      for (let attempt = 0; ; attempt++) {
        try {
          await link(temp, path);
          await fsyncDirectory(dirname(path));
          return new FileLock(path, purpose, nonce);
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code !== "EEXIST" || attempt >= 3) throw error;
        }
        await takeOverIfStale(path);
      }
    } finally {
      await unlink(temp).catch(() => undefined);
    }
  }

  /** Removes the lock file if it is still this lock's (a takeover may have replaced it). Idempotent. */
  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    const holder = await readLock(this.path);
    if (holder?.content?.nonce === this.#nonce) {
      await unlink(this.path).catch(ignoreMissing);
      await fsyncDirectory(dirname(this.path));
    }
  }
}

async function takeOverIfStale(path: string): Promise<void> {
  const holder = await readLock(path);
  if (!holder) return; // released meanwhile: try again
  const pid = holder.content?.pid;
  if (pid !== undefined && isAlive(pid)) {
    throw new StateError(
      "STATE_LOCKED",
      `The lock ${path} is held by pid ${pid} (${holder.content?.purpose ?? "unknown purpose"}); ` +
        "wait for it to finish, or stop it if it is stuck.",
    );
  }
  // Stale. Unlink only the very file we judged, so a lock another process has just put in place survives.
  const now = await stat(path).catch(() => undefined);
  if (now && now.ino === holder.ino && now.dev === holder.dev) await unlink(path).catch(ignoreMissing);
}

async function readLock(
  path: string,
): Promise<{ content: LockContent | undefined; ino: number; dev: number } | undefined> {
  let handle: Awaited<ReturnType<typeof open>>;
  try {
    handle = await open(path, "r");
  } catch (error) {
    ignoreMissing(error);
    return undefined;
  }
  try {
    const { ino, dev } = await handle.stat();
    const text = await handle.readFile("utf8");
    let content: LockContent | undefined;
    try {
      const parsed = JSON.parse(text) as Partial<LockContent>;
      if (Number.isInteger(parsed.pid) && (parsed.pid as number) > 0) content = parsed as LockContent;
    } catch {
      content = undefined;
    }
    return { content, ino, dev };
  } finally {
    await handle.close();
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

function ignoreMissing(error: unknown): void {
  if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
}
