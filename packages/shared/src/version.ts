// Which peer versions an agent works with. The wire protocol has its own number (protocol.ts) and a
// mismatch there refuses the tunnel; this is the softer check on the software version each side
// reports, shown as one line by `status` and `doctor` instead of a failure loop.
import { AGENT_VERSION } from "./protocol.js";

function parse(version: string): [number, number, number] | undefined {
  const match = /^(\d+)\.(\d+)\.(\d+)/.exec(version);
  return match ? [Number(match[1]), Number(match[2]), Number(match[3])] : undefined;
}

/**
 * null when `peer` is within the range this version supports (same major; before 1.0, the same
 * minor), otherwise the sentence to show, naming both versions and which side to upgrade.
 */
export function peerVersionProblem(
  peer: string | null | undefined,
  peerRole: "edge" | "home",
  local = AGENT_VERSION,
): string | null {
  if (!peer) return null;
  const ours = parse(local);
  const theirs = parse(peer);
  const localRole = peerRole === "edge" ? "home" : "edge";
  if (!ours || !theirs)
    return `the ${peerRole} reports version "${peer}", which this ${localRole} cannot read`;
  const compatible = ours[0] === theirs[0] && (ours[0] > 0 || ours[1] === theirs[1]);
  if (compatible) return null;
  const older = theirs[0] < ours[0] || (theirs[0] === ours[0] && theirs[1] < ours[1]) ? peerRole : localRole;
  return `version mismatch: this ${localRole} runs mxtunnel ${local}, the ${peerRole} runs ${peer} (supported: ${ours[0]}.${ours[0] > 0 ? "x" : `${ours[1]}.x`}); upgrade the ${older}`;
}
