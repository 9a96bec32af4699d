// Issue 4's crash tests: kill -9 of the edge while 200 sessions are being spooled, and of home
// while the spool drains. Afterwards every message that got a 250 is delivered, whole, and the
// only extra copies are the ones SMTP itself cannot avoid (committed, then the 250 was lost).
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import nodemailer from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cleanupAgents, makeEdge, pairedHomeDir, startTestHome, tempDir } from "../helpers/agents.js";
import { intactCopies, prng, taggedMessage } from "../helpers/tagged-mail.js";

import { type PostfixLab, startPostfix } from "./lab/postfix.js";
import { requireTools } from "./lab/require-tools.js";
import { waitFor, waitForPort } from "./lab/wait.js";

const ready = requireTools(["postfix", "postconf"], "spool crash suite");
const root = fileURLToPath(new URL("../..", import.meta.url));
const EDGE = join(root, "packages/edge/dist/cli.js");
const HOME = join(root, "packages/home/dist/cli.js");

/** tag → number of intact copies in the Maildir; throws on a torn copy. */
async function deliveredCopies(postfix: PostfixLab, user: string): Promise<Map<string, number>> {
  return intactCopies(await postfix.messages(user), "crash-");
}

function spawnAgent(bin: string, dir: string, children: Set<ChildProcess>): ChildProcess {
  const child = spawn(process.execPath, [bin, "run", "--dir", dir], { stdio: ["ignore", "ignore", "pipe"] });
  if (process.env.MXTUNNEL_TEST_LOG) child.stderr?.pipe(process.stderr);
  else child.stderr?.resume();
  children.add(child);
  return child;
}

async function kill9(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, "exit");
  child.kill("SIGKILL");
  await exited;
}

describe.skipIf(!ready)("crashes while spooling and draining", () => {
  let postfix: PostfixLab;
  const children = new Set<ChildProcess>();

  beforeAll(async () => {
    postfix = await startPostfix({ users: ["carol", "dave"] });
  }, 120_000);

  afterAll(async () => {
    for (const child of children) await kill9(child);
    await cleanupAgents();
    await postfix?.stop();
  });

  it("kill -9 of the edge at seeded moments during 200 spooled sessions loses nothing that got a 250", async () => {
    const seed = Number(process.env.MXTUNNEL_CRASH_SEED ?? 20261128);
    const random = prng(seed);
    const recipients = join(await tempDir("rcpt"), "list");
    await writeFile(recipients, `carol@${postfix.domain}\n`);
    // The edge's directory and pairing are made in-process; the runs that get killed are binaries.
    const edge = await makeEdge({
      overrides: {
        "spool.messagesPerIpPerMinute": 100_000,
        "spool.retryMin": 100,
        "limits.maxConnectionsPerIp": 100,
      },
    });
    const token = await edge.token();
    const { dir: homeDir } = await pairedHomeDir(token, "crash-home");
    const homeOverrides = {
      "postfix.inject": `127.0.0.1:${postfix.injectPort}`,
      "recipients.file": recipients,
    };
    let home = await startTestHome(homeDir, homeOverrides);
    await waitFor(() => edge.agent.status().homes[0]?.recipients ?? false, { what: "recipient sync" });
    await home.stop();
    const config = JSON.parse(await readFile(join(edge.dir, "edge.json"), "utf8")) as Record<string, unknown>;
    await writeFile(
      join(edge.dir, "edge.json"),
      JSON.stringify({
        ...config,
        stableAfter: 0,
        logLevel: "warn",
        spool: { messagesPerIpPerMinute: 100_000, retryMin: 100 },
        limits: { maxConnectionsPerIp: 100 },
      }),
    );
    await edge.stop();

    const total = 200;
    const killAfter = new Set<number>();
    while (killAfter.size < 4) killAfter.add(10 + Math.floor(random() * (total - 20)));
    let binary = spawnAgent(EDGE, edge.dir, children);
    await waitForPort("127.0.0.1", edge.smtpPort);

    const acknowledged = new Set<string>();
    const attempted: string[] = [];
    let finished = 0;
    let restarting: Promise<void> | undefined;
    const send = async (i: number) => {
      const tag = `crash-${seed}-${i}`;
      attempted.push(tag);
      const raw = taggedMessage(tag, 3000);
      const transport = nodemailer.createTransport({
        host: "127.0.0.1",
        port: edge.smtpPort,
        ignoreTLS: true,
        connectionTimeout: 5000,
      });
      try {
        const info = await transport.sendMail({
          envelope: { from: "load@example.net", to: [`carol@${postfix.domain}`] },
          raw,
        });
        if (/^250 /.test(info.response)) acknowledged.add(tag);
      } catch {
        // No 250: the sender still has it (a real MTA would retry later).
      } finally {
        transport.close();
      }
      finished++;
      if (killAfter.has(finished) && !restarting) {
        restarting = (async () => {
          await kill9(binary);
          binary = spawnAgent(EDGE, edge.dir, children);
          await waitForPort("127.0.0.1", edge.smtpPort);
          restarting = undefined;
        })();
      }
    };
    let next = 0;
    const workers = Array.from({ length: 8 }, async () => {
      while (next < total) {
        if (restarting) await restarting;
        await send(next++);
      }
    });
    await Promise.all(workers);
    if (restarting) await restarting;
    expect(acknowledged.size).toBeGreaterThan(total / 2);

    // Home comes back; the restarted edge drains everything it acknowledged.
    home = await startTestHome(homeDir, homeOverrides);
    const copies = await waitFor(
      async () => {
        const found = await deliveredCopies(postfix, "carol");
        return [...acknowledged].every((tag) => found.has(tag)) ? found : undefined;
      },
      { what: "every acknowledged message in carol's Maildir", timeoutMs: 90_000, intervalMs: 250 },
    );
    const lost = [...acknowledged].filter((tag) => !copies.has(tag));
    const duplicates = [...copies.values()].filter((n) => n > 1).length;
    const extras = [...copies.keys()].filter((tag) => !acknowledged.has(tag)).length;
    console.info(
      `edge kill -9 ×${killAfter.size} (seed ${seed}) during ${total} sessions: ${acknowledged.size} acknowledged, ` +
        `${lost.length} lost, ${duplicates} delivered twice, ${extras} delivered without their 250 (committed, then the crash)`,
    );
    expect(lost).toEqual([]);
    expect(duplicates).toBe(0);
    await kill9(binary);
  }, 240_000);

  // Injection is at-least-once, as SMTP is (RFC 5321 §6.1): home records a message in its injected
  // log after Postfix's 250, so a kill between that 250 and the record's fsync sends the message again
  // when home is back. Each kill can duplicate at most the one message in flight (drainConcurrency 1);
  // more than that, or a third copy, would mean the log is not consulted.
  it("kill -9 of home during the drain: nothing lost; at most the message in flight at a kill twice", async () => {
    const recipients = join(await tempDir("rcpt"), "list");
    await writeFile(recipients, `dave@${postfix.domain}\n`);
    const edge = await makeEdge({
      overrides: { "spool.retryMin": 100, "spool.retryMax": 300, "spool.drainConcurrency": 1 },
    });
    const { dir: homeDir } = await pairedHomeDir(await edge.token(), "drain-home");
    const configPath = join(homeDir, "home.json");
    const homeConfig = JSON.parse(await readFile(configPath, "utf8")) as Record<string, unknown>;
    await writeFile(
      configPath,
      JSON.stringify({
        ...homeConfig,
        postfix: { inject: `127.0.0.1:${postfix.injectPort}` },
        recipients: { file: recipients },
        allowPrivateClientIPs: true,
        reconnect: { minDelay: 50, maxDelay: 200 },
        logLevel: process.env.MXTUNNEL_TEST_LOG ?? "warn",
      }),
    );
    let home = spawnAgent(HOME, homeDir, children);
    await waitFor(() => edge.agent.status().homes[0]?.recipients ?? false, { what: "recipient sync" });
    await kill9(home);
    await waitFor(() => !edge.agent.status().homes[0]!.connected, { what: "edge sees home gone" });

    const tags: string[] = [];
    for (let i = 0; i < 12; i++) {
      const tag = `crash-drain-${i}`;
      tags.push(tag);
      const transport = nodemailer.createTransport({
        host: "127.0.0.1",
        port: edge.smtpPort,
        ignoreTLS: true,
      });
      const info = await transport.sendMail({
        envelope: { from: "x@example.net", to: [`dave@${postfix.domain}`] },
        raw: taggedMessage(tag, 3000),
      });
      transport.close();
      expect(info.response).toMatch(/^250 /);
    }
    expect(edge.agent.spool.store.size).toBe(12);

    // Kill home each time the edge has just retired a message: the next one is then mid-transfer.
    const kills = [10, 6, 3];
    for (const left of kills) {
      home = spawnAgent(HOME, homeDir, children);
      await waitFor(() => edge.agent.spool.store.size <= left, {
        what: `spool down to ${left}`,
        timeoutMs: 30_000,
        intervalMs: 5,
      }).catch(async (error: unknown) => {
        console.error((await postfix.log()).split("\n").slice(-40).join("\n"));
        throw error;
      });
      await kill9(home);
    }
    home = spawnAgent(HOME, homeDir, children);
    await waitFor(() => edge.agent.spool.store.size === 0, { what: "spool drained", timeoutMs: 60_000 });
    const copies = await waitFor(
      async () => {
        const found = await deliveredCopies(postfix, "dave");
        return tags.every((tag) => found.has(tag)) ? found : undefined;
      },
      { what: "all 12 in dave's Maildir", timeoutMs: 30_000 },
    );
    const twice = tags.filter((tag) => copies.get(tag) === 2);
    console.info(
      `home kill -9 ×${kills.length} during the drain: 12 delivered, ${twice.length} twice` +
        (twice.length
          ? ` (${twice.join(", ")}: killed after Postfix's 250, before the injected log's record)`
          : ""),
    );
    expect(tags.filter((tag) => !copies.has(tag))).toEqual([]);
    expect(tags.filter((tag) => (copies.get(tag) ?? 0) > 2)).toEqual([]);
    expect(twice.length).toBeLessThanOrEqual(kills.length);
    await kill9(home);
  }, 180_000);
});
