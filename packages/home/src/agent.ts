// The home agent: one EdgeLink per paired edge, the service connector for forward streams, and
// the admin socket. The CLI's `run` is a thin wrapper over startHome.

import { join } from "node:path";
import {
  type AdminRequest,
  AGENT_VERSION,
  answerClockRequest,
  closeServer,
  type HomeConfig,
  holdStateLock,
  type Logger,
  measurePeer,
  PeerDispatch,
  serveAdminSocket,
  untilAborted,
} from "@mxtunnel/shared";
import type { HomeProbe } from "./doctor.js";
import { EdgeLink } from "./edge-link.js";
import { InjectedLog } from "./injected-log.js";
import { HomeMonitor } from "./monitor.js";
import { pairWithEdge } from "./pairing.js";
import { RecipientSync } from "./recipient-sync.js";
import { type RelayListener, startRelayListener } from "./relay-listener.js";
import { ServiceConnector, type ServiceTarget } from "./service-connector.js";
import { SpoolInjector } from "./spool-injector.js";
import { SpoolKeyRing } from "./spool-keys.js";
import { type EdgeRecord, HomeState, lockHomeState } from "./state.js";
import { type HomeStatus, homeStatus } from "./status.js";

export interface HomeAgentOptions {
  dir: string;
  config: HomeConfig;
  logger: Logger;
  /** Overrides the mux's liveness timing (tests). */
  mux?: { pingIntervalMs?: number; idleTimeoutMs?: number };
  /** While old spool keys remain, how often the edges are asked which ones they still need (default 60 s). */
  spoolKeyCheckMs?: number;
}

export interface HomeAgent {
  readonly state: HomeState;
  readonly links: ReadonlyMap<string, EdgeLink>;
  readonly connector: ServiceConnector;
  /** Outbound: Postfix's relayhost, handing mail to the edge on relay streams. */
  readonly relay: RelayListener;
  readonly injector: SpoolInjector;
  /** The current spool key and the old ones kept until the edges have drained mail sealed to them. */
  readonly spoolKeys: SpoolKeyRing;
  status(): HomeStatus;
  /** Live checks for `doctor`: a fresh PING and a clock comparison per connected edge. */
  probe(): Promise<HomeProbe>;
  /** A new spool key; the edges learn it at once (or on their next tunnel). */
  rotateSpoolKey(): Promise<{ current: string; retiring: string[] }>;
  /** Resolves once every paired edge has a live tunnel (or rejects after timeoutMs). */
  waitConnected(timeoutMs: number): Promise<void>;
  stop(): Promise<void>;
}

export function serviceTable(config: HomeConfig): Map<string, ServiceTarget> {
  const services = new Map<string, ServiceTarget>();
  for (const [name, service] of Object.entries(config.services)) {
    services.set(name, { target: service.target, proxyProtocol: service.proxyProtocol });
  }
  services.set("smtp", { target: config.postfix.inject, proxyProtocol: config.postfix.proxyProtocol });
  return services;
}

export async function startHome(options: HomeAgentOptions): Promise<HomeAgent> {
  const { dir, config, logger } = options;
  const cleanups = await holdStateLock(() => lockHomeState(dir, "mxtunnel-home run"));
  try {
    const state = await HomeState.open(dir, { create: true });
    const spoolKeys = await SpoolKeyRing.open(dir);
    state.spoolKeyPair = spoolKeys.currentKey;
    const startedAt = Date.now();
    const connector = new ServiceConnector({
      services: serviceTable(config),
      allowPrivateClientIPs: config.allowPrivateClientIPs,
      logger: logger.child({ component: "services" }),
    });
    // Streams the edge opens are dispatched by kind; each feature registers its handler here
    // (backup MX drain: "spool").
    const dispatch = new PeerDispatch<EdgeLink>((kind) => `stream kind ${kind} not served by this home`);
    dispatch.onStream("forward", (stream) => connector.handle(stream));

    // Backup MX: the edge drains what it spooled while we were away; we open it and hand it to Postfix.
    const injectedLog = await InjectedLog.open(join(dir, "injected.log"), {
      logger: logger.child({ component: "spool" }),
    });
    cleanups.push(() => injectedLog.close());
    const injector = new SpoolInjector({
      spoolKeyPair: state.spoolKeyPair,
      spoolKeys: () => spoolKeys.all(),
      inject: { target: config.postfix.inject, proxyProtocol: config.postfix.proxyProtocol },
      log: injectedLog,
      logger: logger.child({ component: "spool" }),
    });
    dispatch.onStream("spool", (stream) => injector.handle(stream));
    const recipientSync = new RecipientSync({
      file: config.recipients.file,
      delimiter: config.recipients.delimiter,
      refreshMs: config.recipients.refresh,
      messageSizeLimit: config.postfix.messageSizeLimit,
      logger: logger.child({ component: "recipients" }),
    });
    cleanups.push(async () => recipientSync.stop());
    const links = new Map<string, EdgeLink>();
    // Operator surface: today's counts, since when each edge is away, the last errors.
    const monitor = new HomeMonitor(
      () => ({
        forwarded: connector.counters.accepted,
        injectedFromSpool: injector.counters.delivered,
        relayed: relay.listener.counters.relayed,
        relayRefused: relay.listener.counters.refused + relay.listener.counters.deferred,
      }),
      startedAt,
    );
    cleanups.push(async () => monitor.stop());
    // Spool key rotation (docs/protocol.md): every edge hears the current key on each tunnel up and,
    // while old keys remain, periodically; its ack says which old keys its spool still needs.
    const sendSpoolKey = (link: EdgeLink) => {
      const mux = link.currentMux;
      if (mux && !mux.closed)
        mux.sendControl({ type: "spool-key", publicKey: spoolKeys.currentPublicKeyText });
    };
    const spoolKeyTimer = setInterval(() => {
      if (spoolKeys.oldKeyIds().length) for (const link of links.values()) sendSpoolKey(link);
    }, options.spoolKeyCheckMs ?? 60_000);
    spoolKeyTimer.unref();
    cleanups.push(async () => clearInterval(spoolKeyTimer));
    dispatch.onControl((message, link) => {
      const mux = link.currentMux;
      if (mux && answerClockRequest(message, mux)) return;
      if (message.type !== "spool-key-ack") return;
      if (!spoolKeys.acknowledge(link.edge.publicKey, message.publicKey, message.keyIdsInUse)) return;
      void spoolKeys
        .retire(
          state.edges().map((edge) => edge.publicKey),
          logger.child({ component: "spool" }),
        )
        .catch((error: Error) => logger.warn({ err: error.message }, "could not delete an old spool key"));
    });
    const addLink = (edge: EdgeRecord) => {
      const link = new EdgeLink({
        edge,
        keyPair: state.keyPair,
        logger: logger.child({ component: "tunnel", edge: edge.hostname }),
        reconnect: { minDelayMs: config.reconnect.minDelay, maxDelayMs: config.reconnect.maxDelay },
        ...(options.mux ? { mux: options.mux } : {}),
        onStream: dispatch.stream,
        onControl: dispatch.control,
      });
      links.set(edge.publicKey, link);
      monitor.watch(link);
      link.on("up", () => sendSpoolKey(link));
      recipientSync.attach(link);
      link.start();
    };
    for (const edge of state.edges()) addLink(edge);
    cleanups.push(async () => {
      await Promise.all([...links.values()].map((link) => link.stop()));
    });
    if (links.size === 0)
      logger.warn("no edge paired yet: run `mxtunnel-home pair` with a token from `mxtunnel-edge pair`");
    const relay = await startRelayListener({
      listen: config.relayListen,
      auth: config.relayAuth,
      limits: config.relayLimits,
      timeoutMs: config.relayTimeout,
      links,
      dir,
      logger: logger.child({ component: "relay" }),
    });
    cleanups.push(() => relay.stop());

    const agent: HomeAgent = {
      state,
      links,
      connector,
      relay: relay.listener,
      injector,
      spoolKeys,
      status: () => homeStatus({ state, running: { startedAt, links, monitor }, spoolKeys }),
      probe: async () => ({
        version: AGENT_VERSION,
        edges: await Promise.all(
          state.edges().map(async (edge) => {
            const link = links.get(edge.publicKey);
            const status = link?.status();
            const { live, rttMs, clockSkewMs } = await measurePeer(link?.currentMux);
            return {
              hostname: edge.hostname,
              fingerprint: edge.fingerprint,
              connected: live,
              rttMs,
              clockSkewMs,
              peerVersion: status?.peerVersion ?? null,
              downSince: live || !link ? null : new Date(monitor.edgeDownSince(link)).toISOString(),
              lastError: status?.lastError ?? null,
            };
          }),
        ),
      }),
      rotateSpoolKey: async () => {
        const result = await spoolKeys.rotate();
        state.spoolKeyPair = spoolKeys.currentKey;
        logger.info({ spoolKey: result.current, retiring: result.retiring }, "spool key rotated");
        for (const link of links.values()) sendSpoolKey(link);
        return result;
      },
      waitConnected: (timeoutMs) => waitAllConnected(links, timeoutMs),
      stop: () => cleanups.run(),
    };
    const admin = await serveAdminSocket(state.paths.adminSocket, async (request: AdminRequest) => {
      const args = request.args ?? {};
      switch (request.command) {
        case "status":
          return agent.status();
        case "probe":
          return agent.probe();
        case "rotate-spool-key":
          return agent.rotateSpoolKey();
        case "pair": {
          const edge = await pairWithEdge({
            token: String(args.token ?? ""),
            state,
            name: String(args.name ?? "home"),
            logger,
          });
          const existing = links.get(edge.publicKey);
          if (existing) await existing.stop();
          addLink(edge);
          return edge;
        }
        case "unpair": {
          const edge = await state.removeEdge(String(args.edge ?? ""));
          await links.get(edge.publicKey)?.stop();
          links.delete(edge.publicKey);
          return edge;
        }
        default:
          throw new Error(`unknown admin command ${request.command}`);
      }
    });
    cleanups.push(closeServer(admin));
    logger.info(
      { version: AGENT_VERSION, fingerprint: state.fingerprint, edges: links.size },
      "home running",
    );
    return agent;
  } catch (error) {
    await cleanups.run();
    throw error;
  }
}

export async function runHome(options: HomeAgentOptions & { signal: AbortSignal }): Promise<void> {
  const agent = await startHome(options);
  await untilAborted(options.signal);
  options.logger.info("home stopping");
  await agent.stop();
}

function waitAllConnected(links: ReadonlyMap<string, EdgeLink>, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const check = () => [...links.values()].every((link) => link.status().connected);
    if (check()) return resolve();
    const onUp = () => {
      if (!check()) return;
      finish();
      resolve();
    };
    const finish = () => {
      clearTimeout(timer);
      for (const link of links.values()) link.off("up", onUp);
    };
    const timer = setTimeout(() => {
      finish();
      reject(new Error(`tunnels not up within ${timeoutMs} ms`));
    }, timeoutMs);
    for (const link of links.values()) link.on("up", onUp);
  });
}
