// Test harness: real edge and home agents in temporary folders on loopback ports, in-process.
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  type EdgeAgent,
  type EdgeAgentOptions,
  initEdge,
  issuePairingToken,
  loadEdgeConfigFrom,
  startEdge,
} from "@mxtunnel/edge";
import {
  ensureHomeConfig,
  type HomeAgent,
  HomeState,
  loadHomeConfigFrom,
  pairWithEdge,
  startHome,
} from "@mxtunnel/home";
import { createLogger, type EdgeConfig, type Logger } from "@mxtunnel/shared";
import { freePort } from "../e2e/lab/ports.js";

export const testLogger: Logger = createLogger({
  name: "test",
  level: process.env.MXTUNNEL_TEST_LOG ?? "silent",
});

const cleanups: (() => Promise<void>)[] = [];

/** Stops every agent and removes every folder made since the last call (use in afterEach). */
export async function cleanupAgents(): Promise<void> {
  while (cleanups.length) await cleanups.pop()!().catch(() => {});
}

/** Runs `step` at the next cleanupAgents, after what is made later (a lab server the agents use). */
export function cleanupLater(step: () => Promise<void>): void {
  cleanups.push(step);
}

export async function tempDir(prefix: string): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), `mxt-${prefix}-`));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

export interface TestEdge {
  dir: string;
  config: EdgeConfig;
  agent: EdgeAgent;
  smtpPort: number;
  url: string;
  token(options?: { ttlMs?: number; domains?: string[] }): Promise<string>;
  restart(): Promise<void>;
  stop(): Promise<void>;
}

export async function makeEdge(
  options: {
    domains?: string[];
    overrides?: Record<string, unknown>;
    /** Fault injection: replaces fs/promises open for spool files (see EdgeAgentOptions). */
    spoolOpenFile?: EdgeAgentOptions["spoolOpenFile"];
  } = {},
): Promise<TestEdge> {
  const dir = await tempDir("edge");
  const smtpPort = await freePort();
  const tunnelPort = await freePort();
  const url = `ws://127.0.0.1:${tunnelPort}`;
  await initEdge({
    dir,
    hostname: "mx.edge.test",
    domains: options.domains ?? ["home.test"],
    smtpListen: `127.0.0.1:${smtpPort}`,
    tunnelListen: `127.0.0.1:${tunnelPort}`,
    publicUrl: url,
  });
  const config = await loadEdgeConfigFrom(dir, { stableAfter: 0, ...options.overrides });
  const extra = options.spoolOpenFile ? { spoolOpenFile: options.spoolOpenFile } : {};
  let agent = await startEdge({ dir, config, logger: testLogger.child({ agent: "edge" }), ...extra });
  let running = true;
  const edge: TestEdge = {
    dir,
    config,
    get agent() {
      return agent;
    },
    smtpPort,
    url,
    token: async (opts = {}) =>
      (await issuePairingToken(agent.state, config, { ttlMs: opts.ttlMs ?? 600_000, domains: opts.domains }))
        .token,
    restart: async () => {
      if (running) await agent.stop();
      agent = await startEdge({ dir, config, logger: testLogger.child({ agent: "edge" }), ...extra });
      running = true;
    },
    stop: async () => {
      if (running) await agent.stop();
      running = false;
    },
  };
  cleanups.push(() => edge.stop());
  return edge;
}

export interface TestHome {
  dir: string;
  state: HomeState;
  agent: HomeAgent;
  stop(): Promise<void>;
}

/** A home directory with keys, paired with the token's edge (not running yet). */
export async function pairedHomeDir(
  token: string,
  name = "home",
): Promise<{ dir: string; state: HomeState }> {
  const dir = await tempDir("home");
  const state = await HomeState.open(dir, { create: true });
  await ensureHomeConfig(dir);
  await pairWithEdge({ token, state, name });
  return { dir, state };
}

export async function startTestHome(
  dir: string,
  overrides: Record<string, unknown> = {},
  mux?: { pingIntervalMs?: number; idleTimeoutMs?: number },
): Promise<TestHome> {
  const config = await loadHomeConfigFrom(dir, {
    // Each test home gets its own relay port: the default 2525 would be shared by parallel tests.
    relayListen: `127.0.0.1:${await freePort()}`,
    allowPrivateClientIPs: true,
    "reconnect.minDelay": 50,
    "reconnect.maxDelay": 200,
    ...overrides,
  });
  const agent = await startHome({
    dir,
    config,
    logger: testLogger.child({ agent: "home" }),
    ...(mux ? { mux } : {}),
  });
  let running = true;
  const home: TestHome = {
    dir,
    state: agent.state,
    agent,
    stop: async () => {
      if (running) await agent.stop();
      running = false;
    },
  };
  cleanups.push(() => home.stop());
  return home;
}

export async function makeHome(
  token: string,
  overrides: Record<string, unknown> = {},
  name = "home",
): Promise<TestHome> {
  const { dir } = await pairedHomeDir(token, name);
  const home = await startTestHome(dir, overrides);
  await home.agent.waitConnected(10_000);
  // The edge registers a tunnel when our first transport message arrives; a PONG proves it has.
  for (const link of home.agent.links.values()) await link.currentMux?.ping();
  return home;
}
