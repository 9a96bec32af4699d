// What `mxtunnel-home status` reports: one JSON shape, and a compact table rendered from it.
import { AGENT_VERSION, clockSkewWarning, formatClockSkew, peerVersionProblem } from "@mxtunnel/shared";
import type { EdgeLink, EdgeLinkStatus } from "./edge-link.js";
import type { HomeDailyCounts, HomeMonitor } from "./monitor.js";
import type { SpoolKeyRing, SpoolKeyStatus } from "./spool-keys.js";
import type { HomeState } from "./state.js";

/** An edge away this long is a warning (its inbound mail is spooled there meanwhile). */
export const EDGE_DOWN_WARNING_MS = 15 * 60_000;

export interface HomeEdgeStatus extends EdgeLinkStatus {
  /** The edge's clock minus home's, in ms, as last measured (null: not connected or not answered). */
  clockSkewMs: number | null;
  /** While disconnected: since when (the agent's start if it has not connected since). */
  downSince: string | null;
  /** One sentence when the edge's version is outside the range this home supports. */
  versionProblem: string | null;
}

export interface HomeStatus {
  agent: "home";
  version: string;
  running: boolean;
  fingerprint: string;
  uptimeSeconds: number | null;
  edges: HomeEdgeStatus[];
  /** Since UTC midnight (or since the agent started, if later). Null when not running. */
  today: HomeDailyCounts | null;
  spoolKeys: SpoolKeyStatus | null;
  warnings: string[];
  lastErrors: { at: string; message: string }[];
}

export function homeStatus(input: {
  state: HomeState;
  running?: { startedAt: number; links: ReadonlyMap<string, EdgeLink>; monitor?: HomeMonitor };
  spoolKeys?: SpoolKeyRing;
  now?: number;
}): HomeStatus {
  const { state, running } = input;
  const now = input.now ?? Date.now();
  const edges: HomeEdgeStatus[] = state.edges().map((edge) => {
    const link = running?.links.get(edge.publicKey);
    const base: EdgeLinkStatus = link?.status() ?? {
      url: edge.url,
      hostname: edge.hostname,
      fingerprint: edge.fingerprint,
      domains: edge.domains,
      connected: false,
      connectedSince: null,
      rttMs: null,
      peerVersion: null,
      attempts: 0,
      lastError: null,
    };
    const downSince =
      running && link && !base.connected ? (running.monitor?.edgeDownSince(link) ?? running.startedAt) : null;
    return {
      ...base,
      clockSkewMs: link && base.connected ? (running?.monitor?.clockSkewMs(link) ?? null) : null,
      downSince: downSince === null ? null : new Date(downSince).toISOString(),
      versionProblem: peerVersionProblem(base.peerVersion, "edge"),
    };
  });
  const spoolKeys = input.spoolKeys?.status(state.edges()) ?? null;
  const warnings: string[] = [];
  if (!running)
    warnings.push(
      "the home agent is not running: the edges spool inbound mail, outbound mail waits in Postfix",
    );
  for (const edge of edges) {
    if (edge.downSince && now - Date.parse(edge.downSince) >= EDGE_DOWN_WARNING_MS)
      warnings.push(
        `no tunnel to ${edge.hostname} since ${edge.downSince}${edge.lastError ? ` (${edge.lastError})` : ""}`,
      );
    if (edge.versionProblem) warnings.push(`${edge.hostname}: ${edge.versionProblem}`);
    const skew = clockSkewWarning(edge.hostname, edge.clockSkewMs);
    if (skew) warnings.push(skew);
  }
  if (running && edges.length > 0 && edges.every((e) => !e.connected))
    warnings.push("no edge is connected: outbound mail is deferred (Postfix retries)");
  for (const old of spoolKeys?.retiring ?? []) {
    if (old.waitingFor.length)
      warnings.push(
        `old spool key ${old.id} kept until ${old.waitingFor.join(", ")} confirm(s) no mail sealed to it remains`,
      );
  }
  return {
    agent: "home",
    version: AGENT_VERSION,
    running: running !== undefined,
    fingerprint: state.fingerprint,
    uptimeSeconds: running ? Math.round((now - running.startedAt) / 1000) : null,
    edges,
    today: running?.monitor?.today() ?? null,
    spoolKeys,
    warnings,
    lastErrors: running?.monitor?.recentErrors() ?? [],
  };
}

export function renderHomeStatus(status: HomeStatus): string {
  const lines = [
    `mxtunnel-home ${status.version}  ${status.running ? `running ${status.uptimeSeconds}s` : "not running"}  key ${status.fingerprint}`,
    "",
    status.edges.length
      ? "EDGE                         CONNECTED  RTT      CLOCK     VERSION   SINCE / LAST ERROR"
      : "no edge paired yet: `mxtunnel-home pair - --dir …`",
  ];
  for (const edge of status.edges) {
    const since = edge.connected
      ? edge.connectedSince
      : [edge.downSince ? `down since ${edge.downSince}` : null, edge.lastError].filter(Boolean).join(": ");
    lines.push(
      `${edge.hostname.padEnd(28)} ${(edge.connected ? "yes" : "no").padEnd(10)} ${(edge.rttMs === null ? "-" : `${edge.rttMs.toFixed(1)}ms`).padEnd(8)} ${formatClockSkew(edge.clockSkewMs).padEnd(9)} ${(edge.peerVersion ?? "-").padEnd(9)} ${since || "-"}`,
    );
  }
  if (status.today) {
    const t = status.today;
    lines.push(
      "",
      `today    in: ${t.forwarded} forwarded live, ${t.injectedFromSpool} from the spool; out: ${t.relayed} relayed, ${t.relayRefused} refused or deferred`,
    );
  }
  if (status.spoolKeys)
    lines.push(
      `spool key ${status.spoolKeys.current}${status.spoolKeys.retiring.length ? ` (retiring ${status.spoolKeys.retiring.map((r) => r.id).join(", ")})` : ""}`,
    );
  for (const warning of status.warnings) lines.push(`WARNING  ${warning}`);
  if (status.lastErrors.length) {
    lines.push("", "last errors:");
    for (const error of status.lastErrors.slice(0, 5)) lines.push(`  ${error.at}  ${error.message}`);
  }
  return lines.join("\n");
}
