// What `mxtunnel-home status` reports: one JSON shape, and a compact table rendered from it.
import { AGENT_VERSION } from "@mxtunnel/shared";
import type { EdgeLink, EdgeLinkStatus } from "./edge-link.js";
import type { HomeState } from "./state.js";

export interface HomeStatus {
  agent: "home";
  version: string;
  running: boolean;
  fingerprint: string;
  uptimeSeconds: number | null;
  edges: EdgeLinkStatus[];
}

export function homeStatus(input: {
  state: HomeState;
  running?: { startedAt: number; links: ReadonlyMap<string, EdgeLink> };
}): HomeStatus {
  const { state, running } = input;
  return {
    agent: "home",
    version: AGENT_VERSION,
    running: running !== undefined,
    fingerprint: state.fingerprint,
    uptimeSeconds: running ? Math.round((Date.now() - running.startedAt) / 1000) : null,
    edges: state.edges().map(
      (edge) =>
        running?.links.get(edge.publicKey)?.status() ?? {
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
        },
    ),
  };
}

export function renderHomeStatus(status: HomeStatus): string {
  const lines = [
    `mxtunnel-home ${status.version}  ${status.running ? `running ${status.uptimeSeconds}s` : "not running"}  key ${status.fingerprint}`,
    "",
    status.edges.length
      ? "EDGE                         CONNECTED  RTT      SINCE / LAST ERROR"
      : "no edge paired yet: `mxtunnel-home pair - --dir …`",
  ];
  for (const edge of status.edges) {
    lines.push(
      `${edge.hostname.padEnd(28)} ${(edge.connected ? "yes" : "no").padEnd(10)} ${(edge.rttMs === null ? "-" : `${edge.rttMs.toFixed(1)}ms`).padEnd(8)} ${edge.connectedSince ?? edge.lastError ?? "-"}`,
    );
  }
  return lines.join("\n");
}
