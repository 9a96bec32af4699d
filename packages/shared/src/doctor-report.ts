// What `doctor` prints on both sides: one line per check, pass / warn / fail, and for anything not
// passing the fix. The exit code is 1 when any check failed.

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
