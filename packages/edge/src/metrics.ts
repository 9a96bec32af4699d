// Prometheus metrics of a running edge (opt-in: `metricsListen`), served on GET /metrics with
// prom-client. Every value is read from the agent's own counters at scrape time, so nothing on the
// mail path pays for metrics; counters restart from zero with the agent, as Prometheus expects.
import http from "node:http";
import type { AddressInfo } from "node:net";
import type { HostPort, Logger } from "@mxtunnel/shared";
import { Counter, collectDefaultMetrics, Gauge, Registry } from "prom-client";
import type { ForwardListener } from "./forward-listener.js";
import type { OutboundQueue } from "./outbound-queue.js";
import type { SpoolDrain } from "./spool-drain.js";
import type { SpoolServer } from "./spool-server.js";
import type { SpoolStore } from "./spool-store.js";
import type { EdgeState } from "./state.js";
import type { TunnelServer } from "./tunnel-server.js";

export interface MetricsSources {
  state: EdgeState;
  tunnels: TunnelServer;
  listeners: () => readonly { service: string; listener: ForwardListener }[];
  spoolStore: SpoolStore;
  spoolServer: SpoolServer;
  drain: SpoolDrain;
  outbound: OutboundQueue;
}

/** A counter whose value is copied from a source at scrape time. */
function mirror<T extends string>(counter: Counter<T>, values: () => [Partial<Record<T, string>>, number][]) {
  counter.reset();
  for (const [labels, value] of values()) counter.inc(labels as Record<T, string>, value);
}

export function edgeRegistry(sources: MetricsSources): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: "mxtunnel_edge_" });
  const { tunnels, state } = sources;
  const homeName = (publicKey: string) => state.homes().find((h) => h.publicKey === publicKey)?.name ?? "?";

  new Gauge({
    name: "mxtunnel_edge_sessions_active",
    help: "Public connections open now, per listener service.",
    labelNames: ["service"],
    registers: [registry],
    collect() {
      this.reset();
      for (const { service, listener } of sources.listeners()) this.inc({ service }, listener.liveSessions);
    },
  });
  new Counter({
    name: "mxtunnel_edge_sessions_total",
    help: "Public connections accepted, by what became of them (spliced live, served by the spool or closed, over a limit).",
    labelNames: ["service", "outcome"],
    registers: [registry],
    collect() {
      mirror(this, () =>
        sources.listeners().flatMap(({ service, listener: l }): [Record<string, string>, number][] => [
          [{ service, outcome: "spliced" }, l.counters.spliced],
          [{ service, outcome: "not_live" }, l.counters.fallbacks],
          [{ service, outcome: "over_limit" }, l.counters.overLimit],
        ]),
      );
    },
  });
  new Gauge({
    name: "mxtunnel_edge_tunnel_up",
    help: "1 while the paired home's tunnel is up, 0 while it is down.",
    labelNames: ["home"],
    registers: [registry],
    collect() {
      this.reset();
      for (const home of state.homes()) {
        const tunnel = tunnels.tunnelOf(home.publicKey);
        this.set({ home: home.name }, tunnel && !tunnel.mux.closed ? 1 : 0);
      }
    },
  });
  new Gauge({
    name: "mxtunnel_edge_tunnel_rtt_seconds",
    help: "Last measured round trip of the home's tunnel (PING/PONG).",
    labelNames: ["home"],
    registers: [registry],
    collect() {
      this.reset();
      for (const tunnel of tunnels.liveTunnels()) {
        const rtt = tunnel.mux.lastRttMs;
        if (rtt !== undefined) this.set({ home: tunnel.home.name }, rtt / 1000);
      }
    },
  });
  new Counter({
    name: "mxtunnel_edge_tunnel_bytes_total",
    help: "Bytes through the home's current tunnel (frames, before encryption); restarts with each tunnel.",
    labelNames: ["home", "direction"],
    registers: [registry],
    collect() {
      mirror(this, () =>
        tunnels.liveTunnels().flatMap((t): [Record<string, string>, number][] => {
          const stats = t.mux.stats();
          return [
            [{ home: homeName(t.home.publicKey), direction: "sent" }, stats.bytesSent],
            [{ home: homeName(t.home.publicKey), direction: "received" }, stats.bytesReceived],
          ];
        }),
      );
    },
  });
  new Counter({
    name: "mxtunnel_edge_tunnels_opened_total",
    help: "Tunnels that authenticated (reconnects included).",
    registers: [registry],
    collect() {
      mirror(this, () => [[{}, tunnels.counters.tunnelsOpened]]);
    },
  });
  new Counter({
    name: "mxtunnel_edge_handshake_failures_total",
    help: "Tunnel and pairing handshakes that failed or were refused, by reason.",
    labelNames: ["reason"],
    registers: [registry],
    collect() {
      mirror(this, () => [
        [{ reason: "failed" }, tunnels.counters.handshakesFailed],
        [{ reason: "version" }, tunnels.counters.handshakesRefused],
        [{ reason: "rate_limited" }, tunnels.counters.rateLimited],
      ]);
    },
  });
  new Gauge({
    name: "mxtunnel_edge_queue_messages",
    help: "Messages waiting: spool (inbound, for home) and outbound (for remote servers).",
    labelNames: ["queue"],
    registers: [registry],
    collect() {
      this.set({ queue: "spool" }, sources.spoolStore.size);
      this.set({ queue: "outbound" }, sources.outbound.size);
    },
  });
  new Gauge({
    name: "mxtunnel_edge_queue_oldest_seconds",
    help: "Age of the oldest waiting message per queue (0 when empty).",
    labelNames: ["queue"],
    registers: [registry],
    collect() {
      const now = Date.now();
      const spool = sources.spoolStore.list().map((e) => (now - e.receivedAt) / 1000);
      const outbound = sources.outbound.entriesList().map((e) => e.ageSeconds);
      this.set({ queue: "spool" }, Math.max(0, ...spool));
      this.set({ queue: "outbound" }, Math.max(0, ...outbound));
    },
  });
  new Counter({
    name: "mxtunnel_edge_spooled_total",
    help: "Inbound messages written to the spool while home could not take them live.",
    registers: [registry],
    collect() {
      mirror(this, () => [[{}, sources.spoolServer.counters.spooled]]);
    },
  });
  new Counter({
    name: "mxtunnel_edge_deliveries_total",
    help: "Delivery attempts' outcomes: queue=spool (to home's Postfix) or outbound (to remote servers).",
    labelNames: ["queue", "result"],
    registers: [registry],
    collect() {
      const d = sources.drain.counters;
      const o = sources.outbound.counters;
      mirror(this, () => [
        [{ queue: "spool", result: "delivered" }, d.delivered],
        [{ queue: "spool", result: "deferred" }, d.deferred],
        [{ queue: "spool", result: "rejected" }, d.rejected],
        [{ queue: "outbound", result: "delivered" }, o.delivered],
        [{ queue: "outbound", result: "failed" }, o.failed],
        [{ queue: "outbound", result: "dsn" }, o.dsns],
      ]);
    },
  });
  new Counter({
    name: "mxtunnel_edge_relayed_total",
    help: "Relay streams from homes, by what the edge answered.",
    labelNames: ["result"],
    registers: [registry],
    collect() {
      const o = sources.outbound.counters;
      mirror(this, () => [
        [{ result: "queued" }, o.queued],
        [{ result: "duplicate" }, o.duplicates],
        [{ result: "rejected" }, o.rejected],
        [{ result: "deferred" }, o.deferred],
      ]);
    },
  });
  return registry;
}

/** Serves the registry on GET /metrics; anything else is 404. */
export async function startMetricsServer(
  listen: HostPort,
  registry: Registry,
  logger: Logger,
): Promise<{ address: AddressInfo; stop(): Promise<void> }> {
  const server = http.createServer((req, res) => {
    if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
      res.writeHead(404, { "content-type": "text/plain" }).end("try /metrics\n");
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { "content-type": registry.contentType }).end(text),
      (error: Error) => {
        logger.warn({ err: error.message }, "metrics collection failed");
        res.writeHead(500, { "content-type": "text/plain" }).end("metrics collection failed\n");
      },
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(listen.port, listen.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  logger.info({ metrics: `${address.address}:${address.port}` }, "metrics served on /metrics");
  return {
    address,
    stop: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
