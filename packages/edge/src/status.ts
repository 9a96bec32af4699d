// What `mxtunnel-edge status` reports, as one JSON shape (the human table is rendered from it).
import { AGENT_VERSION, type EdgeConfig } from "@mxtunnel/shared";
import type { ForwardListener } from "./forward-listener.js";
import type { RecipientStore } from "./recipients.js";
import type { SpoolStore } from "./spool-store.js";
import type { EdgeState } from "./state.js";
import type { TunnelServer } from "./tunnel-server.js";

export interface EdgeStatus {
  agent: "edge";
  version: string;
  running: boolean;
  hostname: string;
  fingerprint: string;
  domains: string[];
  uptimeSeconds: number | null;
  homes: {
    name: string;
    fingerprint: string;
    domains: string[];
    connected: boolean;
    connectedSince: string | null;
    remoteAddress: string | null;
    rttMs: number | null;
    sessions: number;
    peerVersion: string | null;
    /** The recipient list home last synced (null: none yet, RCPT gets 450 while spooling). */
    recipients: { version: number; count: number; syncedAt: string } | null;
  }[];
  sessions: { live: number; accepted: number; spliced: number; fallbacks: number; overLimit: number };
  queues: { spool: number; outbound: number };
  handshakes: { failed: number; refused: number; rateLimited: number; pending: number };
}

export function edgeStatus(input: {
  state: EdgeState;
  config: EdgeConfig;
  running?: {
    startedAt: number;
    tunnels: TunnelServer;
    listeners: ForwardListener[];
    spool?: SpoolStore;
    recipients?: RecipientStore;
  };
}): EdgeStatus {
  const { state, config, running } = input;
  const sum = (pick: (l: ForwardListener) => number) =>
    (running?.listeners ?? []).reduce((n, l) => n + pick(l), 0);
  return {
    agent: "edge",
    version: AGENT_VERSION,
    running: running !== undefined,
    hostname: config.hostname,
    fingerprint: state.fingerprint,
    domains: config.domains,
    uptimeSeconds: running ? Math.round((Date.now() - running.startedAt) / 1000) : null,
    homes: state.homes().map((home) => {
      const tunnel = running?.tunnels.tunnelOf(home.publicKey);
      return {
        name: home.name,
        fingerprint: home.fingerprint,
        domains: home.domains,
        connected: tunnel !== undefined && !tunnel.mux.closed,
        connectedSince: tunnel ? new Date(tunnel.connectedAt).toISOString() : null,
        remoteAddress: tunnel?.remoteAddress ?? null,
        rttMs: tunnel?.mux.lastRttMs ?? null,
        sessions: tunnel?.mux.stats().openStreams ?? 0,
        peerVersion: tunnel?.peerVersion ?? null,
        recipients: running?.recipients?.info(home.publicKey) ?? null,
      };
    }),
    sessions: {
      live: sum((l) => l.liveSessions),
      accepted: sum((l) => l.counters.accepted),
      spliced: sum((l) => l.counters.spliced),
      fallbacks: sum((l) => l.counters.fallbacks),
      overLimit: sum((l) => l.counters.overLimit),
    },
    queues: { spool: running?.spool?.size ?? 0, outbound: 0 },
    handshakes: {
      failed: running?.tunnels.counters.handshakesFailed ?? 0,
      refused: running?.tunnels.counters.handshakesRefused ?? 0,
      rateLimited: running?.tunnels.counters.rateLimited ?? 0,
      pending: running?.tunnels.pendingHandshakes ?? 0,
    },
  };
}

export function renderEdgeStatus(status: EdgeStatus): string {
  const lines = [
    `mxtunnel-edge ${status.version}  ${status.hostname}  ${status.running ? `running ${status.uptimeSeconds}s` : "not running"}`,
    `key ${status.fingerprint}   domains ${status.domains.join(", ")}`,
    "",
    status.homes.length
      ? "HOME                 CONNECTED  RTT     SESSIONS  SINCE"
      : "no homes paired yet: `mxtunnel-edge pair --dir …`",
  ];
  for (const home of status.homes) {
    lines.push(
      `${home.name.padEnd(20)} ${(home.connected ? "yes" : "no").padEnd(10)} ${(home.rttMs === null ? "-" : `${home.rttMs.toFixed(1)}ms`).padEnd(7)} ${String(home.sessions).padEnd(9)} ${home.connectedSince ?? "-"}`,
    );
  }
  if (status.running) {
    lines.push(
      "",
      `sessions live ${status.sessions.live}, accepted ${status.sessions.accepted}, spliced ${status.sessions.spliced}, not served live ${status.sessions.fallbacks}, over limit ${status.sessions.overLimit}`,
    );
  }
  return lines.join("\n");
}
