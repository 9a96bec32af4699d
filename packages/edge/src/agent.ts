// The edge agent: state, tunnel server, public listeners and the admin socket, started together
// and stopped together. The CLI's `run` is a thin wrapper over startEdge.

import { statfs } from "node:fs/promises";
import type net from "node:net";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import {
  type AdminRequest,
  AGENT_VERSION,
  answerClockRequest,
  CloseCode,
  closeServer,
  decodeKey,
  type EdgeConfig,
  type FileLock,
  holdStateLock,
  type ListenerLimits,
  type Logger,
  type MuxStream,
  measurePeer,
  PeerDispatch,
  StateError,
  serveAdminSocket,
  untilAborted,
} from "@mxtunnel/shared";
import type { EdgeProbe } from "./doctor.js";
import {
  type FallbackReason,
  type ForwardLimits,
  ForwardListener,
  forwardOverLimitReply,
  forwardTryLater,
} from "./forward-listener.js";
import { EdgeMonitor } from "./monitor.js";
import { type OutboundQueue, startOutbound } from "./outbound-queue.js";
import { receiveRecipientList } from "./recipient-sync.js";
import { RecipientStore } from "./recipients.js";
import { SpoolDrain } from "./spool-drain.js";
import { SpoolServer } from "./spool-server.js";
import { SpoolStore, spoolQueueEntries } from "./spool-store.js";
import { EdgeState, lockEdgeState } from "./state.js";
import { type EdgeStatus, edgeStatus } from "./status.js";
import { loadTlsCertificate } from "./tls.js";
import { type Tunnel, TunnelServer } from "./tunnel-server.js";
import { handleUndeliverable } from "./undeliverable.js";

export interface EdgeAgentOptions {
  dir: string;
  config: EdgeConfig;
  logger: Logger;
  /** Fault injection for tests: replaces fs/promises open for spool files (ENOSPC). */
  spoolOpenFile?: import("@mxtunnel/shared").SpoolFileOpener;
}

export interface EdgeAgent {
  readonly state: EdgeState;
  readonly tunnels: TunnelServer;
  readonly spool: { store: SpoolStore; server: SpoolServer; drain: SpoolDrain; recipients: RecipientStore };
  readonly outbound: OutboundQueue;
  readonly addresses: {
    tunnel: AddressInfo;
    smtp: AddressInfo;
    forwards: AddressInfo[];
    /** Where /metrics is served (null: metricsListen is off). */
    metrics: AddressInfo | null;
  };
  readonly monitor: EdgeMonitor;
  status(): EdgeStatus;
  /** Live checks for `doctor`: a fresh PING and a clock comparison per connected home. */
  probe(): Promise<EdgeProbe>;
  stop(): Promise<void>;
}

export async function startEdge(options: EdgeAgentOptions): Promise<EdgeAgent> {
  const { dir, config, logger } = options;
  const cleanups = await holdStateLock(() => lockEdgeState(dir, "mxtunnel-edge run"));
  try {
    const state = await EdgeState.open(dir);
    const startedAt = Date.now();
    const tunnels = new TunnelServer({
      state,
      listen: config.tunnelListen,
      hostname: config.hostname,
      logger: logger.child({ component: "tunnel" }),
      limits: {
        handshakesPerIpPerSecond: config.limits.handshakesPerIpPerSecond,
        handshakeBurst: config.limits.handshakeBurst,
        handshakesPerSecond: Math.max(50, config.limits.handshakesPerIpPerSecond * 20),
        maxPendingHandshakes: config.limits.maxPendingHandshakes,
        authTimeoutMs: config.limits.authTimeout,
      },
    });
    const tunnelAddress = await tunnels.start();
    cleanups.push(() => tunnels.stop());

    // Streams and CONTROL messages that homes send are dispatched by kind; each feature registers
    // its handler below (outbound relay: "relay"; backup MX: "sync").
    const dispatch = new PeerDispatch<Tunnel>((kind) => `this edge does not serve ${kind} streams`);
    tunnels.on("up", (tunnel) => {
      tunnel.mux.on("stream", (stream: MuxStream) => dispatch.stream(stream, tunnel));
      tunnel.mux.on("control", (message: Record<string, unknown>) => dispatch.control(message, tunnel));
    });

    // Outbound: relay streams from homes are checked, queued durably, DKIM-signed and delivered.
    const outbound = await startOutbound({
      dir,
      config,
      tunnels,
      logger: logger.child({ component: "outbound" }),
    });
    cleanups.push(() => outbound.stop());
    dispatch.onStream("relay", (stream, tunnel) => outbound.handleStream(stream, tunnel.home));

    // Backup MX: sessions the live path cannot serve are answered here and spooled, sealed to home.
    const tls = await loadTlsCertificate(dir, config.hostname);
    const spoolStore = await SpoolStore.open(join(dir, "spool"), logger.child({ component: "spool" }));
    const recipients = new RecipientStore(dir, config.spool.recipientListMaxAge);
    await recipients.load(state.homes().map((home) => home.publicKey));
    const drain = new SpoolDrain({
      store: spoolStore,
      tunnels,
      logger: logger.child({ component: "drain" }),
      concurrency: config.spool.drainConcurrency,
      retryMinMs: config.spool.retryMin,
      retryMaxMs: config.spool.retryMax,
      maxAgeMs: config.spool.maxAge,
      stableAfterMs: config.stableAfter,
      onUndeliverable: async (entry, reason, failed, partial) => {
        await handleUndeliverable({
          entry,
          reason,
          ...(failed ? { failed } : {}),
          ...(partial ? { partial } : {}),
          store: spoolStore,
          outbound,
          hostname: config.hostname,
          homeName: state.homes().find((home) => home.publicKey === entry.homeKey)?.name ?? "home",
          logger: logger.child({ component: "drain" }),
        });
      },
    });
    cleanups.push(async () => drain.stop());
    const spool = new SpoolServer({
      config,
      state,
      store: spoolStore,
      recipients,
      tls,
      logger: logger.child({ component: "spool" }),
      onSpooled: () => drain.kick(),
      ...(options.spoolOpenFile ? { openFile: options.spoolOpenFile } : {}),
    });
    dispatch.onStream("sync", (stream, tunnel) => {
      receiveRecipientList(stream, tunnel, recipients, logger).catch((error: Error) => {
        logger.warn({ home: tunnel.home.name, err: error.message }, "recipient list sync interrupted");
        stream.destroy();
      });
    });

    dispatch.onControl((message, tunnel) => {
      if (message.type === "limits" && Number.isSafeInteger(message.messageSizeLimit)) {
        spool.setMessageSizeLimit(tunnel.home.publicKey, Number(message.messageSizeLimit));
      }
    });

    // Each listener counts its own connections: port 25 under `limits`, each forward under its own.
    const listenerLimits = (limits: ListenerLimits): ForwardLimits => ({
      maxConnections: limits.maxConnections,
      maxConnectionsPerIp: limits.maxConnectionsPerIp,
      idleTimeoutMs: limits.idleTimeout,
      sessionTimeoutMs: limits.sessionTimeout,
    });
    const listener = (
      listen: typeof config.smtpListen,
      service: string,
      limits: ListenerLimits,
      fallback: (socket: net.Socket, reason: FallbackReason) => void,
      overLimitReply?: string,
    ) =>
      new ForwardListener({
        listen,
        service,
        tunnels,
        limits: listenerLimits(limits),
        openTimeoutMs: config.openTimeout,
        stableAfterMs: config.stableAfter,
        logger: logger.child({ component: service }),
        fallback,
        ...(overLimitReply ? { overLimitReply } : {}),
      });
    const smtp = listener(
      config.smtpListen,
      "smtp",
      config.limits,
      (socket) => spool.accept(socket),
      `421 4.7.0 ${config.hostname} too many connections, try again later\r\n`,
    );
    const smtpAddress = await smtp.start();
    cleanups.push(() => smtp.stop());
    const forwards: ForwardListener[] = [];
    const forwardAddresses: AddressInfo[] = [];
    for (const forward of config.forwards) {
      const f = listener(
        forward.listen,
        forward.service,
        forward.limits,
        // Another port for inbound SMTP (e.g. an IPv6 listener) is backed by the spool like port 25.
        forward.service === "smtp"
          ? (socket) => spool.accept(socket)
          : forwardTryLater(forward.service, config.hostname),
        forwardOverLimitReply(forward.service, config.hostname),
      );
      forwardAddresses.push(await f.start());
      forwards.push(f);
      cleanups.push(() => f.stop());
    }

    // Operator surface (status, doctor, metrics): today's counts, since when each home is away,
    // the last errors; the peer answers clock requests; a home's rotated spool key is recorded.
    const monitor = new EdgeMonitor(
      tunnels,
      () => ({
        inboundSessions: [smtp, ...forwards].reduce((n, l) => n + l.counters.accepted, 0),
        spooled: spool.counters.spooled,
        drained: drain.counters.delivered,
        relayed: outbound.counters.queued,
        delivered: outbound.counters.delivered,
        failed: outbound.counters.failed,
      }),
      startedAt,
    );
    cleanups.push(async () => monitor.stop());
    const disk = await freeSpaceWatcher(dir);
    cleanups.push(async () => disk.stop());
    dispatch.onControl((message, tunnel) => {
      if (answerClockRequest(message, tunnel.mux)) return;
      if (message.type === "spool-key" && typeof message.publicKey === "string") {
        void acceptSpoolKey(message.publicKey, tunnel).catch((error: Error) =>
          logger.warn({ home: tunnel.home.name, err: error.message }, "spool key from home refused"),
        );
      }
    });
    const acceptSpoolKey = async (publicKeyText: string, tunnel: Tunnel) => {
      const key = decodeKey(publicKeyText, "spool public key");
      if (await state.setSpoolKey(tunnel.home.publicKey, key))
        logger.info(
          { home: tunnel.home.name },
          "home rotated its spool key: new mail is sealed to the new key",
        );
      // Which keys the files still waiting for this home were sealed to: home keeps those.
      const keyIdsInUse = [
        ...new Set(
          spoolStore
            .list()
            .filter((entry) => entry.homeKey === tunnel.home.publicKey)
            .map((entry) => entry.header.spoolKeyId),
        ),
      ];
      if (!tunnel.mux.closed)
        tunnel.mux.sendControl({ type: "spool-key-ack", publicKey: publicKeyText, keyIdsInUse });
    };
    let metricsAddress: AddressInfo | null = null;
    if (config.metricsListen) {
      // Loaded only when metrics are on: prom-client (and the OpenTelemetry API it pulls in) costs
      // memory an agent without metrics never needs.
      const { edgeRegistry, startMetricsServer } = await import("./metrics.js");
      const registry = edgeRegistry({
        state,
        tunnels,
        listeners: () => [
          { service: "smtp", listener: smtp },
          ...forwards.map((listener, i) => ({ service: config.forwards[i]?.service ?? "?", listener })),
        ],
        spoolStore,
        spoolServer: spool,
        drain,
        outbound,
      });
      const metrics = await startMetricsServer(
        config.metricsListen,
        registry,
        logger.child({ component: "metrics" }),
      );
      cleanups.push(() => metrics.stop());
      metricsAddress = metrics.address;
    }

    const agent: EdgeAgent = {
      state,
      tunnels,
      spool: { store: spoolStore, server: spool, drain, recipients },
      outbound,
      addresses: {
        tunnel: tunnelAddress,
        smtp: smtpAddress,
        forwards: forwardAddresses,
        metrics: metricsAddress,
      },
      monitor,
      status: () =>
        edgeStatus({
          state,
          config,
          running: {
            startedAt,
            tunnels,
            listeners: [smtp, ...forwards],
            spool: spoolStore,
            recipients,
            outbound,
            monitor,
            freeBytes: disk.freeBytes(),
          },
        }),
      probe: async () => ({
        version: AGENT_VERSION,
        homes: await Promise.all(
          state.homes().map(async (home) => {
            const tunnel = tunnels.tunnelOf(home.publicKey);
            const { live, rttMs, clockSkewMs } = await measurePeer(tunnel?.mux);
            return {
              name: home.name,
              fingerprint: home.fingerprint,
              connected: live,
              rttMs,
              clockSkewMs,
              peerVersion: tunnel?.peerVersion ?? null,
              downSince: live ? null : new Date(monitor.homeDownSince(home.publicKey)).toISOString(),
            };
          }),
        ),
      }),
      stop: () => cleanups.run(),
    };

    const admin = await serveAdminSocket(state.paths.adminSocket, (request) =>
      handleAdmin(agent, config, request),
    );
    cleanups.push(closeServer(admin));
    logger.info(
      {
        version: AGENT_VERSION,
        fingerprint: state.fingerprint,
        tunnel: `${tunnelAddress.address}:${tunnelAddress.port}`,
        smtp: `${smtpAddress.address}:${smtpAddress.port}`,
        homes: state.homes().length,
      },
      "edge running",
    );
    return agent;
  } catch (error) {
    await cleanups.run();
    throw error;
  }
}

/** Runs until the signal aborts; used by `mxtunnel-edge run`. */
export async function runEdge(
  options: EdgeAgentOptions & { signal: AbortSignal; onReady?: (agent: EdgeAgent) => void },
): Promise<void> {
  const agent = await startEdge(options);
  options.onReady?.(agent);
  await untilAborted(options.signal);
  options.logger.info("edge stopping");
  await agent.stop();
}

export async function issuePairingToken(
  state: EdgeState,
  config: EdgeConfig,
  options: { ttlMs: number; domains?: string[] | undefined },
): Promise<{ token: string; expiresAt: string; domains: string[] }> {
  const domains = options.domains?.length ? options.domains.map((d) => d.toLowerCase()) : config.domains;
  const unknown = domains.filter((domain) => !config.domains.includes(domain));
  if (unknown.length) {
    throw new Error(
      `--domain ${unknown.join(", ")} is not one of this edge's domains (${config.domains.join(", ")}); add it to edge.json first`,
    );
  }
  const token = await state.issueToken({ ttlMs: options.ttlMs, domains, url: config.publicUrl });
  return { token, expiresAt: new Date(Date.now() + options.ttlMs).toISOString(), domains };
}

async function handleAdmin(agent: EdgeAgent, config: EdgeConfig, request: AdminRequest): Promise<unknown> {
  const args = request.args ?? {};
  switch (request.command) {
    case "status":
      return agent.status();
    case "probe":
      return agent.probe();
    case "pair":
      return issuePairingToken(agent.state, config, {
        ttlMs: Number(args.ttlMs),
        domains: Array.isArray(args.domains) ? args.domains.map(String) : undefined,
      });
    case "queue":
      return { spool: spoolQueueEntries(agent.spool.store), outbound: agent.outbound.entriesList() };
    case "queue-flush": {
      const flushed = agent.spool.store.flush();
      agent.spool.drain.kick();
      agent.outbound.flush();
      return { spool: flushed };
    }
    case "queue-delete": {
      const id = String(args.id ?? "");
      if (!agent.spool.store.get(id) && (await agent.outbound.delete(id))) return { deleted: id };
      if (!agent.spool.store.get(id))
        throw new StateError("STATE_MISSING", `no queued message has id ${id}; see \`mxtunnel-edge queue\``);
      await agent.spool.store.remove(id);
      return { deleted: id };
    }
    case "unpair": {
      const home = await agent.state.unpair(String(args.home ?? ""));
      agent.tunnels.disconnect(home.publicKey, CloseCode.UNPAIRED, "unpaired by the edge operator");
      return { name: home.name, fingerprint: home.fingerprint, wasConnected: true };
    }
    default:
      throw new Error(`unknown admin command ${request.command}`);
  }
}

export type { FileLock };

/** Free bytes under the state directory, measured at start and every minute (status is synchronous). */
async function freeSpaceWatcher(dir: string): Promise<{ freeBytes(): number | null; stop(): void }> {
  let free: number | null = null;
  const measure = async () => {
    try {
      const fs = await statfs(dir);
      free = fs.bavail * fs.bsize;
    } catch {
      free = null;
    }
  };
  await measure();
  const timer = setInterval(() => void measure(), 60_000);
  timer.unref();
  return { freeBytes: () => free, stop: () => clearInterval(timer) };
}
