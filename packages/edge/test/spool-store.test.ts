import { randomBytes } from "node:crypto";
import { appendFile, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createLogger, generateKeyPair, SpoolFileWriter, SpoolSealer } from "@mxtunnel/shared";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { SenderAuth } from "../src/sender-auth.js";
import { SpoolStore } from "../src/spool-store.js";

const logger = createLogger({ name: "test", level: "silent" });
const home = generateKeyPair();
let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "mxtunnel-spool-store-"));
});

afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function spool(store: SpoolStore): Promise<string> {
  const id = `m${randomBytes(6).toString("hex")}`;
  const sealer = new SpoolSealer({
    spoolPublicKey: home.publicKey,
    id,
    receivedAt: new Date(),
    envelope: {
      mailFrom: "alice@example.net",
      mailParams: {},
      rcptTo: [{ address: "bob@example.org", params: {} }],
    },
    client: { address: "203.0.113.7", port: 40123, helo: "mx.example.net", tls: false },
    extra: { homeKey: "home" },
  });
  const writer = await SpoolFileWriter.create(store.dir, sealer, { tmpDir: store.tmpDir });
  await writer.write(Buffer.from("Subject: hi\r\n\r\nbody\r\n"));
  await store.add((await writer.commit()).path);
  return id;
}

function verdict(spf: string): SenderAuth {
  return { spf, dkimAligned: false, dsnAllowed: spf === "pass", checkedAt: new Date().toISOString() };
}

describe("SpoolStore sender verdicts", () => {
  it("keeps verdicts across a restart, appending one line per verdict and compacting at start", async () => {
    const store = await SpoolStore.open(dir, logger);
    const ids = [await spool(store), await spool(store), await spool(store)];
    await Promise.all(ids.map((id, i) => store.setAuth(id, verdict(i === 1 ? "fail" : "pass"))));
    expect((await readFile(join(dir, "auth.log"), "utf8")).trim().split("\n")).toHaveLength(3);
    // Delivered: its verdict stays in the log until the next start drops it.
    await store.remove(ids[0] as string);

    const again = await SpoolStore.open(dir, logger);
    expect(again.get(ids[1] as string)?.auth?.spf).toBe("fail");
    expect(again.get(ids[2] as string)?.auth?.dsnAllowed).toBe(true);
    const compacted = (await readFile(join(dir, "auth.log"), "utf8")).trim().split("\n");
    expect(compacted.map((line) => JSON.parse(line).id).sort()).toEqual([ids[1], ids[2]].sort());
  });

  it("skips a torn last line (a crash mid-append) and reads verdicts from an older attempts.json", async () => {
    const store = await SpoolStore.open(dir, logger);
    const [logged, legacy, torn] = [await spool(store), await spool(store), await spool(store)];
    await store.setAuth(logged, verdict("pass"));
    await appendFile(join(dir, "auth.log"), `{"id":"${torn}","auth":{"spf":"pa`);
    await writeFile(
      join(dir, "attempts.json"),
      JSON.stringify({
        [legacy]: { tries: 2, nextAttemptAt: 0, lastError: "home away", auth: verdict("pass") },
      }),
    );

    const again = await SpoolStore.open(dir, logger);
    expect(again.get(logged)?.auth?.spf).toBe("pass");
    expect(again.get(legacy)).toMatchObject({ tries: 2, auth: { spf: "pass" } });
    expect(again.get(torn)?.auth).toBeNull();
    expect(again.list()).toHaveLength(3);
  });

  it("compacts auth.log while running once stale lines outnumber the live verdicts", async () => {
    const store = await SpoolStore.open(dir, logger);
    const [kept, delivered] = [await spool(store), await spool(store)];
    await store.setAuth(delivered, verdict("pass"));
    await store.remove(delivered);
    // Each verdict is a line; a thousand re-checks of one message are a thousand stale lines.
    const rechecks = [];
    for (let i = 0; i < 1005; i++) rechecks.push(store.setAuth(kept, verdict(i % 2 === 0 ? "pass" : "fail")));
    await Promise.all(rechecks);
    const lines = (await readFile(join(dir, "auth.log"), "utf8")).trim().split("\n");
    expect(lines.length).toBeLessThan(10);
    expect(lines.map((line) => JSON.parse(line).id)).not.toContain(delivered);
    const again = await SpoolStore.open(dir, logger);
    expect(again.get(kept)?.auth?.spf).toBe("pass");
  });

  it("the verdicts of a burst right after an append wait for the next one and share it", async () => {
    const store = await SpoolStore.open(dir, logger);
    const ids = [];
    for (let i = 0; i < 30; i++) ids.push(await spool(store));
    const log = () => readFile(join(dir, "auth.log"), "utf8");
    await store.setAuth(ids[0] as string, verdict("pass"));
    expect((await log()).trim().split("\n")).toHaveLength(1);
    // The burst right after it waits for the interval and shares one append: all its lines at once.
    const burst = ids.slice(1).map((id) => store.setAuth(id, verdict("fail")));
    await Promise.resolve();
    expect((await log()).trim().split("\n")).toHaveLength(1);
    await Promise.all(burst);
    const lines = (await log()).trim().split("\n");
    expect(lines).toHaveLength(30);
    expect(new Set(lines.map((line) => JSON.parse(line).id))).toEqual(new Set(ids));
  });

  it("ignores a verdict for a message no longer spooled", async () => {
    const store = await SpoolStore.open(dir, logger);
    const id = await spool(store);
    await store.remove(id);
    await store.setAuth(id, verdict("pass"));
    await expect(readFile(join(dir, "auth.log"), "utf8")).resolves.toBe("");
  });
});
