// What both CLIs share: turning failures into one clear line (never a stack trace for an error we
// expect), reading a config file with flag overrides, printing a result as text or --json, and
// shutting down on SIGTERM/SIGINT.
import { readFile } from "node:fs/promises";
import { type DoctorCheck, doctorFailed, renderDoctor } from "./doctor-report.js";
import { ConfigError, isMxtunnelError } from "./errors.js";

/** Prints an error for a human and returns the exit code to use. */
export function reportCliError(
  program: string,
  error: unknown,
  stderr: NodeJS.WritableStream = process.stderr,
): number {
  if (error instanceof ConfigError) {
    stderr.write(`${program}: invalid configuration:\n${error.problems.map((p) => `  ${p}`).join("\n")}\n`);
    return 2;
  }
  if (isMxtunnelError(error)) {
    stderr.write(`${program}: ${error.message} [${error.code}]\n`);
    return 1;
  }
  const errno = error as NodeJS.ErrnoException;
  if (errno && typeof errno.code === "string" && typeof errno.message === "string") {
    stderr.write(`${program}: ${errno.message}\n`);
    return 1;
  }
  if (error instanceof Error) {
    // Unexpected: keep the stack, that is what a bug report needs.
    stderr.write(`${program}: ${error.message}\n${process.env.MXTUNNEL_DEBUG ? `${error.stack}\n` : ""}`);
    return 1;
  }
  stderr.write(`${program}: ${String(error)}\n`);
  return 1;
}

/** Reads a JSON config file; a missing or unreadable file becomes a ConfigError naming it. */
export async function readConfigFile(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new ConfigError([
      `${path}: ${code === "ENOENT" ? "file not found (run init first, or check --dir)" : (error as Error).message}`,
    ]);
  }
  try {
    const value: unknown = JSON.parse(text);
    if (!value || typeof value !== "object" || Array.isArray(value))
      throw new Error("the top level must be a JSON object");
    return value as Record<string, unknown>;
  } catch (error) {
    throw new ConfigError([`${path}: not valid JSON: ${(error as Error).message}`]);
  }
}

/** Writes a command's result to stdout: indented JSON with --json, otherwise the text `render` makes. */
export function printResult<T>(value: T, json: boolean | undefined, render: (value: T) => string): void {
  process.stdout.write(json ? `${JSON.stringify(value, null, 2)}\n` : `${render(value)}\n`);
}

/** Writes `doctor`'s checks (with --json: the checks and whether one failed); exit code 1 on a failure. */
export function printDoctor(title: string, checks: readonly DoctorCheck[], json: boolean | undefined): void {
  printResult({ checks, failed: doctorFailed(checks) }, json, () => renderDoctor(title, checks));
  if (doctorFailed(checks)) process.exitCode = 1;
}

/** Sets `value` at a dotted path in a plain object (flags override config keys). */
export function setConfigPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const keys = path.split(".");
  let node = target;
  for (const key of keys.slice(0, -1)) {
    const next = node[key];
    if (!next || typeof next !== "object") node[key] = {};
    node = node[key] as Record<string, unknown>;
  }
  node[keys[keys.length - 1]!] = value;
}

/** An AbortSignal that fires on SIGTERM or SIGINT; a second signal exits at once. */
export function shutdownSignal(onSecond: () => void = () => process.exit(130)): AbortSignal {
  const controller = new AbortController();
  const handler = () => {
    if (controller.signal.aborted) onSecond();
    else controller.abort();
  };
  process.on("SIGTERM", handler);
  process.on("SIGINT", handler);
  return controller.signal;
}

export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}
