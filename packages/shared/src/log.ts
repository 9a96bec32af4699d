// Structured JSON logs (pino) on stderr, with secrets censored wherever they are likely to appear:
// a field named token, secret, privateKey, password, psk (and a few synonyms) up to five levels deep,
// and the relay passwords map of a home config.
import { type DestinationStream, type Logger, type LoggerOptions, pino } from "pino";

export type { Logger };

export const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace", "silent"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

export const REDACTED = "[redacted]";

const SECRET_KEYS = [
  "token",
  "secret",
  "privateKey",
  "password",
  "pass",
  "psk",
  "tokenSecret",
  "authorization",
];
const MAX_DEPTH = 5;

/** The pino redact paths: each secret key at depth 0..MAX_DEPTH, and relay users' passwords. */
export const REDACT_PATHS: readonly string[] = [
  ...SECRET_KEYS.flatMap((key) =>
    Array.from({ length: MAX_DEPTH + 1 }, (_, depth) => "*.".repeat(depth) + key),
  ),
  "relayAuth.users.*",
  "*.relayAuth.users.*",
  "*.*.relayAuth.users.*",
];

export interface LoggerSettings {
  level?: string;
  /** Component name, e.g. "edge" or "home"; appears as `name` in every line. */
  name: string;
  /** A stream, or a file descriptor written synchronously. Default: 2 (stderr). */
  destination?: NodeJS.WritableStream | number;
}

export function createLogger(options: LoggerSettings): Logger {
  const level = options.level ?? "info";
  if (!(LOG_LEVELS as readonly string[]).includes(level)) {
    throw new RangeError(`log level "${level}" is not one of ${LOG_LEVELS.join(", ")}`);
  }
  const settings: LoggerOptions = {
    name: options.name,
    level,
    redact: { paths: [...REDACT_PATHS], censor: REDACTED },
    base: { pid: process.pid },
  };
  const destination = options.destination ?? 2;
  const stream: DestinationStream =
    typeof destination === "number"
      ? pino.destination({ dest: destination, sync: true })
      : (destination as unknown as DestinationStream);
  return pino(settings, stream);
}
