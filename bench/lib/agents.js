// Starts a real edge and a real home agent as separate processes from their CLIs (so the OS accounts
// CPU and memory per agent), paired with each other through the real pairing path, on loopback.
import { readFileSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { freePort, memoryMiB, mustRun, spawnTool, waitFor } from "./proc.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
/** The node flags an agent's installed bin runs with (its shebang line), so the bench measures the
 * agents as users run them. */
function binNodeFlags(root, bin) {
  const shebang = readFileSync(join(root, bin), "utf8").split("\n")[0];
  const match = /^#!\/usr\/bin\/env (?:-S )?node(.*)$/.exec(shebang);
  if (!match) throw new Error(`${bin}: unexpected shebang ${shebang}`);
  return match[1].trim().split(/\s+/).filter(Boolean);
}

/** The CLIs and node flags of the agents built in checkout `root`. */
function agentBuild(root) {
  return {
    edgeCli: join(root, "packages/edge/dist/cli.js"),
    homeCli: join(root, "packages/home/dist/cli.js"),
    edgeFlags: binNodeFlags(root, "packages/edge/bin/mxtunnel-edge.js"),
    homeFlags: binNodeFlags(root, "packages/home/bin/mxtunnel-home.js"),
  };
}

const THIS_BUILD = agentBuild(ROOT);
export const EDGE_CLI = THIS_BUILD.edgeCli;
export const HOME_CLI = THIS_BUILD.homeCli;
export const EDGE_NODE_FLAGS = THIS_BUILD.edgeFlags;
export const HOME_NODE_FLAGS = THIS_BUILD.homeFlags;

function deepSet(target, path, value) {
  const keys = path.split(".");
  let node = target;
  for (const key of keys.slice(0, -1)) {
    if (typeof node[key] !== "object" || node[key] === null) node[key] = {};
    node = node[key];
  }
  node[keys.at(-1)] = value;
}

/** Sets `settings` (dotted paths) in an agent's JSON config file. */
export async function editJson(file, settings) {
  const data = JSON.parse(await readFile(file, "utf8"));
  for (const [path, value] of Object.entries(settings)) deepSet(data, path, value);
  await writeFile(file, `${JSON.stringify(data, null, 2)}\n`, { mode: 0o600 });
}

/**
 * Edge + home on loopback. `inject` is the home's smtp target ("127.0.0.1:PORT"); `edge`/`home` are
 * extra config keys (dotted paths); `nodeArgs.edge/home` extra node flags (e.g. --cpu-prof); `checkout`
 * another checkout whose built agents to run instead of this one's (bench/compare.js); `env` their environment.
 */
export async function startAgents({
  inject,
  edge = {},
  home = {},
  nodeArgs = {},
  logLevel = "warn",
  checkout = ROOT,
  env = process.env,
} = {}) {
  const { edgeCli, homeCli, edgeFlags, homeFlags } = agentBuild(resolve(checkout));
  const root = await mkdtemp(join(tmpdir(), "mxt-bench-"));
  const edgeDir = join(root, "edge");
  const homeDir = join(root, "home");
  const smtpPort = await freePort();
  const tunnelPort = await freePort();
  const url = `ws://127.0.0.1:${tunnelPort}`;
  await mustRun(process.execPath, [
    edgeCli,
    "init",
    "--dir",
    edgeDir,
    "--hostname",
    "mx.bench.test",
    "--domain",
    "bench.test",
    "--smtp-listen",
    `127.0.0.1:${smtpPort}`,
    "--tunnel-listen",
    `127.0.0.1:${tunnelPort}`,
    "--public-url",
    url,
  ]);
  await editJson(join(edgeDir, "edge.json"), {
    stableAfter: 0,
    logLevel,
    "limits.maxConnections": 5000,
    "limits.maxConnectionsPerIp": 5000,
    ...edge,
  });
  const paired = await mustRun(process.execPath, [edgeCli, "pair", "--dir", edgeDir]);
  const token = paired.stdout.trim().split("\n").at(-1).trim();

  const edgeProc = spawnTool(
    process.execPath,
    [...edgeFlags, ...(nodeArgs.edge ?? []), edgeCli, "run", "--dir", edgeDir],
    {
      label: "edge",
      env,
    },
  );
  await waitFor("the edge's SMTP port", () => canConnect(smtpPort), 15_000);
  await mustRun(process.execPath, [homeCli, "pair", "-", "--dir", homeDir], { input: `${token}\n` });
  await editJson(join(homeDir, "home.json"), {
    "postfix.inject": inject,
    "postfix.proxyProtocol": "off",
    allowPrivateClientIPs: true,
    logLevel,
    "reconnect.minDelay": 50,
    "reconnect.maxDelay": 500,
    ...home,
  });
  const homeProc = spawnTool(
    process.execPath,
    [...homeFlags, ...(nodeArgs.home ?? []), homeCli, "run", "--dir", homeDir],
    {
      label: "home",
      env,
    },
  );
  // Live once the edge reports the home connected (a 220 alone proves nothing: the spool answers too).
  await waitFor("the tunnel up", () => homeConnected(edgeDir), 20_000, 100);
  return {
    root,
    edgeDir,
    homeDir,
    smtpPort,
    tunnelPort,
    url,
    edge: edgeProc,
    home: homeProc,
    pids() {
      return { edge: edgeProc.pid, home: homeProc.pid };
    },
    memory() {
      return { edge: memoryMiB(edgeProc.pid), home: memoryMiB(homeProc.pid) };
    },
    async stop() {
      const results = await Promise.all([homeProc.stop(), edgeProc.stop()]);
      await rm(root, { recursive: true, force: true });
      return results;
    },
    logs() {
      return { edge: edgeProc.stderr.slice(-4000), home: homeProc.stderr.slice(-4000) };
    },
  };
}

/** The edge's own view: is the (single) paired home connected? */
export async function homeConnected(edgeDir) {
  const status = await mustRun(process.execPath, [EDGE_CLI, "status", "--json", "--dir", edgeDir]);
  return JSON.parse(status.stdout).homes?.[0]?.connected === true;
}

function canConnect(port) {
  return new Promise((resolve) => {
    import("node:net").then(({ default: net }) => {
      const socket = net.connect(port, "127.0.0.1");
      socket.once("connect", () => {
        socket.destroy();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
  });
}
