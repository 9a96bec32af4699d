#!/usr/bin/env node
// mxtunnel-home: parses the command line, validates config, and calls the core.
import { mkdir, readFile } from "node:fs/promises";
import {
  AGENT_VERSION,
  askRunningAgent,
  configWarnings,
  createLogger,
  decodePairingToken,
  parseDuration,
  printDoctor,
  printResult,
  reportCliError,
  shutdownSignal,
  viaAgentOrLocked,
} from "@mxtunnel/shared";
import { Command } from "commander";
import { runHome } from "./agent.js";
import { ensureHomeConfig, loadHomeConfigFrom } from "./config.js";
import { type HomeProbe, homeDoctor } from "./doctor.js";
import { pairWithEdge } from "./pairing.js";
import { hasFailures, postfixConfigReport, renderPostfixAdvice } from "./postfix-config.js";
import { SpoolKeyRing } from "./spool-keys.js";
import { type EdgeRecord, HomeState, homePaths, lockHomeState } from "./state.js";
import { type HomeStatus, homeStatus, renderHomeStatus } from "./status.js";

const NAME = "mxtunnel-home";

async function readToken(arg: string | undefined, tokenFile: string | undefined): Promise<string> {
  if (arg && tokenFile)
    throw new Error("give the token either as an argument or with --token-file, not both");
  if (tokenFile) return (await readFile(tokenFile, "utf8")).trim();
  if (arg === "-") {
    if (process.stdin.isTTY) process.stderr.write("paste the pairing token, then press Enter and Ctrl-D:\n");
    const chunks: Buffer[] = [];
    for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks).toString("utf8").trim();
  }
  if (arg) return arg.trim();
  throw new Error("no token: pass it as an argument, `-` to read stdin, or --token-file FILE");
}

/** Runs an admin command on the live agent, or `offline` under the state lock when none runs. */
function viaAgentOrLock<T>(
  dir: string,
  command: string,
  args: Record<string, unknown>,
  offline: (state: HomeState) => Promise<T>,
): Promise<T> {
  return viaAgentOrLocked(
    homePaths(dir).adminSocket,
    { command, args },
    () => lockHomeState(dir, `${NAME} ${command}`),
    async () => offline(await HomeState.open(dir, { create: command === "pair" })),
  );
}

export function buildProgram(): Command {
  const program = new Command(NAME)
    .description(
      "mxtunnel home agent: dials out to the edge and hands mail to the local Postfix with the real client IP",
    )
    .version(AGENT_VERSION)
    .showHelpAfterError();

  program
    .command("pair")
    .description("enrol this home with an edge using a token from `mxtunnel-edge pair`")
    .argument("[token]", "the token, or - to read it from stdin (keeps it out of shell history)")
    .requiredOption("--dir <dir>", "home state directory (created on first use, 0700)")
    .option("--token-file <file>", "read the token from a file")
    .option("--name <name>", "how this home is named on the edge", "home")
    .action(async (tokenArg: string | undefined, opts: { dir: string; tokenFile?: string; name: string }) => {
      const token = await readToken(tokenArg, opts.tokenFile);
      // A bad token fails here, before anything is created on disk.
      decodePairingToken(token);
      await mkdir(opts.dir, { recursive: true, mode: 0o700 });
      const edge = await viaAgentOrLock<EdgeRecord>(
        opts.dir,
        "pair",
        { token, name: opts.name },
        async (state) => {
          await ensureHomeConfig(opts.dir);
          return pairWithEdge({ token, state, name: opts.name });
        },
      );
      await ensureHomeConfig(opts.dir);
      process.stdout.write(
        `paired with ${edge.hostname} (${edge.fingerprint}) as "${edge.homeName}", domains ${edge.domains.join(", ")}\nnext: mxtunnel-home run --dir ${opts.dir}\n`,
      );
    });

  program
    .command("unpair")
    .description("forget an edge (run `mxtunnel-edge unpair` there too)")
    .argument("<edge>", "edge host name or fingerprint (see status)")
    .requiredOption("--dir <dir>", "home state directory")
    .action(async (edgeRef: string, opts: { dir: string }) => {
      const edge = await viaAgentOrLock<EdgeRecord>(opts.dir, "unpair", { edge: edgeRef }, (state) =>
        state.removeEdge(edgeRef),
      );
      process.stdout.write(`unpaired ${edge.hostname} (${edge.fingerprint})\n`);
    });

  program
    .command("run")
    .description("run the home agent (SIGTERM/SIGINT stop it cleanly)")
    .requiredOption("--dir <dir>", "home state directory")
    .option("--check", "validate the config and state, then exit")
    .option("--log-level <level>", "override logLevel")
    .action(async (opts: { dir: string; check?: boolean; logLevel?: string }) => {
      const config = await loadHomeConfigFrom(opts.dir, { logLevel: opts.logLevel });
      for (const warning of configWarnings(config)) process.stderr.write(`${NAME}: warning: ${warning}\n`);
      if (opts.check) {
        const state = await HomeState.open(opts.dir, { create: false });
        process.stdout.write(
          `config OK: ${homePaths(opts.dir).config}; key ${state.fingerprint}; ${state.edges().length} edge(s) paired\n`,
        );
        return;
      }
      const logger = createLogger({ name: NAME, level: config.logLevel });
      await runHome({ dir: opts.dir, config, logger, signal: shutdownSignal() });
    });

  program
    .command("status")
    .description("tunnel state per edge (boolean `connected`), RTT, last error")
    .requiredOption("--dir <dir>", "home state directory")
    .option("--json", "machine-readable output")
    .action(async (opts: { dir: string; json?: boolean }) => {
      const status =
        (await askRunningAgent<HomeStatus>(homePaths(opts.dir).adminSocket, "status", 5000)) ??
        homeStatus({
          state: await HomeState.open(opts.dir, { create: false }),
          spoolKeys: await SpoolKeyRing.open(opts.dir),
        });
      printResult(status, opts.json, renderHomeStatus);
    });

  program
    .command("doctor")
    .description(
      "live checks: tunnels and RTT, clocks, each service and its PROXY setting, Postfix (exit 1 on a failure)",
    )
    .requiredOption("--dir <dir>", "home state directory")
    .option(
      "--config-directory <dir>",
      "Postfix configuration directory (postconf -c), for a non-default instance",
    )
    .option("--timeout <duration>", "per probe", "5s")
    .option("--json", "machine-readable output")
    .action(async (opts: { dir: string; configDirectory?: string; timeout: string; json?: boolean }) => {
      const config = await loadHomeConfigFrom(opts.dir);
      const timeoutMs = parseDuration(opts.timeout, "--timeout");
      const probe = await askRunningAgent<HomeProbe>(homePaths(opts.dir).adminSocket, "probe", 15_000);
      const postfix = await postfixConfigReport(
        config,
        opts.configDirectory ? { configDirectory: opts.configDirectory } : {},
      ).catch(() => null);
      const checks = await homeDoctor({ config, probe, postfix, timeoutMs });
      printDoctor(`mxtunnel-home doctor: ${opts.dir}`, checks, opts.json);
    });

  program
    .command("rotate-spool-key")
    .description(
      "make a new spool key; the old one is kept until no edge holds mail sealed to it (back up --dir afterwards)",
    )
    .requiredOption("--dir <dir>", "home state directory")
    .action(async (opts: { dir: string }) => {
      const result = await viaAgentOrLock(opts.dir, "rotate-spool-key", {}, async () =>
        (await SpoolKeyRing.open(opts.dir)).rotate(),
      );
      process.stdout.write(
        `new spool key ${result.current}; kept until the edges have drained mail sealed to it: ${result.retiring.join(", ")}\n` +
          "the edges learn the new key over the tunnel (now, or when the agent next connects); back up the directory now\n",
      );
    });

  program
    .command("postfix-config")
    .description("print the master.cf, main.cf and Dovecot lines for the tunnel, checked against `postconf`")
    .requiredOption("--dir <dir>", "home state directory")
    .option(
      "--config-directory <dir>",
      "Postfix configuration directory (postconf -c), for a non-default instance",
    )
    .option("--json", "machine-readable output")
    .action(async (opts: { dir: string; configDirectory?: string; json?: boolean }) => {
      const config = await loadHomeConfigFrom(opts.dir);
      const options = opts.configDirectory ? { configDirectory: opts.configDirectory } : {};
      const advice = await postfixConfigReport(config, options);
      process.stdout.write(
        opts.json ? `${JSON.stringify(advice, null, 2)}\n` : renderPostfixAdvice(advice, options),
      );
      if (hasFailures(advice)) process.exitCode = 1;
    });

  return program;
}

try {
  await buildProgram().parseAsync(process.argv);
} catch (error) {
  process.exitCode = reportCliError(NAME, error);
}
