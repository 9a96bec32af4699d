import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { createLogger, MAX_DURATION_MS } from "@mxtunnel/shared";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { INJECTED_ID_HORIZON_MS, InjectedLog, recipientKey } from "../src/injected-log.js";

const DAY = 86_400_000;
const T0 = Date.parse("2026-11-01T00:00:00.000Z");

/** A logger whose lines land in `lines` (parsed). */
function capturingLogger() {
  const lines: { level: number; msg: string; [key: string]: unknown }[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const text of chunk.toString("utf8").split("\n")) if (text) lines.push(JSON.parse(text));
      done();
    },
  });
  return { logger: createLogger({ name: "test", level: "debug", destination: sink }), lines };
}

let dir: string;
let path: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "mxt-injected-"));
  path = join(dir, "injected.log");
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

function line(id: string, at: number): string {
  return `${id} ${new Date(at).toISOString()}\n`;
}

describe("InjectedLog", () => {
  it("keeps the horizon above the longest spool.maxAge any edge may be configured with", () => {
    expect(INJECTED_ID_HORIZON_MS).toBeGreaterThan(MAX_DURATION_MS + DAY);
  });

  it("remembers recipients recorded one by one across a reopen, apart from the whole id", async () => {
    const { logger, lines } = capturingLogger();
    const log = await InjectedLog.open(path, { logger, now: () => T0 });
    await log.record(recipientKey("msg-1", "alice@home.test"), recipientKey("msg-1", "bob@home.test"));
    await log.close();
    const again = await InjectedLog.open(path, { logger, now: () => T0 });
    expect(again.has(recipientKey("msg-1", "alice@home.test"))).toBe(true);
    expect(again.has(recipientKey("msg-1", "bob@home.test"))).toBe(true);
    expect(again.has(recipientKey("msg-1", "carol@home.test"))).toBe(false);
    expect(again.has("msg-1")).toBe(false);
    expect(lines.filter((l) => l.level >= 40)).toEqual([]);
    await again.close();
  });

  it("remembers recorded ids across a reopen", async () => {
    const { logger } = capturingLogger();
    const log = await InjectedLog.open(path, { logger, now: () => T0 });
    await log.record("msg-1");
    await log.record("msg-2");
    expect(log.has("msg-1")).toBe(true);
    await log.close();

    const again = await InjectedLog.open(path, { logger, now: () => T0 + DAY });
    expect(again.has("msg-1")).toBe(true);
    expect(again.has("msg-2")).toBe(true);
    expect(again.has("msg-3")).toBe(false);
    expect(again.size).toBe(2);
    await again.close();
  });

  it("drops ids older than the horizon at open and keeps younger ones", async () => {
    const { logger } = capturingLogger();
    let now = T0;
    const log = await InjectedLog.open(path, { logger, now: () => now });
    await log.record("old");
    now = T0 + 10 * DAY;
    await log.record("young");
    await log.close();

    // 1 ms past the horizon for "old"; "young" is 10 days inside it.
    const reopenAt = T0 + INJECTED_ID_HORIZON_MS + 1;
    const again = await InjectedLog.open(path, { logger, now: () => reopenAt });
    expect(again.has("old")).toBe(false);
    expect(again.has("young")).toBe(true);
    await again.close();
    // Gone from the file too, and the kept line keeps its original time.
    expect(await readFile(path, "utf8")).toBe(line("young", T0 + 10 * DAY));
  });

  it("keeps an id exactly at the horizon", async () => {
    const { logger } = capturingLogger();
    await writeFile(path, line("edge", T0));
    const log = await InjectedLog.open(path, { logger, now: () => T0 + INJECTED_ID_HORIZON_MS });
    expect(log.has("edge")).toBe(true);
    await log.close();
  });

  it("compacts while running once enough lines were appended", async () => {
    const { logger } = capturingLogger();
    let now = T0;
    const log = await InjectedLog.open(path, { logger, now: () => now, compactAfterLines: 3 });
    await log.record("a");
    await log.record("b");
    now = T0 + INJECTED_ID_HORIZON_MS + DAY;
    await log.record("c"); // the third append: compaction is queued behind it
    await log.close(); // runs after the compaction
    expect(log.has("a")).toBe(false);
    expect(log.has("c")).toBe(true);
    expect(await readFile(path, "utf8")).toBe(line("c", now));
  });

  it("appends to the new file after a running compaction", async () => {
    const { logger } = capturingLogger();
    let now = T0;
    const log = await InjectedLog.open(path, { logger, now: () => now, compactAfterLines: 2 });
    await log.record("a");
    now += INJECTED_ID_HORIZON_MS + DAY;
    await log.record("b");
    await log.compact(); // also waits for the one record("b") started
    await log.record("c");
    await log.close();
    expect(await readFile(path, "utf8")).toBe(line("b", now) + line("c", now));
  });

  it("still records an id that arrives after close (a delivery finishing during shutdown)", async () => {
    const { logger } = capturingLogger();
    const log = await InjectedLog.open(path, { logger, now: () => T0 });
    await log.record("before");
    const late = log.record("queued-before-close");
    await log.close();
    await late;
    await log.record("after-close");
    expect(await readFile(path, "utf8")).toBe(
      line("before", T0) + line("queued-before-close", T0) + line("after-close", T0),
    );
  });

  it("loses nothing when a compaction crashed before its rename (temp file left behind)", async () => {
    const { logger } = capturingLogger();
    const full = line("m1", T0) + line("m2", T0) + line("m3", T0);
    await writeFile(path, full);
    // What writeFileAtomic leaves when the process dies mid-write: a partial temp file, never renamed.
    const temp = join(dir, ".injected.log.4242.a1b2c3d4e5f6.tmp");
    await writeFile(temp, line("m1", T0).slice(0, 10));
    // A file that only looks similar is not ours to delete.
    const other = join(dir, ".injected.log.backup");
    await writeFile(other, "keep me\n");

    const log = await InjectedLog.open(path, { logger, now: () => T0 + DAY });
    expect(["m1", "m2", "m3"].map((id) => log.has(id))).toEqual([true, true, true]);
    await log.close();
    expect(await readFile(path, "utf8")).toBe(full);
    expect((await readdir(dir)).sort()).toEqual([".injected.log.backup", "injected.log"]);
  });

  it("skips garbage lines with a warning and keeps every readable id", async () => {
    const { logger, lines } = capturingLogger();
    await writeFile(
      path,
      line("good-1", T0) +
        "\u0000\u0000\u0000\u0000\n" +
        "not/an/id 2026-11-01T00:00:00.000Z\n" +
        "\n" +
        "undated-1 yesterday\n" +
        "bare-id\n" +
        line("good-2", T0),
    );
    const log = await InjectedLog.open(path, { logger, now: () => T0 + DAY });
    expect(log.has("good-1")).toBe(true);
    expect(log.has("good-2")).toBe(true);
    // An id whose time cannot be read is kept (aged from now): dropping it could deliver twice.
    expect(log.has("undated-1")).toBe(true);
    expect(log.has("bare-id")).toBe(true);
    expect(log.size).toBe(4);
    const skipped = lines.find((l) => l.msg.includes("skipped lines"));
    expect(skipped?.level).toBe(40);
    expect(skipped?.lines).toEqual([2, 3, 4]);
    expect(skipped?.count).toBe(3);
    expect(lines.find((l) => l.msg.includes("without a readable time"))?.count).toBe(2);
    await log.close();
    // The file is rewritten clean: the garbage is gone, the undated ids carry the time they were read.
    expect(await readFile(path, "utf8")).toBe(
      line("good-1", T0) + line("undated-1", T0 + DAY) + line("bare-id", T0 + DAY) + line("good-2", T0),
    );
  });

  it("ignores a torn last line cut inside its id, and the next append starts on a line of its own", async () => {
    const { logger } = capturingLogger();
    await writeFile(path, `${line("whole", T0)}cut-of`);
    const log = await InjectedLog.open(path, { logger, now: () => T0 });
    expect(log.has("cut-of")).toBe(false);
    expect(log.size).toBe(1);
    await log.record("next");
    await log.close();
    expect(await readFile(path, "utf8")).toBe(line("whole", T0) + line("next", T0));
    const again = await InjectedLog.open(path, { logger, now: () => T0 });
    expect(again.has("whole") && again.has("next")).toBe(true);
    await again.close();
  });

  it("keeps a torn last line whose id is complete: it is only written after Postfix's 250", async () => {
    const { logger } = capturingLogger();
    await writeFile(path, `${line("whole", T0)}delivered 2026-11-0`);
    const log = await InjectedLog.open(path, { logger, now: () => T0 + DAY });
    expect(log.has("delivered")).toBe(true);
    await log.close();
    expect(await readFile(path, "utf8")).toBe(line("whole", T0) + line("delivered", T0 + DAY));
  });
});
