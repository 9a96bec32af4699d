// Decides whether an e2e suite can run. A missing tool fails the run under CI=true (a suite that
// silently skips in CI proves nothing) and elsewhere warns loudly, so the caller can skip.
import { accessSync, constants } from "node:fs";
import path from "node:path";

/** Binaries each tool name stands for; "root" is a pseudo-tool for suites that need uid 0. */
const binariesOf: Record<string, string[]> = {
  postfix: ["postfix", "postconf"],
  dovecot: ["dovecot", "doveadm"],
  swaks: ["swaks"],
  openssl: ["openssl"],
  socat: ["socat"],
};

const sbinFallback = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/** Absolute path of an executable, searching $PATH and then the sbin folders root's PATH may lack. */
export function findTool(name: string): string | undefined {
  const dirs = [...(process.env.PATH ?? "").split(path.delimiter).filter(Boolean), ...sbinFallback];
  for (const dir of dirs) {
    const candidate = path.join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Like findTool, but throws a sentence naming the package to install. */
export function toolPath(name: string): string {
  const found = findTool(name);
  if (found === undefined) throw new Error(`${name} is not installed (see .ci/run for the apt packages)`);
  return found;
}

export function missingTools(tools: readonly string[]): string[] {
  const missing: string[] = [];
  for (const tool of tools) {
    if (tool === "root") {
      if (process.getuid?.() !== 0) missing.push("root (the lab runs Postfix/Dovecot and useradd as uid 0)");
      continue;
    }
    for (const binary of binariesOf[tool] ?? [tool]) {
      if (findTool(binary) === undefined) missing.push(binary === tool ? tool : `${binary} (from ${tool})`);
    }
  }
  return missing;
}

/**
 * True when every tool is present. Otherwise: throws under CI=true; elsewhere prints a warning block to
 * stderr and returns false, for `describe.skipIf(!requireTools([...]))`.
 */
export function requireTools(tools: readonly string[], suite = "e2e suite"): boolean {
  const missing = missingTools(tools);
  if (missing.length === 0) return true;
  const lines = [
    `${suite}: missing ${missing.join(", ")}.`,
    "Install with: apt-get install postfix swaks dovecot-imapd socat python3-dkim openssl (see .ci/run).",
  ];
  if (process.env.CI === "true") {
    throw new Error(`${lines.join(" ")} CI=true: refusing to skip.`);
  }
  const bar = "!".repeat(78);
  process.stderr.write(
    `\n${bar}\n!! SKIPPING ${suite}\n${lines.map((l) => `!! ${l}`).join("\n")}\n!! These tests did NOT run.\n${bar}\n\n`,
  );
  return false;
}
