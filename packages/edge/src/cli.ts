#!/usr/bin/env node
// mxtunnel-edge: parses the command line, validates config, and calls the core. Nothing here
// decides policy; the core never reads argv or env and never exits the process.
import { readdir, stat, statfs } from "node:fs/promises";
import { join } from "node:path";
import {
  AGENT_VERSION,
  askRunningAgent,
  collect,
  createLogger,
  parseDuration,
  printDoctor,
  printResult,
  reportCliError,
  shutdownSignal,
  viaAgentOrLocked,
} from "@mxtunnel/shared";
import { Command } from "commander";
import { issuePairingToken, runEdge } from "./agent.js";
import { loadEdgeConfigFrom } from "./config.js";
import { dkimRecords } from "./dkim.js";
import { dnsPlan, edgePublicAddresses, renderDnsPlan } from "./dns-records.js";
import { type EdgeProbe, edgeDoctor } from "./doctor.js";
import { initEdge } from "./init.js";
import { outboundQueueEntries, renderOutboundQueue } from "./outbound-queue.js";
import { renderSpoolQueue, SpoolStore, spoolQueueEntries } from "./spool-store.js";
import { EdgeState, edgePaths, lockEdgeState } from "./state.js";
import { type EdgeStatus, edgeStatus, renderEdgeStatus } from "./status.js";

const NAME = "mxtunnel-edge";

/** Runs an admin command on the live agent, or `offline` under the state lock when none runs. */
function viaAgentOrLock<T>(
  dir: string,
  command: string,
  args: Record<string, unknown>,
  offline: (state: EdgeState) => Promise<T>,
): Promise<T> {
  return viaAgentOrLocked(
    edgePaths(dir).adminSocket,
    { command, args },
    () => lockEdgeState(dir, `${NAME} ${command}`),
    async () => offline(await EdgeState.open(dir)),
  );
}

export function buildProgram(): Command {
  const program = new Command(NAME)
    .description(
      "mxtunnel edge agent: holds the public IP, the MX and port 25, and forwards mail to a paired home over an encrypted tunnel",
    )
    .version(AGENT_VERSION)
    .showHelpAfterError()
    .configureOutput({ outputError: (text, write) => write(text) });

  program
    .command("init")
    .description("create a state directory: static key (0600) and edge.json")
    .requiredOption("--dir <dir>", "state directory to create")
    .requiredOption("--hostname <name>", "this edge's public host name (the MX target, EHLO name and PTR)")
    .requiredOption("--domain <domain>", "a mail domain this edge serves (repeatable)", collect)
    .option("--smtp-listen <addr:port>", "public SMTP listener (default 0.0.0.0:25)")
    .option("--tunnel-listen <addr:port>", "tunnel listener for homes (default 0.0.0.0:8443)")
    .option(
      "--public-url <url>",
      "tunnel URL homes dial, carried in pairing tokens (default ws://HOSTNAME:PORT)",
    )
    .action(
      async (opts: {
        dir: string;
        hostname: string;
        domain: string[];
        smtpListen?: string;
        tunnelListen?: string;
        publicUrl?: string;
      }) => {
        const result = await initEdge({
          dir: opts.dir,
          hostname: opts.hostname,
          domains: opts.domain,
          smtpListen: opts.smtpListen,
          tunnelListen: opts.tunnelListen,
          publicUrl: opts.publicUrl,
        });
        process.stdout.write(
          `initialised ${opts.dir}\n  config  ${result.configPath}\n  key     ${result.fingerprint}\nnext: mxtunnel-edge run --dir ${opts.dir}, then mxtunnel-edge pair --dir ${opts.dir}\n`,
        );
      },
    );

  program
    .command("pair")
    .description("print a one-time pairing token for a home (alone on stdout's last line)")
    .requiredOption("--dir <dir>", "edge state directory")
    .option("--ttl <duration>", "how long the token stays valid", "1h")
    .option(
      "--domain <domain>",
      "bind the home to this domain (repeatable; default: all of the edge's)",
      collect,
    )
    .action(async (opts: { dir: string; ttl: string; domain?: string[] }) => {
      const ttlMs = parseDuration(opts.ttl, "--ttl");
      const config = await loadEdgeConfigFrom(opts.dir);
      const issued = await viaAgentOrLock(opts.dir, "pair", { ttlMs, domains: opts.domain ?? [] }, (state) =>
        issuePairingToken(state, config, { ttlMs, domains: opts.domain }),
      );
      process.stderr.write(
        `pairing token for ${config.hostname} (domains ${issued.domains.join(", ")}), single use, valid until ${issued.expiresAt}.\n` +
          `On the home box: mxtunnel-home pair - --dir /var/lib/mxtunnel-home   (paste it on stdin; keeps it out of shell history)\n`,
      );
      process.stdout.write(`${issued.token}\n`);
    });

  program
    .command("unpair")
    .description("revoke a home at once (its live tunnel is closed and reconnects refused)")
    .requiredOption("--dir <dir>", "edge state directory")
    .argument("<home>", "home name or key fingerprint (see status)")
    .action(async (home: string, opts: { dir: string }) => {
      const removed = await viaAgentOrLock(opts.dir, "unpair", { home }, async (state) => {
        const record = await state.unpair(home);
        return { name: record.name, fingerprint: record.fingerprint };
      });
      process.stdout.write(`unpaired ${removed.name} (${removed.fingerprint})\n`);
    });

  program
    .command("run")
    .description("run the edge agent (SIGTERM/SIGINT stop it cleanly)")
    .requiredOption("--dir <dir>", "edge state directory")
    .option("--check", "validate the config and state, then exit")
    .option("--smtp-listen <addr:port>", "override smtpListen")
    .option("--tunnel-listen <addr:port>", "override tunnelListen")
    .option("--log-level <level>", "override logLevel (trace, debug, info, warn, error)")
    .action(
      async (opts: {
        dir: string;
        check?: boolean;
        smtpListen?: string;
        tunnelListen?: string;
        logLevel?: string;
      }) => {
        const config = await loadEdgeConfigFrom(opts.dir, {
          smtpListen: opts.smtpListen,
          tunnelListen: opts.tunnelListen,
          logLevel: opts.logLevel,
        });
        if (opts.check) {
          const state = await EdgeState.open(opts.dir, { readOnly: true });
          process.stdout.write(
            `config OK: ${edgePaths(opts.dir).config}; key ${state.fingerprint}; ${state.homes().length} home(s) paired\n`,
          );
          return;
        }
        const logger = createLogger({ name: NAME, level: config.logLevel });
        await runEdge({ dir: opts.dir, config, logger, signal: shutdownSignal() });
      },
    );

  program
    .command("status")
    .description("paired homes (with a boolean `connected`), RTT, sessions, queues")
    .requiredOption("--dir <dir>", "edge state directory")
    .option("--json", "machine-readable output")
    .action(async (opts: { dir: string; json?: boolean }) => {
      const status =
        (await askRunningAgent<EdgeStatus>(edgePaths(opts.dir).adminSocket, "status", 5000)) ??
        edgeStatus({
          config: await loadEdgeConfigFrom(opts.dir),
          state: await EdgeState.open(opts.dir, { readOnly: true }),
          ...(await offlineStatusFacts(opts.dir)),
        });
      printResult(status, opts.json, renderEdgeStatus);
    });

  program
    .command("dns")
    .description("the DNS records to publish for this edge (A/AAAA, MX, SPF, DKIM, DMARC, PTR, MTA-STS)")
    .requiredOption("--dir <dir>", "edge state directory")
    .option(
      "--ip <address>",
      "the edge's public IP (repeatable; default: publicAddresses, then detected)",
      collect,
    )
    .option("--json", "machine-readable output")
    .action(async (opts: { dir: string; ip?: string[]; json?: boolean }) => {
      const config = await loadEdgeConfigFrom(opts.dir);
      const { addresses, source } = edgePublicAddresses(config, opts.ip ?? []);
      const plan = dnsPlan({ config, dkim: await dkimRecords(opts.dir), addresses, addressSource: source });
      printResult(plan, opts.json, renderDnsPlan);
    });

  program
    .command("doctor")
    .description(
      "live checks: DNS, blocklists, outbound port 25, tunnels, clocks, disk (exit 1 on a failure)",
    )
    .requiredOption("--dir <dir>", "edge state directory")
    .option(
      "--ip <address>",
      "the edge's public IP (repeatable; default: publicAddresses, then detected)",
      collect,
    )
    .option("--timeout <duration>", "per DNS query and for the port 25 probe", "5s")
    .option("--json", "machine-readable output")
    .action(async (opts: { dir: string; ip?: string[]; timeout: string; json?: boolean }) => {
      const config = await loadEdgeConfigFrom(opts.dir);
      const timeoutMs = parseDuration(opts.timeout, "--timeout");
      const { addresses } = edgePublicAddresses(config, opts.ip ?? []);
      const probe = await askRunningAgent<EdgeProbe>(edgePaths(opts.dir).adminSocket, "probe", 15_000);
      const checks = await edgeDoctor({
        config,
        dir: opts.dir,
        addresses,
        dkim: await dkimRecords(opts.dir),
        probe,
        timeoutMs,
      });
      printDoctor(
        `mxtunnel-edge doctor: ${config.hostname} (${addresses.join(", ") || "address unknown"})`,
        checks,
        opts.json,
      );
    });

  program
    .command("queue")
    .description(
      "the spool (mail held for home) and the outbound queue: ids, ages, sizes, tries — never content",
    )
    .argument("[action]", "list (default), flush (retry everything now) or delete", "list")
    .argument("[id]", "the message id, with delete")
    .requiredOption("--dir <dir>", "edge state directory")
    .option("--json", "machine-readable output")
    .action(async (action: string, id: string | undefined, opts: { dir: string; json?: boolean }) => {
      if (action === "list") {
        const queues = await viaAgentOrLock(opts.dir, "queue", {}, async () => ({
          spool: spoolQueueEntries(
            await SpoolStore.open(join(opts.dir, "spool"), createLogger({ name: NAME, level: "warn" })),
          ),
          outbound: await outboundQueueEntries(opts.dir),
        }));
        printResult(
          queues,
          opts.json,
          (q) => `${renderSpoolQueue(q.spool)}\n\n${renderOutboundQueue(q.outbound)}`,
        );
      } else if (action === "flush") {
        const result = await viaAgentOrLock(opts.dir, "queue-flush", {}, async () => {
          throw new Error("the edge is not running: queued mail is retried as soon as it starts");
        });
        process.stdout.write(`flushed: ${JSON.stringify(result)}\n`);
      } else if (action === "delete") {
        if (!id) throw new Error("queue delete needs the message id (see `mxtunnel-edge queue`)");
        await viaAgentOrLock(opts.dir, "queue-delete", { id }, async () => {
          const store = await SpoolStore.open(
            join(opts.dir, "spool"),
            createLogger({ name: NAME, level: "warn" }),
          );
          if (!store.get(id))
            throw new Error(
              `no spooled message has id ${id} (outbound entries can be deleted while the edge runs)`,
            );
          await store.remove(id);
          return { deleted: id };
        });
        process.stdout.write(`deleted ${id}\n`);
      } else {
        throw new Error(`unknown queue action "${action}": use list, flush or delete ID`);
      }
    });

  return program;
}

/** What `status` can still tell when the agent is not running: queue sizes and ages, free space. */
async function offlineStatusFacts(dir: string) {
  const ages = async (path: string, suffix: string) => {
    const now = Date.now();
    const names = await readdir(path).catch(() => [] as string[]);
    const out: number[] = [];
    for (const name of names.filter((n) => n.endsWith(suffix))) {
      const info = await stat(join(path, name)).catch(() => undefined);
      if (info) out.push(Math.max(0, Math.round((now - info.mtimeMs) / 1000)));
    }
    return { messages: out.length, oldestSeconds: out.length ? Math.max(...out) : null };
  };
  const outbound = await outboundQueueEntries(dir).catch(() => []);
  const fs = await statfs(dir).catch(() => undefined);
  return {
    offlineQueues: {
      spool: await ages(join(dir, "spool"), ".spool"),
      outbound: {
        messages: outbound.length,
        oldestSeconds: outbound.length ? Math.max(...outbound.map((e) => e.ageSeconds)) : null,
      },
    },
    freeBytes: fs ? fs.bavail * fs.bsize : null,
  };
}

export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv);
    // A command may report failure without an error (doctor: exit 1 when a check failed).
    return typeof process.exitCode === "number" ? process.exitCode : 0;
  } catch (error) {
    return reportCliError(NAME, error);
  }
}

process.exitCode = await main(process.argv);
