// What `doctor` prints on both sides: one line per check, pass / warn / fail, and for anything not
// passing the fix. The exit code is 1 when any check failed. Also the checks both sides make of a
// connected peer: the tunnel's RTT, the clock skew and the peer's version.
import { CLOCK_SKEW_FAIL_MS, CLOCK_SKEW_WARN_MS } from "./clock.js";
import { peerVersionProblem } from "./version.js";

export type DoctorLevel = "pass" | "warn" | "fail" | "skip";

export interface DoctorCheck {
  level: DoctorLevel;
  /** Short name of the check: "mx", "ptr", "spf", "tunnel", … */
  check: string;
  message: string;
  fix?: string;
}

export function doctorCheck(level: DoctorLevel, name: string, message: string, fix?: string): DoctorCheck {
  return fix === undefined ? { level, check: name, message } : { level, check: name, message, fix };
}

export function renderDoctor(title: string, checks: readonly DoctorCheck[]): string {
  const lines = [title, ""];
  for (const c of checks) {
    lines.push(`${c.level.toUpperCase().padEnd(5)} ${c.check.padEnd(9)} ${c.message}`);
    if (c.fix && c.level !== "pass") lines.push(`${" ".repeat(16)}fix: ${c.fix}`);
  }
  const count = (level: DoctorLevel) => checks.filter((c) => c.level === level).length;
  lines.push(
    "",
    `${count("pass")} passed, ${count("warn")} warnings, ${count("fail")} failed, ${count("skip")} skipped`,
  );
  return lines.join("\n");
}

export function doctorFailed(checks: readonly DoctorCheck[]): boolean {
  return checks.some((c) => c.level === "fail");
}

/** How far the peer's clock is off; `olderPeer` names what may be too old to answer the request. */
export function clockCheck(who: string, skewMs: number | null, olderPeer: string): DoctorCheck {
  if (skewMs === null)
    return doctorCheck(
      "skip",
      "clock",
      `${who}: clock not compared (no answer to the time request; an older ${olderPeer}?)`,
    );
  const text = `${who}'s clock is ${Math.abs(skewMs)} ms ${skewMs >= 0 ? "ahead" : "behind"}`;
  const fix = "run NTP on both machines (systemd-timesyncd or chrony)";
  if (Math.abs(skewMs) > CLOCK_SKEW_FAIL_MS) return doctorCheck("fail", "clock", text, fix);
  if (Math.abs(skewMs) > CLOCK_SKEW_WARN_MS) return doctorCheck("warn", "clock", text, fix);
  return doctorCheck("pass", "clock", text);
}

/** The line `status` lists among its warnings when the last measured skew fails clockCheck (else null). */
export function clockSkewWarning(who: string, skewMs: number | null): string | null {
  if (skewMs === null) return null;
  const check = clockCheck(who, skewMs, "peer");
  return check.level === "pass" ? null : `${check.message}: ${check.fix}`;
}

/** The checks of a peer whose tunnel is up, as the running agent measured it (`who` names it). */
export function connectedPeerChecks(
  who: string,
  peer: { rttMs: number | null; clockSkewMs: number | null; peerVersion: string | null },
  peerRole: "edge" | "home",
  olderPeer: string,
): DoctorCheck[] {
  const out = [
    doctorCheck(
      "pass",
      "tunnel",
      `${who}: tunnel up, RTT ${peer.rttMs === null ? "?" : `${peer.rttMs.toFixed(1)} ms`}`,
    ),
    clockCheck(who, peer.clockSkewMs, olderPeer),
  ];
  const problem = peerVersionProblem(peer.peerVersion, peerRole);
  if (problem) out.push(doctorCheck("warn", "version", `${who}: ${problem}`));
  return out;
}
