// What `mxtunnel-edge status` reports, as one JSON shape (the human table is rendered from it).
import {
  AGENT_VERSION,
  clockSkewWarning,
  type EdgeConfig,
  formatClockSkew,
  peerVersionProblem,
} from "@mxtunnel/shared";
import type { ForwardListener } from "./forward-listener.js";
import type { DailyCounts, EdgeMonitor, RecentError } from "./monitor.js";
import type { OutboundQueue } from "./outbound-queue.js";
import type { RecipientStore } from "./recipients.js";
import type { SpoolStore } from "./spool-store.js";
import type { EdgeState } from "./state.js";
import type { TunnelServer } from "./tunnel-server.js";

export interface QueueSummary {
  messages: number;
  /** Age of the oldest message in seconds (null: empty). */
  oldestSeconds: number | null;
}

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
    /** While disconnected: since when (the agent's start if the home has not connected since). */
    downSince: string | null;
    remoteAddress: string | null;
    rttMs: number | null;
    /** The home's clock minus the edge's, in ms, as last measured (null: not connected or not answered). */
    clockSkewMs: number | null;
    sessions: number;
    peerVersion: string | null;
    /** One sentence when the home's version is outside the range this edge supports. */
    versionProblem: string | null;
    /** The recipient list home last synced (null: none yet, RCPT gets 450 while spooling). */
    recipients: { version: number; count: number; syncedAt: string } | null;
  }[];
  sessions: { live: number; accepted: number; spliced: number; fallbacks: number; overLimit: number };
  /** Message counts: `spool` and `outbound` are the queue lengths (kept for scripts), details below. */
  queues: { spool: number; outbound: number; details: { spool: QueueSummary; outbound: QueueSummary } };
  /** Since UTC midnight (or since the agent started, if later). Null when not running. */
  today: DailyCounts | null;
  handshakes: { failed: number; refused: number; rateLimited: number; pending: number };
  /** bytes free under the state directory, as last measured (null: unknown). */
  freeBytes: number | null;
  warnings: string[];
  lastErrors: RecentError[];
}

export interface RunningEdge {
  startedAt: number;
  tunnels: TunnelServer;
  listeners: ForwardListener[];
  spool?: SpoolStore;
  recipients?: RecipientStore;
  outbound?: OutboundQueue;
  monitor?: EdgeMonitor;
  freeBytes?: number | null;
}

export function edgeStatus(input: {
  state: EdgeState;
  config: EdgeConfig;
  running?: RunningEdge;
  /** Queue summaries read from disk when the agent is not running. */
  offlineQueues?: { spool: QueueSummary; outbound: QueueSummary };
  freeBytes?: number | null;
  now?: number;
}): EdgeStatus {
  const { state, config, running } = input;
  const now = input.now ?? Date.now();
  const sum = (pick: (l: ForwardListener) => number) =>
    (running?.listeners ?? []).reduce((n, l) => n + pick(l), 0);
  const homes = state.homes().map((home) => {
    const tunnel = running?.tunnels.tunnelOf(home.publicKey);
    const connected = tunnel !== undefined && !tunnel.mux.closed;
    const downSince =
      !running || connected ? null : (running.monitor?.homeDownSince(home.publicKey) ?? running.startedAt);
    const peerVersion = tunnel?.peerVersion ?? null;
    return {
      name: home.name,
      fingerprint: home.fingerprint,
      domains: home.domains,
      connected,
      connectedSince: tunnel ? new Date(tunnel.connectedAt).toISOString() : null,
      downSince: downSince === null ? null : new Date(downSince).toISOString(),
      remoteAddress: tunnel?.remoteAddress ?? null,
      rttMs: tunnel?.mux.lastRttMs ?? null,
      clockSkewMs: connected ? (running?.monitor?.clockSkewMs(home.publicKey) ?? null) : null,
      sessions: tunnel?.mux.stats().openStreams ?? 0,
      peerVersion,
      versionProblem: peerVersionProblem(peerVersion, "home"),
      recipients: running?.recipients?.info(home.publicKey) ?? null,
    };
  });
  const summary = (ages: number[]): QueueSummary => ({
    messages: ages.length,
    oldestSeconds: ages.length ? Math.max(...ages) : null,
  });
  const details = running
    ? {
        spool: summary(
          (running.spool?.list() ?? []).map((e) => Math.max(0, Math.round((now - e.receivedAt) / 1000))),
        ),
        outbound: summary((running.outbound?.entriesList() ?? []).map((e) => e.ageSeconds)),
      }
    : (input.offlineQueues ?? { spool: summary([]), outbound: summary([]) });
  const freeBytes = running ? (running.freeBytes ?? null) : (input.freeBytes ?? null);

  const warnings: string[] = [];
  if (!running) warnings.push("the edge agent is not running: no mail is received");
  for (const home of homes) {
    if (home.downSince && now - Date.parse(home.downSince) >= config.checks.homeDownWarning)
      warnings.push(
        `home ${home.name} has been disconnected for ${formatDuration(now - Date.parse(home.downSince))} (since ${home.downSince}): inbound mail is spooled`,
      );
    if (home.versionProblem) warnings.push(`home ${home.name}: ${home.versionProblem}`);
    const skew = clockSkewWarning(`home ${home.name}`, home.clockSkewMs);
    if (skew) warnings.push(skew);
  }
  if (freeBytes !== null && freeBytes < config.checks.minFreeSpace)
    warnings.push(
      `only ${formatBytes(freeBytes)} free for the spool and queue (checks.minFreeSpace ${formatBytes(config.checks.minFreeSpace)}): ` +
        "at zero the edge answers 451 and mail waits at the senders",
    );
  for (const token of state.unusedTokens()) {
    const left = Date.parse(token.expiresAt) - now;
    if (left > 0 && left < 15 * 60_000)
      warnings.push(
        `a pairing token (domains ${token.domains.join(", ")}) expires unused in ${formatDuration(left)}`,
      );
  }
  const oldestSpool = details.spool.oldestSeconds;
  if (oldestSpool !== null && oldestSpool * 1000 > config.spool.maxAge / 2)
    warnings.push(
      `the oldest spooled message is ${formatDuration(oldestSpool * 1000)} old (given up after ${formatDuration(config.spool.maxAge)})`,
    );

  return {
    agent: "edge",
    version: AGENT_VERSION,
    running: running !== undefined,
    hostname: config.hostname,
    fingerprint: state.fingerprint,
    domains: config.domains,
    uptimeSeconds: running ? Math.round((now - running.startedAt) / 1000) : null,
    homes,
    sessions: {
      live: sum((l) => l.liveSessions),
      accepted: sum((l) => l.counters.accepted),
      spliced: sum((l) => l.counters.spliced),
      fallbacks: sum((l) => l.counters.fallbacks),
      overLimit: sum((l) => l.counters.overLimit),
    },
    queues: { spool: details.spool.messages, outbound: details.outbound.messages, details },
    today: running?.monitor?.today() ?? null,
    handshakes: {
      failed: running?.tunnels.counters.handshakesFailed ?? 0,
      refused: running?.tunnels.counters.handshakesRefused ?? 0,
      rateLimited: running?.tunnels.counters.rateLimited ?? 0,
      pending: running?.tunnels.pendingHandshakes ?? 0,
    },
    freeBytes,
    warnings,
    lastErrors: running?.monitor?.recentErrors() ?? [],
  };
}

export function renderEdgeStatus(status: EdgeStatus): string {
  const lines = [
    `mxtunnel-edge ${status.version}  ${status.hostname}  ${status.running ? `running ${formatDuration((status.uptimeSeconds ?? 0) * 1000)}` : "not running"}`,
    `key ${status.fingerprint}   domains ${status.domains.join(", ")}`,
    "",
    status.homes.length
      ? "HOME                 CONNECTED  RTT     CLOCK     SESSIONS  VERSION   SINCE"
      : "no homes paired yet: `mxtunnel-edge pair --dir …`",
  ];
  for (const home of status.homes) {
    const since = home.connected
      ? home.connectedSince
      : home.downSince
        ? `down since ${home.downSince}`
        : "-";
    lines.push(
      `${home.name.padEnd(20)} ${(home.connected ? "yes" : "no").padEnd(10)} ${(home.rttMs === null ? "-" : `${home.rttMs.toFixed(1)}ms`).padEnd(7)} ${formatClockSkew(home.clockSkewMs).padEnd(9)} ${String(home.sessions).padEnd(9)} ${(home.peerVersion ?? "-").padEnd(9)} ${since ?? "-"}`,
    );
  }
  const age = (q: QueueSummary) =>
    q.oldestSeconds === null ? "" : `, oldest ${formatDuration(q.oldestSeconds * 1000)}`;
  lines.push(
    "",
    `queues   spool ${status.queues.details.spool.messages}${age(status.queues.details.spool)}; outbound ${status.queues.details.outbound.messages}${age(status.queues.details.outbound)}`,
  );
  if (status.running) {
    lines.push(
      `sessions live ${status.sessions.live}, accepted ${status.sessions.accepted}, spliced ${status.sessions.spliced}, not served live ${status.sessions.fallbacks}, over limit ${status.sessions.overLimit}`,
    );
  }
  if (status.today) {
    const t = status.today;
    lines.push(
      `today    in: ${t.inboundSessions} sessions, ${t.spooled} spooled, ${t.drained} drained to home; out: ${t.relayed} relayed, ${t.delivered} delivered, ${t.failed} failed`,
    );
  }
  if (status.freeBytes !== null) lines.push(`disk     ${formatBytes(status.freeBytes)} free`);
  for (const warning of status.warnings) lines.push(`WARNING  ${warning}`);
  if (status.lastErrors.length) {
    lines.push("", "last errors:");
    for (const error of status.lastErrors.slice(0, 5)) lines.push(`  ${error.at}  ${error.message}`);
  }
  return lines.join("\n");
}

export function formatDuration(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${s % 60 ? `${s % 60}s` : ""}`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h${m % 60 ? `${m % 60}m` : ""}`;
  return `${Math.floor(h / 24)}d${h % 24 ? `${h % 24}h` : ""}`;
}

export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}
