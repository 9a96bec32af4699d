// Faults under load: the tunnel cut and restored mid-stream (a TCP proxy between home and edge that
// the test cuts), home's inject target going down and coming back (live sessions fall back to the
// spool, which drains once it is back), and ENOSPC on a seeded share of spool writes. Senders behave
// like MTAs: no 250, try again. Afterwards every message that got a 250 is delivered whole, and
// duplicates (a 250 lost after the message was committed) are counted, never a loss.
// Kill -9 of either agent under load is test/e2e/spool-crash.test.ts (binaries, seeded schedule).
import * as fs from "node:fs/promises";
import net from "node:net";
import nodemailer from "nodemailer";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { type Mailbox, type ReceivedMessage, startMailbox } from "../../demo/src/mailbox.js";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents, makeEdge, makeHome, startTestHome, type TestEdge } from "../helpers/agents.js";
import { intactCopies, prng, taggedMessage } from "../helpers/tagged-mail.js";
import { Tally } from "./support.js";

const tally = new Tally("faults");
afterAll(() => tally.flush());
afterEach(cleanupAgents);

const SEED = Number(process.env.MXTUNNEL_FAULT_SEED ?? 20261201);

/**
 * Once the edge's spool has drained, waits for every acknowledged message to arrive intact among
 * `received()`; resolves with tag → intact copies (throws on a torn one).
 */
async function deliveredAfterDrain(
  edge: TestEdge,
  acknowledged: Set<string>,
  received: () => ReceivedMessage[],
): Promise<Map<string, number>> {
  await waitFor(() => edge.agent.spool.store.size === 0, { what: "the spool drained", timeoutMs: 30_000 });
  return waitFor(
    () => {
      const copies = intactCopies(
        received().map((m) => m.data.toString("latin1")),
        "fault-",
      );
      return [...acknowledged].every((tag) => copies.has(tag)) ? copies : undefined;
    },
    { what: "every acknowledged message delivered", timeoutMs: 20_000 },
  );
}

/** Sends `total` messages with `workers` MTAs that retry on anything but 250; calls `onAck` after each 250. */
async function load(
  port: number,
  total: number,
  options: { workers?: number; size?: number; onAck?: (acked: number) => Promise<void> | void },
) {
  const acknowledged = new Set<string>();
  let attempts = 0;
  let failures = 0;
  let next = 0;
  const worker = async () => {
    while (next < total) {
      const tag = `fault-${SEED}-${next++}`;
      const raw = taggedMessage(tag, options.size ?? 60_000);
      for (let attempt = 0; attempt < 30; attempt++) {
        attempts++;
        const transport = nodemailer.createTransport({
          host: "127.0.0.1",
          port,
          ignoreTLS: true,
          connectionTimeout: 5000,
          socketTimeout: 10_000,
        });
        try {
          const info = await transport.sendMail({
            envelope: { from: "load@example.net", to: ["alice@home.test"] },
            raw,
          });
          if (/^250 /.test(info.response)) {
            acknowledged.add(tag);
            await options.onAck?.(acknowledged.size);
            break;
          }
        } catch {
          failures++;
          await new Promise((resolve) => setTimeout(resolve, 50 + attempt * 50)); // an MTA's retry delay
        } finally {
          transport.close();
        }
      }
    }
  };
  await Promise.all(Array.from({ length: options.workers ?? 4 }, worker));
  return { acknowledged, attempts, failures };
}

/** A TCP relay between home and the edge's tunnel port that the test can cut and restore. */
async function cuttableProxy(targetPort: number) {
  const pairs = new Set<net.Socket>();
  let down = false;
  let cuts = 0;
  const server = net.createServer((socket) => {
    if (down) {
      socket.destroy();
      return;
    }
    const upstream = net.connect({ host: "127.0.0.1", port: targetPort });
    for (const s of [socket, upstream]) {
      pairs.add(s);
      s.on("error", () => {});
      s.once("close", () => pairs.delete(s));
    }
    socket.pipe(upstream).pipe(socket);
    socket.once("close", () => upstream.destroy());
    upstream.once("close", () => socket.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `ws://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    cut() {
      cuts++;
      down = true;
      for (const s of pairs) s.destroy();
    },
    restore() {
      down = false;
    },
    cuts: () => cuts,
    stop: () =>
      new Promise<void>((resolve) => {
        for (const s of pairs) s.destroy();
        server.close(() => resolve());
      }),
  };
}

async function spoolLabWithHome(edge: TestEdge, url: string, injectPort: number) {
  const recipients = `${edge.dir}/recipients.txt`;
  await fs.writeFile(recipients, "alice@home.test\n");
  const token = await edge.agent.state.issueToken({ ttlMs: 600_000, domains: ["home.test"], url });
  const home = await makeHome(
    token,
    { "postfix.inject": `127.0.0.1:${injectPort}`, "recipients.file": recipients },
    "faulty",
  );
  await waitFor(() => edge.agent.spool.recipients.info(edge.agent.state.homes()[0]!.publicKey), {
    what: "recipient sync",
  });
  return home;
}

function report(name: string, acknowledged: Set<string>, found: Map<string, number>, faults: number) {
  const lost = [...acknowledged].filter((tag) => !found.has(tag));
  const duplicates = [...found.values()].filter((n) => n > 1).length;
  tally.add(name, { tried: acknowledged.size, faults, lost: lost.length, duplicates });
  return { lost, duplicates };
}

describe("faults under load", () => {
  it("tunnel cut and restored mid-stream, seeded: nothing that got a 250 is lost or torn", async () => {
    const random = prng(SEED);
    const box = await startMailbox();
    const edge = await makeEdge({
      overrides: {
        "spool.messagesPerIpPerMinute": 100_000,
        "spool.retryMin": 100,
        "spool.retryMax": 300,
        openTimeout: 1000,
      },
    });
    const proxy = await cuttableProxy(edge.agent.addresses.tunnel.port);
    const home = await spoolLabWithHome(edge, proxy.url, box.port);
    expect(home.agent.status().edges[0]?.connected).toBe(true);
    const total = 40;
    const cutAt = new Set<number>();
    while (cutAt.size < 4) cutAt.add(4 + Math.floor(random() * (total - 8)));
    // Cuts run one after another: an ack due to cut while a cut is still in progress (acks come
    // quickly while the spool answers) queues its cut instead of skipping it.
    let cutting: Promise<void> = Promise.resolve();
    const result = await load(edge.smtpPort, total, {
      onAck: (acked) => {
        if (!cutAt.has(acked)) return;
        // Cut while other workers are mid-DATA; restore once the edge has noticed the tunnel is gone.
        cutting = cutting.then(async () => {
          await waitFor(() => edge.agent.status().homes[0]?.connected, {
            what: "the tunnel back before a cut",
          });
          proxy.cut();
          await waitFor(() => !edge.agent.status().homes[0]?.connected, { what: "the edge to see the cut" });
          proxy.restore();
        });
      },
    });
    await cutting;
    await waitFor(() => edge.agent.status().homes[0]?.connected, {
      what: "the tunnel back",
      timeoutMs: 15_000,
    });
    const found = await deliveredAfterDrain(edge, result.acknowledged, () => box.messages);
    const { lost, duplicates } = report(
      "fault: tunnel cut mid-stream",
      result.acknowledged,
      found,
      proxy.cuts(),
    );
    console.info(
      `tunnel cuts ×${proxy.cuts()} (seed ${SEED}): ${result.acknowledged.size}/${total} acknowledged after ${result.attempts} attempts ` +
        `(${result.failures} failed and retried), ${edge.agent.status().sessions.fallbacks} sessions not live, ` +
        `${lost.length} lost, ${duplicates} duplicates`,
    );
    expect(proxy.cuts()).toBe(4);
    expect(result.acknowledged.size).toBe(total);
    expect(lost).toEqual([]);
    await proxy.stop();
    await box.close();
  }, 120_000);

  it("inject target down and back: sessions fall back to the spool, all delivered once it returns", async () => {
    let box: Mailbox = await startMailbox();
    const port = box.port;
    const received: ReceivedMessage[] = [];
    const edge = await makeEdge({
      overrides: { "spool.messagesPerIpPerMinute": 100_000, "spool.retryMin": 100, "spool.retryMax": 300 },
    });
    await spoolLabWithHome(edge, edge.url, port);
    const total = 24;
    let downAt: number | undefined;
    const first = await load(edge.smtpPort, total, {
      size: 20_000,
      onAck: async (acked) => {
        if (acked !== 8 || downAt !== undefined) return;
        downAt = acked;
        received.push(...box.messages);
        await box.close();
      },
    });
    expect(downAt).toBe(8);
    const fallbacks = edge.agent.status().sessions.fallbacks;
    expect(fallbacks).toBeGreaterThan(0);
    expect(edge.agent.spool.store.size).toBeGreaterThan(0);
    // Postfix is back: the drain delivers what was spooled meanwhile.
    box = await startMailbox({ port });
    const found = await deliveredAfterDrain(edge, first.acknowledged, () => [...received, ...box.messages]);
    const { lost, duplicates } = report("fault: inject target (Postfix) down", first.acknowledged, found, 1);
    console.info(
      `inject target down after 8 acks: ${first.acknowledged.size}/${total} acknowledged, ${fallbacks} sessions spooled, ` +
        `${lost.length} lost, ${duplicates} duplicates`,
    );
    expect(lost).toEqual([]);
    expect(duplicates).toBe(0);
    await box.close();
  }, 90_000);

  it("ENOSPC on a seeded share of spool writes: 451 for those, the rest delivered, nothing lost", async () => {
    const random = prng(SEED + 1);
    let injected = 0;
    const box = await startMailbox();
    const failingOpen = (async (...args: Parameters<typeof fs.open>) => {
      const handle = await fs.open(...args);
      if (random() >= 0.3) return handle;
      injected++;
      const fail = async () => {
        throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
      };
      return new Proxy(handle, {
        get(target, property) {
          if (property === "write" || property === "writev") return fail;
          const value = Reflect.get(target, property) as unknown;
          return typeof value === "function" ? value.bind(target) : value;
        },
      });
    }) as typeof fs.open;
    const edge = await makeEdge({
      overrides: { "spool.messagesPerIpPerMinute": 100_000, "spool.retryMin": 100, "spool.retryMax": 300 },
      spoolOpenFile: failingOpen,
    } as never);
    const home = await spoolLabWithHome(edge, edge.url, box.port);
    await home.stop();
    await waitFor(() => !edge.agent.status().homes[0]?.connected, { what: "home away" });
    const result = await load(edge.smtpPort, 20, { size: 10_000 });
    expect(injected).toBeGreaterThan(0);
    expect(edge.agent.spool.server.counters.writeErrors).toBe(injected);
    const back = await startTestHome(home.dir, {
      "postfix.inject": `127.0.0.1:${box.port}`,
      "recipients.file": `${edge.dir}/recipients.txt`,
    });
    await back.agent.waitConnected(10_000);
    const found = await deliveredAfterDrain(edge, result.acknowledged, () => box.messages);
    const { lost, duplicates } = report(
      "fault: ENOSPC on spool writes",
      result.acknowledged,
      found,
      injected,
    );
    console.info(
      `ENOSPC ×${injected}: ${result.acknowledged.size}/20 acknowledged, ${lost.length} lost, ${duplicates} duplicates`,
    );
    expect(result.acknowledged.size).toBe(20);
    expect(lost).toEqual([]);
    expect(await fs.readdir(`${edge.dir}/spool/tmp`)).toEqual([]);
    await box.close();
  }, 90_000);
});
