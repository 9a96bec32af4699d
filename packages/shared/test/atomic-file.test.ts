import { spawnSync } from "node:child_process";
import * as fs from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import {
  FileLock,
  fsyncDirectory,
  parseJsonText,
  readJsonFile,
  writeFileAtomic,
} from "../src/atomic-file.js";
import { StateError } from "../src/errors.js";

// Failure injection: the module under test writes through node:fs's callbacks and renames through
// node:fs/promises, so partial mocks let a test make one write fail (or come up short) the way a full
// disk would, or one rename fail.
const failures = vi.hoisted(() => ({
  write: undefined as Error | undefined,
  /** The next write writes only half of what it was asked to. */
  shortWrite: false,
  rename: undefined as Error | undefined,
}));
vi.mock("node:fs", async (importOriginal) => {
  const actual = await importOriginal<typeof import("node:fs")>();
  type Callback = (error: Error | null, written?: number) => void;
  return {
    ...actual,
    write: (
      fd: number,
      buffer: Uint8Array,
      offset: number,
      length: number,
      position: null,
      callback: Callback,
    ) => {
      const failure = failures.write;
      failures.write = undefined;
      if (failure) {
        process.nextTick(callback, failure);
        return;
      }
      const short = failures.shortWrite && length > 1;
      failures.shortWrite = false;
      actual.write(fd, buffer, offset, short ? Math.floor(length / 2) : length, position, callback);
    },
  };
});
vi.mock("node:fs/promises", async (importOriginal) => {
  const actual = await importOriginal<typeof import("node:fs/promises")>();
  return {
    ...actual,
    rename: async (...args: Parameters<typeof actual.rename>) => {
      const failure = failures.rename;
      failures.rename = undefined;
      if (failure) throw failure;
      return actual.rename(...args);
    },
  };
});

function enospc(): NodeJS.ErrnoException {
  return Object.assign(new Error("ENOSPC: no space left on device"), { code: "ENOSPC" });
}

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(join(tmpdir(), "mxt-atomic-"));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

describe("writeFileAtomic", () => {
  it("creates and replaces a file, leaving no temporary files", async () => {
    const path = join(dir, "state.json");
    await writeFileAtomic(path, "one");
    await writeFileAtomic(path, new TextEncoder().encode("two"));
    expect(await fs.readFile(path, "utf8")).toBe("two");
    expect(await fs.readdir(dir)).toEqual(["state.json"]);
  });

  it("applies the requested mode exactly, whatever the umask", async () => {
    const path = join(dir, "key.json");
    const old = process.umask(0o077);
    try {
      await writeFileAtomic(path, "secret", { mode: 0o600 });
      expect((await fs.stat(path)).mode & 0o777).toBe(0o600);
      await writeFileAtomic(path, "public", { mode: 0o644 });
      expect((await fs.stat(path)).mode & 0o777).toBe(0o644);
    } finally {
      process.umask(old);
    }
  });

  it("leaves the old file intact and removes the temp file when a write fails", async () => {
    const path = join(dir, "state.json");
    await writeFileAtomic(path, "old");
    failures.write = enospc();
    await expect(writeFileAtomic(path, "new")).rejects.toMatchObject({ code: "ENOSPC" });
    expect(await fs.readFile(path, "utf8")).toBe("old");
    expect(await fs.readdir(dir)).toEqual(["state.json"]);
  });

  it("writes all of the data when a write comes up short", async () => {
    const path = join(dir, "state.json");
    failures.shortWrite = true;
    await writeFileAtomic(path, "x".repeat(10_000));
    expect(failures.shortWrite).toBe(false);
    expect(await fs.readFile(path, "utf8")).toBe("x".repeat(10_000));
  });

  it("leaves the old file intact and removes the temp file when the rename fails", async () => {
    const path = join(dir, "state.json");
    await writeFileAtomic(path, "old");
    failures.rename = Object.assign(new Error("EIO"), { code: "EIO" });
    await expect(writeFileAtomic(path, "new")).rejects.toMatchObject({ code: "EIO" });
    expect(await fs.readFile(path, "utf8")).toBe("old");
    expect(await fs.readdir(dir)).toEqual(["state.json"]);
  });

  it("propagates errors such as a missing directory", async () => {
    await expect(writeFileAtomic(join(dir, "nope", "x"), "x")).rejects.toMatchObject({ code: "ENOENT" });
  });

  it("refuses to replace an existing file when exclusive", async () => {
    const path = join(dir, "key.json");
    await writeFileAtomic(path, "first", { exclusive: true });
    await expect(writeFileAtomic(path, "second", { exclusive: true })).rejects.toMatchObject({
      code: "EEXIST",
    });
    expect(await fs.readFile(path, "utf8")).toBe("first");
    expect(await fs.readdir(dir)).toEqual(["key.json"]);
  });

  it("fsyncs a directory", async () => {
    await expect(fsyncDirectory(dir)).resolves.toBeUndefined();
  });
});

describe("readJsonFile", () => {
  it("returns undefined for a missing file and the value otherwise", async () => {
    expect(await readJsonFile(join(dir, "missing.json"))).toBeUndefined();
    await fs.writeFile(join(dir, "a.json"), '{"a":[1,2]}');
    expect(await readJsonFile<{ a: number[] }>(join(dir, "a.json"))).toEqual({ a: [1, 2] });
  });

  it("names the file and line on bad JSON without quoting its content", async () => {
    const path = join(dir, "bad.json");
    await fs.writeFile(path, '{\n  "password": "hunter2",\n  "b" 2\n}\n');
    const error = (await readJsonFile(path).then(
      () => undefined,
      (e: unknown) => e,
    )) as Error;
    expect(error).toMatchObject({ code: "STATE_CORRUPT" });
    expect((error as Error).message).toContain(path);
    expect((error as Error).message).toMatch(/line 3/);
    expect((error as Error).message).not.toContain("hunter2");
  });

  it("describes an empty or truncated file", () => {
    expect(() => parseJsonText("", "x.json")).toThrow(/x\.json.*ends early|x\.json: not valid JSON/);
    expect(() => parseJsonText('{"a": 1,', "x.json")).toThrow(/x\.json/);
  });
});

describe("FileLock", () => {
  it("acquires, refuses a second holder while alive, and releases", async () => {
    const path = join(dir, "state.lock");
    const lock = await FileLock.acquire(path, "pair");
    const content = JSON.parse(await fs.readFile(path, "utf8"));
    expect(content).toMatchObject({ pid: process.pid, purpose: "pair" });
    expect((await fs.stat(path)).mode & 0o777).toBe(0o600);

    const error = await FileLock.acquire(path, "unpair").then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(StateError);
    expect((error as StateError).code).toBe("STATE_LOCKED");
    expect((error as StateError).message).toContain(`held by pid ${process.pid} (pair)`);

    await lock.release();
    await lock.release();
    await expect(fs.stat(path)).rejects.toMatchObject({ code: "ENOENT" });
    const again = await FileLock.acquire(path, "queue flush");
    await again.release();
    expect(await fs.readdir(dir)).toEqual([]);
  });

  it("refuses a lock held by another live process", async () => {
    const path = join(dir, "state.lock");
    // the parent of this test process is alive for as long as the test runs
    await fs.writeFile(path, JSON.stringify({ pid: process.ppid, purpose: "run", since: "", nonce: "x" }));
    await expect(FileLock.acquire(path, "pair")).rejects.toThrow(`held by pid ${process.ppid} (run)`);
  });

  it("takes over a lock whose process has exited", async () => {
    const child = spawnSync(process.execPath, ["-e", ""]);
    expect(child.pid).toBeGreaterThan(0);
    const path = join(dir, "state.lock");
    await fs.writeFile(path, JSON.stringify({ pid: child.pid, purpose: "crashed", since: "", nonce: "y" }));
    const lock = await FileLock.acquire(path, "pair");
    expect(JSON.parse(await fs.readFile(path, "utf8"))).toMatchObject({ pid: process.pid, purpose: "pair" });
    await lock.release();
  });

  it("takes over an unreadable lock file", async () => {
    const path = join(dir, "state.lock");
    await fs.writeFile(path, "");
    const lock = await FileLock.acquire(path, "pair");
    await lock.release();
  });

  it("does not remove a lock that was taken over from it", async () => {
    const path = join(dir, "state.lock");
    const lock = await FileLock.acquire(path, "pair");
    await fs.writeFile(path, JSON.stringify({ pid: process.ppid, purpose: "other", since: "", nonce: "z" }));
    await lock.release();
    expect(JSON.parse(await fs.readFile(path, "utf8"))).toMatchObject({ purpose: "other" });
  });
});
