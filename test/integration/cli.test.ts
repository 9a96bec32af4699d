// The real binaries on loopback, as an operator would run them.
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { freePort } from "../e2e/lab/ports.js";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents, tempDir } from "../helpers/agents.js";

const root = fileURLToPath(new URL("../..", import.meta.url));
const EDGE = join(root, "packages/edge/dist/cli.js");
const HOME = join(root, "packages/home/dist/cli.js");
const children = new Set<ChildProcess>();

afterEach(async () => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
  children.clear();
  await cleanupAgents();
});

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(bin: string, args: string[], input?: string): Promise<Result> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], { stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d));
    child.stderr.on("data", (d: Buffer) => (stderr += d));
    child.on("close", (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input ?? "");
  });
}

function start(bin: string, args: string[]): ChildProcess {
  const child = spawn(process.execPath, [bin, ...args], { stdio: ["ignore", "pipe", "pipe"] });
  child.stdout?.resume();
  child.stderr?.resume();
  children.add(child);
  return child;
}

async function statusJson(bin: string, dir: string): Promise<Record<string, unknown>> {
  const result = await run(bin, ["status", "--dir", dir, "--json"]);
  if (result.code !== 0) throw new Error(result.stderr);
  return JSON.parse(result.stdout) as Record<string, unknown>;
}

async function setUp() {
  const edgeDir = join(await tempDir("cli-edge"), "state");
  const homeDir = join(await tempDir("cli-home"), "state");
  const tunnelPort = await freePort();
  const smtpPort = await freePort();
  const init = await run(EDGE, [
    "init",
    "--dir",
    edgeDir,
    "--hostname",
    "mx.cli.test",
    "--domain",
    "cli.test",
    "--domain",
    "other.test",
    "--smtp-listen",
    `127.0.0.1:${smtpPort}`,
    "--tunnel-listen",
    `127.0.0.1:${tunnelPort}`,
    "--public-url",
    `ws://127.0.0.1:${tunnelPort}`,
  ]);
  expect(init.code, init.stderr).toBe(0);
  return { edgeDir, homeDir, tunnelPort, smtpPort };
}

async function fastHome(homeDir: string) {
  const path = join(homeDir, "home.json");
  const config = JSON.parse(await readFile(path, "utf8")) as Record<string, unknown>;
  config.reconnect = { minDelay: "50ms", maxDelay: "300ms" };
  await writeFile(path, JSON.stringify(config));
}

describe("mxtunnel-edge and mxtunnel-home binaries", () => {
  it("init, pair over stdin, run, status; kill -9 of the edge and home reconnects; SIGTERM stops within 2 s", async () => {
    const { edgeDir, homeDir } = await setUp();
    expect((await stat(edgeDir)).mode & 0o777).toBe(0o700);
    expect((await stat(join(edgeDir, "edge.key"))).mode & 0o777).toBe(0o600);

    let edge = start(EDGE, ["run", "--dir", edgeDir]);
    await waitFor(() => stat(join(edgeDir, "admin.sock")).then(() => true), { what: "edge admin socket" });
    const pair = await run(EDGE, ["pair", "--dir", edgeDir, "--ttl", "10m", "--domain", "cli.test"]);
    expect(pair.code, pair.stderr).toBe(0);
    const lines = pair.stdout.trim().split("\n");
    const token = lines[lines.length - 1]!;
    expect(token).toMatch(/^mxt1_[A-Za-z0-9_-]+$/);
    expect(pair.stderr).not.toContain(token);

    const enrol = await run(HOME, ["pair", "-", "--dir", homeDir, "--name", "cli-home"], `${token}\n`);
    expect(enrol.code, enrol.stderr).toBe(0);
    expect(enrol.stdout).toContain("paired with mx.cli.test");
    expect((await stat(join(homeDir, "home.key"))).mode & 0o777).toBe(0o600);
    await fastHome(homeDir);
    // Tokens are never logged or stored: only a derived PSK is.
    expect(await readFile(join(edgeDir, "tokens.json"), "utf8")).not.toContain(token.slice(5, 40));

    const home = start(HOME, ["run", "--dir", homeDir]);
    await waitFor(
      async () =>
        ((await statusJson(EDGE, edgeDir)).homes as { connected: boolean }[])[0]?.connected === true,
      {
        what: "edge status connected",
        timeoutMs: 15_000,
      },
    );
    const homeStatus = await statusJson(HOME, homeDir);
    expect(homeStatus.edges).toMatchObject([
      { hostname: "mx.cli.test", connected: true, domains: ["cli.test"] },
    ]);

    edge.kill("SIGKILL");
    await once(edge, "exit");
    await waitFor(
      async () =>
        ((await statusJson(HOME, homeDir)).edges as { connected: boolean }[])[0]?.connected === false,
      {
        what: "home notices the edge is gone",
      },
    );
    edge = start(EDGE, ["run", "--dir", edgeDir]);
    await waitFor(
      async () =>
        ((await statusJson(HOME, homeDir)).edges as { connected: boolean }[])[0]?.connected === true,
      {
        what: "home reconnects by itself",
        timeoutMs: 15_000,
      },
    );

    for (const child of [edge, home]) {
      const started = Date.now();
      child.kill("SIGTERM");
      const [code] = (await once(child, "exit")) as [number | null];
      expect(code).toBe(0);
      expect(Date.now() - started).toBeLessThan(2000);
    }
    // Stopped: status still answers from the files, with connected false.
    const offline = await statusJson(EDGE, edgeDir);
    expect(offline.running).toBe(false);
    expect(offline.homes).toMatchObject([{ name: "cli-home", connected: false }]);
  });

  it("bad input: a clear error, a non-zero exit, no stack trace, nothing changed", async () => {
    const { edgeDir, homeDir } = await setUp();
    const again = await run(EDGE, ["init", "--dir", edgeDir, "--hostname", "x.test", "--domain", "x.test"]);
    expect(again.code).not.toBe(0);
    expect(again.stderr).toMatch(/already exists/);
    expect(again.stderr).not.toMatch(/\n\s+at /);
    expect(await readFile(join(edgeDir, "edge.json"), "utf8")).toContain("mx.cli.test");

    const badToken = await run(HOME, ["pair", "-", "--dir", homeDir], "mxt1_AAAAsomethingbroken\n");
    expect(badToken.code).toBe(1);
    expect(badToken.stderr).toMatch(/mxtunnel-home: .*(token|checksum)/i);
    expect(badToken.stderr).not.toMatch(/\n\s+at /);

    const wrongDomain = await run(EDGE, ["pair", "--dir", edgeDir, "--domain", "nope.test"]);
    expect(wrongDomain.code).toBe(1);
    expect(wrongDomain.stderr).toContain("nope.test");
    expect(JSON.parse(await readFile(join(edgeDir, "tokens.json"), "utf8")).tokens).toHaveLength(0);

    const badTtl = await run(EDGE, ["pair", "--dir", edgeDir, "--ttl", "soon"]);
    expect(badTtl.code).not.toBe(0);
    expect(badTtl.stderr).toMatch(/ttl/i);

    const config = JSON.parse(await readFile(join(edgeDir, "edge.json"), "utf8")) as Record<string, unknown>;
    await writeFile(
      join(edgeDir, "edge.json"),
      JSON.stringify({ ...config, smtpListen: "nowhere", colour: "blue", openTimeout: -1 }),
    );
    const check = await run(EDGE, ["run", "--check", "--dir", edgeDir]);
    expect(check.code).toBe(2);
    expect(check.stderr).toMatch(/smtpListen/);
    expect(check.stderr).toMatch(/colour/);
    expect(check.stderr).toMatch(/openTimeout/);
    expect(check.stderr).not.toMatch(/\n\s+at /);

    const missing = await run(EDGE, ["status", "--dir", join(edgeDir, "nope")]);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toMatch(/mxtunnel-edge: /);

    const help = await run(EDGE, ["--help"]);
    expect(help.code).toBe(0);
    for (const command of ["init", "pair", "unpair", "run", "status"]) expect(help.stdout).toContain(command);
  });
});
