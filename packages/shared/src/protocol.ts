// Protocol identity: what goes on the WebSocket handshake and into Noise prologues.
// A change to the wire format bumps PROTOCOL_VERSION; the edge and home refuse each other with a
// sentence naming both versions instead of failing handshakes in a loop.
// v2: several frames per Noise transport message (BATCH, see wire.ts) and a 1 MiB implicit stream credit.

export const PROTOCOL_VERSION = 2;
export const SUBPROTOCOL = `mxtunnel.v${PROTOCOL_VERSION}`;
export const TUNNEL_PATH = "/tunnel";
export const PAIR_PATH = "/pair";
export const TUNNEL_PROLOGUE = new TextEncoder().encode(`mxtunnel/${PROTOCOL_VERSION} tunnel`);
export const PAIR_PROLOGUE = new TextEncoder().encode(`mxtunnel/${PROTOCOL_VERSION} pair`);
/** Header the edge sets on a refused upgrade so home can name both versions. */
export const SUPPORTED_HEADER = "x-mxtunnel-supported";
/** ws options both sides use: a Noise message is at most 65535 bytes; compression would leak lengths and cost CPU. */
export const WS_MAX_PAYLOAD = 65535;
/** The software version each agent reports to the other. */
export const AGENT_VERSION = "0.1.0";

/** WebSocket close codes of our own (4000-4999 are for applications). */
export const CloseCode = {
  REPLACED: 4000,
  AUTH_TIMEOUT: 4001,
  HANDSHAKE_FAILED: 4002,
  UNKNOWN_PEER: 4003,
  TOKEN_REFUSED: 4004,
  UNPAIRED: 4005,
  SHUTDOWN: 4006,
} as const;

/** Parses "mxtunnel.vN" offers from a Sec-WebSocket-Protocol header value. */
export function offeredVersions(header: string | undefined): number[] {
  if (!header) return [];
  const versions: number[] = [];
  for (const part of header.split(",")) {
    const match = /^mxtunnel\.v(\d{1,4})$/.exec(part.trim());
    if (match?.[1]) versions.push(Number(match[1]));
  }
  return versions;
}

/** The sentence both sides print when versions differ. */
export function versionMismatchMessage(
  local: { role: string; version: number },
  remote: { role: string; versions: number[] },
): string {
  const remoteText = remote.versions.length
    ? remote.versions.map((v) => `mxtunnel.v${v}`).join(", ")
    : "no mxtunnel protocol";
  const remoteMax = Math.max(0, ...remote.versions);
  const older = remoteMax < local.version ? remote.role : local.role;
  return `protocol version mismatch: this ${local.role} speaks mxtunnel.v${local.version}, the ${remote.role} speaks ${remoteText}; upgrade mxtunnel on the ${older}`;
}
