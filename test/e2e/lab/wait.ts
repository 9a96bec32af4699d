// Waiting for conditions with deadlines: every wait in the e2e suite polls or listens, and every wait ends.

import { spawn } from "node:child_process";
import type { EventEmitter } from "node:events";
import { once } from "node:events";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import net from "node:net";
import { setTimeout as delay } from "node:timers/promises";

export class WaitTimeoutError extends Error {
  readonly code = "E_WAIT_TIMEOUT";
  constructor(what: string, timeoutMs: number, lastError?: unknown) {
    const detail = lastError instanceof Error ? ` (last error: ${lastError.message})` : "";
    super(`timed out after ${timeoutMs} ms waiting for ${what}${detail}`);
    this.name = "WaitTimeoutError";
  }
}

export interface WaitOptions {
  timeoutMs?: number;
  intervalMs?: number;
  /** Named in the timeout error: "alice's Maildir to hold 2 messages". */
  what?: string;
}

/**
 * Polls `probe` until it returns a value other than undefined/false, and returns that value.
 * A probe that throws counts as "not yet"; its last error is quoted if the deadline passes.
 */
export async function waitFor<T>(
  probe: () => T | undefined | false | Promise<T | undefined | false>,
  options: WaitOptions = {},
): Promise<T> {
  const timeoutMs = options.timeoutMs ?? 10_000;
  const intervalMs = options.intervalMs ?? 25;
  const deadline = Date.now() + timeoutMs;
  let lastError: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined && value !== false) return value;
    } catch (error) {
      lastError = error;
    }
    if (Date.now() >= deadline)
      throw new WaitTimeoutError(options.what ?? "a condition", timeoutMs, lastError);
    await delay(Math.min(intervalMs, Math.max(1, deadline - Date.now())));
  }
}

/** Polls a log until it contains `pattern` (text or RegExp); resolves with the whole log then. */
export function waitForLogMatch(
  readLog: () => Promise<string>,
  pattern: RegExp | string,
  timeoutMs: number,
  logName: string,
): Promise<string> {
  return waitFor(
    async () => {
      const text = await readLog();
      return (typeof pattern === "string" ? text.includes(pattern) : pattern.test(text)) ? text : undefined;
    },
    { timeoutMs, intervalMs: 50, what: `the ${logName} log to match ${String(pattern)}` },
  );
}

/** Resolves with the event's arguments, or rejects on `error` or when the deadline passes. */
export async function waitForEvent(
  emitter: EventEmitter,
  event: string,
  timeoutMs = 10_000,
): Promise<unknown[]> {
  const signal = AbortSignal.timeout(timeoutMs);
  try {
    return await once(emitter, event, { signal });
  } catch (error) {
    if (signal.aborted) throw new WaitTimeoutError(`event "${event}"`, timeoutMs);
    throw error;
  }
}

/** Resolves once a TCP connection to host:port succeeds (the connection is closed at once). */
export async function waitForPort(host: string, port: number, timeoutMs = 10_000): Promise<void> {
  await waitFor(
    () =>
      new Promise<boolean>((resolve, reject) => {
        const socket = net.connect({ host, port });
        socket.once("connect", () => {
          socket.destroy();
          resolve(true);
        });
        socket.once("error", reject);
      }),
    { timeoutMs, intervalMs: 50, what: `${host}:${port} to accept connections` },
  );
}

/** Resolves once `pid` no longer exists. */
export async function waitForExit(pid: number, timeoutMs = 10_000): Promise<void> {
  await waitFor(() => !isAlive(pid), { timeoutMs, intervalMs: 20, what: `process ${pid} to exit` });
}

/**
 * True while `pid` runs. A zombie counts as gone: daemons such as Postfix's master are reparented to
 * PID 1, and on some machines (containers, microVMs) PID 1 reaps them only after a while.
 */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return !existsSync("/proc/self/stat");
  }
}

/**
 * Starts a detached shell that outlives this process only to clean up after it: once `parentPid` is
 * gone (even by SIGKILL, which skips every exit hook), it sends SIGTERM to `pid` and removes `dir`.
 * Returns the reaper's pid so a normal stop can end it.
 */
export function spawnReaper(pid: number, dir: string, parentPid = process.pid): number | undefined {
  const script = [
    // A zombie counts as gone (PID 1 may be slow to reap the daemon).
    'alive() { kill -0 "$1" 2>/dev/null && ! grep -qs "^State:[[:space:]]*Z" "/proc/$1/status"; }',
    'while alive "$1"; do sleep 1; done',
    'kill -TERM "$2" 2>/dev/null',
    'i=0; while alive "$2" && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i+1)); done',
    'kill -KILL -"$2" "$2" 2>/dev/null',
    'rm -rf -- "$3"',
  ].join("\n");
  const child = spawn("/bin/sh", ["-c", script, "reaper", String(parentPid), String(pid), dir], {
    detached: true,
    stdio: "ignore",
  });
  child.unref();
  return child.pid;
}

/** True while a live (non-zombie) process of the group exists. */
export function groupAlive(pgid: number): boolean {
  try {
    process.kill(-pgid, 0);
  } catch {
    return false;
  }
  if (!existsSync("/proc/self/stat")) return true;
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${entry}/stat`, "utf8");
    } catch {
      continue; // exited meanwhile
    }
    // After "(comm)": state ppid pgrp ...
    const [state, , pgrp] = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (Number(pgrp) === pgid && state !== "Z") return true;
  }
  return false;
}

export function killQuietly(pid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(pid, signal);
  } catch {
    // already gone
  }
}
