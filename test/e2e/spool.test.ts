// Issue 4 end to end: the edge as backup MX while home is away, a real Postfix at home.
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import * as fs from "node:fs/promises";
import { readdir, readFile, writeFile } from "node:fs/promises";
import net from "node:net";
import { join } from "node:path";
import tls from "node:tls";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import {
  cleanupAgents,
  makeEdge,
  makeHome,
  startTestHome,
  type TestEdge,
  type TestHome,
  tempDir,
} from "../helpers/agents.js";
import { type SmtpClient, smtpOver } from "../helpers/smtp-client.js";
import { swaksTo } from "../helpers/swaks.js";
import { type PostfixLab, startPostfix } from "./lab/postfix.js";
import { requireTools } from "./lab/require-tools.js";
import { waitFor } from "./lab/wait.js";

const exec = promisify(execFile);
const root = fileURLToPath(new URL("../..", import.meta.url));
const ready = requireTools(["postfix", "postconf", "swaks"], "spool e2e suite");

/** Every file under a folder, as bytes (to prove nothing readable is at rest). */
async function allFiles(dir: string): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    // A temporary file may be renamed between readdir and readFile (atomic writes in progress).
    const bytes = await readFile(join(entry.parentPath, entry.name)).catch((error: NodeJS.ErrnoException) => {
      if (error.code === "ENOENT") return undefined;
      throw error;
    });
    if (bytes) out.push(bytes);
  }
  return out;
}

async function connect(port: number): Promise<{ socket: net.Socket; client: SmtpClient }> {
  const socket = net.connect({ host: "127.0.0.1", port, localAddress: "127.0.0.2" });
  const client = smtpOver(socket);
  const banner = await client.reply();
  expect(banner).toMatch(/^220 .*backup MX/);
  return { socket, client };
}

describe.skipIf(!ready)("backup MX: spooling while home is away", () => {
  let postfix: PostfixLab;
  let edge: TestEdge;
  let home: TestHome;
  let homeDir: string;
  let recipientsFile: string;

  const homeOverrides = () => ({
    "postfix.inject": `127.0.0.1:${postfix.injectPort}`,
    "postfix.messageSizeLimit": 200_000,
    "recipients.file": recipientsFile,
  });

  beforeAll(async () => {
    postfix = await startPostfix();
    recipientsFile = join(await tempDir("rcpt"), "recipients");
    await writeFile(recipientsFile, `alice@${postfix.domain}\nbob@${postfix.domain}\n`);
    edge = await makeEdge({ overrides: { "spool.retryMin": 100, "spool.retryMax": 500 } });
    home = await makeHome(await edge.token(), homeOverrides(), "spool-home");
    homeDir = home.dir;
    await waitFor(() => edge.agent.spool.recipients.info(edge.agent.state.homes()[0]!.publicKey), {
      what: "recipient sync",
    });
    await home.stop();
    await waitFor(() => !edge.agent.status().homes[0]!.connected, { what: "edge sees home gone" });
  }, 120_000);

  afterAll(async () => {
    await cleanupAgents();
    await postfix?.stop();
  });

  afterEach(async () => {
    // Each test starts with home away and an empty spool.
    await home.stop();
  });

  it("answers 250 with home away, holds nothing readable, and delivers once with the client's IP when home is back", async () => {
    const tag = `spool-${randomBytes(6).toString("hex")}`;
    const body = `body-${randomBytes(6).toString("hex")}`;
    const result = await swaksTo(edge.smtpPort, `alice@${postfix.domain}`, [
      "--local-interface",
      "127.0.0.2",
      "--ehlo",
      "far.example.net",
      "--from",
      "sender@example.net",
      "--header",
      `Subject: ${tag}`,
      "--body",
      body,
    ]);
    expect(result.code, result.output).toBe(0);
    expect(result.output).toMatch(/<-\s+250 2\.0\.0 Ok: queued as .* \(backup MX\)/);
    expect(edge.agent.spool.store.size).toBe(1);
    for (const file of await allFiles(edge.dir)) {
      expect(file.includes(tag)).toBe(false);
      expect(file.includes(body)).toBe(false);
    }
    home = await startTestHome(homeDir, homeOverrides());
    await waitFor(() => edge.agent.spool.store.size === 0, { what: "spool drained", timeoutMs: 20_000 });
    // Postfix's 250 means queued; local delivery to the Maildir follows.
    await waitFor(async () => (await postfix.messages("alice")).some((m) => m.includes(tag)), {
      what: "delivery",
      timeoutMs: 20_000,
    });
    const delivered = (await postfix.messages("alice")).filter((m) => m.includes(tag));
    expect(delivered).toHaveLength(1);
    expect(home.agent.injector.counters).toMatchObject({ delivered: 1, duplicates: 0 });
    expect(delivered[0]).toContain(body);
    expect(delivered[0]).toMatch(/Received: from far\.example\.net \(unknown \[127\.0\.0\.2\]\)/);
  });

  it("refuses unknown recipients (550), foreign domains (550 5.7.1) and oversize mail (552)", async () => {
    const unknown = await swaksTo(edge.smtpPort, `nobody@${postfix.domain}`, ["--quit-after", "RCPT"]);
    expect(unknown.output).toMatch(/<\*\* +550 5\.1\.1/);
    const extension = await swaksTo(edge.smtpPort, `alice+lists@${postfix.domain}`, ["--quit-after", "RCPT"]);
    expect(extension.output).toMatch(/<- +250/);
    const postmaster = await swaksTo(edge.smtpPort, `postmaster@${postfix.domain}`, ["--quit-after", "RCPT"]);
    expect(postmaster.output).toMatch(/<- +250/);
    for (const trick of [
      "victim@elsewhere.example",
      `"alice@${postfix.domain}"@elsewhere.example`,
      `alice%elsewhere.example@${postfix.domain}`,
      "alice@[127.0.0.1]",
    ]) {
      const relay = await swaksTo(edge.smtpPort, trick, ["--quit-after", "RCPT"]);
      expect(relay.output, trick).toMatch(/<\*\* +5\d\d /);
    }
    const bodyFile = join(await tempDir("big"), "body.txt");
    await writeFile(bodyFile, `${"x".repeat(998)}\r\n`.repeat(300));
    const big = await swaksTo(edge.smtpPort, `alice@${postfix.domain}`, ["--body", `@${bodyFile}`]);
    expect(big.output).toMatch(/<\*\* +552 /);
    expect(edge.agent.spool.store.size).toBe(0);
  });

  it("never turns a smuggled end-of-data into a second message, and never answers 250 for it", async () => {
    const endings = ["\n.\n", "\r.\r", "\n.\r\n", "\r.\r\n", "\r\n.\n", "\r\n\0.\r\n", "\n.\r", ".\n"];
    for (const ending of endings) {
      const before = edge.agent.spool.store.size;
      const { socket, client } = await connect(edge.smtpPort);
      expect(await client.command("EHLO smuggler.example")).toMatch(/^250 /m);
      expect(await client.command("MAIL FROM:<a@example.net>")).toMatch(/^250/);
      expect(await client.command(`RCPT TO:<alice@${postfix.domain}>`)).toMatch(/^250/);
      expect(await client.command("DATA")).toMatch(/^354/);
      const final = client.reply();
      client.send(
        `Subject: outer\r\n\r\nfirst${ending}MAIL FROM:<evil@example.net>\r\nRCPT TO:<bob@${postfix.domain}>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n`,
      );
      const answer = await final;
      expect(answer, JSON.stringify(ending)).toMatch(/^550 5\.6\.0/);
      // Whatever follows must be treated as one session continuing, not a second queued message.
      const quit = await client.command("QUIT");
      expect(quit).toMatch(/^221/);
      socket.destroy();
      expect(edge.agent.spool.store.size, JSON.stringify(ending)).toBe(before);
    }
  });

  it("discards commands pipelined with STARTTLS and all state from before it", async () => {
    const { socket, client } = await connect(edge.smtpPort);
    expect(await client.command("EHLO tls.example")).toMatch(/STARTTLS/);
    expect(await client.command(`MAIL FROM:<before@example.net>`)).toMatch(/^250/);
    const ready = client.reply();
    socket.write("STARTTLS\r\nRCPT TO:<alice@home.test>\r\n");
    expect(await ready).toMatch(/^220/);
    socket.removeAllListeners("data");
    const secure = tls.connect({ socket, rejectUnauthorized: false });
    await once(secure, "secureConnect");
    const inner = smtpOver(secure);
    // The pipelined RCPT must not have been executed, and MAIL FROM from before TLS is gone.
    expect(await inner.command("RCPT TO:<alice@home.test>")).toMatch(/^503 /);
    expect(await inner.command("EHLO tls.example")).toMatch(/^250/);
    expect(await inner.command(`RCPT TO:<alice@${postfix.domain}>`)).toMatch(/^503 /);
    secure.destroy();
  });

  it("answers 451, never 250, when the spool cannot be written (ENOSPC)", async () => {
    const full = await makeEdge({
      overrides: { "spool.retryMin": 100 },
      spoolOpenFile: (async (...args: Parameters<typeof fs.open>) => {
        const handle = await fs.open(...args);
        const fail = async () => {
          throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
        };
        return new Proxy(handle, {
          get(target, property) {
            if (
              property === "write" ||
              property === "writev" ||
              property === "writeFile" ||
              property === "appendFile"
            )
              return fail;
            const value = Reflect.get(target, property) as unknown;
            return typeof value === "function" ? value.bind(target) : value;
          },
        });
      }) as typeof fs.open,
    });
    const token = await full.token();
    const fullHome = await makeHome(token, homeOverrides(), "full-home");
    await waitFor(() => full.agent.spool.recipients.info(full.agent.state.homes()[0]!.publicKey), {
      what: "sync",
    });
    await fullHome.stop();
    await waitFor(() => !full.agent.status().homes[0]!.connected, { what: "home gone" });
    const result = await swaksTo(full.smtpPort, `alice@${postfix.domain}`);
    expect(result.output).toMatch(/<\*\* +451 4\.3\.0/);
    expect(full.agent.spool.store.size).toBe(0);
    expect(await readdir(join(full.dir, "spool", "tmp"))).toEqual([]);
  });

  it("lists the spool with `queue` (never content), and flushes and deletes by id", async () => {
    const tag = `queue-${randomBytes(6).toString("hex")}`;
    const sent = await swaksTo(edge.smtpPort, `bob@${postfix.domain}`, ["--header", `Subject: ${tag}`]);
    expect(sent.code, sent.output).toBe(0);
    const cli = (args: string[]) =>
      exec(process.execPath, [join(root, "packages/edge/dist/cli.js"), ...args, "--dir", edge.dir]);
    const listed = JSON.parse((await cli(["queue", "--json"])).stdout) as {
      spool: { id: string; recipients: number; tries: number }[];
    };
    expect(listed.spool).toHaveLength(1);
    expect(listed.spool[0]).toMatchObject({ recipients: 1, tries: 0 });
    const human = (await cli(["queue"])).stdout;
    expect(human).toContain(listed.spool[0]!.id);
    expect(human).not.toContain(tag);
    expect(human).not.toContain("bob@");
    expect((await cli(["queue", "flush"])).stdout).toMatch(/flushed/);
    const missing = await cli(["queue", "delete", "no-such-id"]).catch(
      (error: { code: number; stderr: string }) => error,
    );
    expect(missing).toMatchObject({ code: 1 });
    expect((missing as { stderr: string }).stderr).toMatch(/no queued message has id no-such-id/);
    expect((await cli(["queue", "delete", listed.spool[0]!.id])).stdout).toMatch(/deleted/);
    expect(edge.agent.spool.store.size).toBe(0);
  });

  it("quarantines a spool file with a flipped byte at start and never delivers it", async () => {
    const tag = `flip-${randomBytes(6).toString("hex")}`;
    const result = await swaksTo(edge.smtpPort, `bob@${postfix.domain}`, ["--header", `Subject: ${tag}`]);
    expect(result.code, result.output).toBe(0);
    const [entry] = edge.agent.spool.store.list();
    expect(entry).toBeDefined();
    await edge.stop();
    const bytes = await readFile(entry!.path);
    bytes[bytes.length - 100] = bytes[bytes.length - 100]! ^ 0x01;
    await writeFile(entry!.path, bytes);
    await edge.restart();
    expect(edge.agent.spool.store.size).toBe(0);
    expect(await readdir(join(edge.dir, "spool", "quarantine"))).toContain(`${entry!.id}.spool`);
    home = await startTestHome(homeDir, homeOverrides());
    await home.agent.waitConnected(10_000);
    await [...home.agent.links.values()][0]!.currentMux!.ping();
    expect((await postfix.messages("bob")).some((m) => m.includes(tag))).toBe(false);
  });
});

describe.skipIf(!ready)("backup MX before the first recipient sync", () => {
  let postfix: PostfixLab;

  beforeAll(async () => {
    postfix = await startPostfix();
  }, 120_000);

  afterAll(async () => {
    await cleanupAgents();
    await postfix?.stop();
  });

  it("answers 450 to every recipient until home has synced its list", async () => {
    const edge = await makeEdge();
    const home = await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${postfix.injectPort}` });
    await home.stop();
    await waitFor(() => !edge.agent.status().homes[0]!.connected, { what: "home gone" });
    const result = await swaksTo(edge.smtpPort, `alice@${postfix.domain}`, ["--quit-after", "RCPT"]);
    expect(result.output).toMatch(/<\*\* +450 4\.3\.2 .*not synced/);
  });
});
