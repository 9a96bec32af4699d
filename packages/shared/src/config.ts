// The configuration of both agents (edge.json, home.json): one schema each, validated in one place.
// Every problem is reported at once as "key.path: what was expected", unknown keys are refused (with a
// spelling suggestion), durations arrive in milliseconds and addresses as { host, port }. docs/config.md
// describes every key; keep the two in step.
import { readFile } from "node:fs/promises";
import { isIP, isIPv4, isIPv6 } from "node:net";
import { z } from "zod";
import { parseJsonText } from "./atomic-file.js";
import { readCaFile } from "./ca-file.js";
import { ConfigError, StateError } from "./errors.js";
import { LOG_LEVELS, type LogLevel } from "./log.js";

// ---------------------------------------------------------------------------------------------
// Parsed types

export interface HostPort {
  host: string;
  port: number;
}

export type ProxyProtocolMode = "v2" | "v1" | "off";

/** The connection limits every public listener applies on its own (port 25 and each forward). */
export interface ListenerLimits {
  maxConnections: number;
  maxConnectionsPerIp: number;
  /** ms */
  idleTimeout: number;
  /** ms */
  sessionTimeout: number;
}

export interface EdgeForward {
  listen: HostPort;
  /** The service name home maps to a local target (home.json `services`). */
  service: string;
  /** This forward's own `limits`, each key not given taken from the edge's `limits`. */
  limits: ListenerLimits;
}

export interface EdgeLimits extends ListenerLimits {
  handshakesPerIpPerSecond: number;
  handshakeBurst: number;
  maxPendingHandshakes: number;
  /** ms */
  authTimeout: number;
}

/** Backup MX: how the edge spools mail while home is away. */
export interface EdgeSpool {
  /** ms: spooled mail older than this is given up (DSN or quarantine). */
  maxAge: number;
  /** ms: a recipient list older than this is stale; RCPT then gets 450. */
  recipientListMaxAge: number;
  maxRecipients: number;
  /** bytes: SIZE until home reports its Postfix's message_size_limit. */
  defaultMessageSizeLimit: number;
  messagesPerIpPerMinute: number;
  drainConcurrency: number;
  /** ms: first retry delay after a 4xx from home's Postfix; doubles up to retryMax. */
  retryMin: number;
  retryMax: number;
  /** ms: a spool session's command line must be complete within this (421 after). */
  commandTimeout: number;
  /** ms: from DATA to the final dot (421 after). */
  dataTimeout: number;
}

/** Outbound mail (relay streams from homes): queue, retries, limits. */
export interface EdgeOutbound {
  /** ms: first retry delay after a temporary failure; doubles up to retryMax. */
  retryMin: number;
  retryMax: number;
  /** ms: a message still undelivered after this is given up (DSN to the sender). */
  maxAge: number;
  /** Deliveries (SMTP connections) at once, all domains together, and per recipient domain. */
  concurrency: number;
  concurrencyPerDomain: number;
  /** Per home, sustained and as a burst: relay streams over it get `deferred` (451 4.7.1). */
  messagesPerHour: number;
  maxRecipients: number;
  /** bytes */
  maxMessageSize: number;
  /** ms */
  connectTimeout: number;
  /** ms: an SMTP reply slower than this fails the attempt (temporary). */
  commandTimeout: number;
  /** PEM file of CA certificates trusted for `requireTLS` domains besides Node's; null: Node's only. */
  tlsCaFile: string | null;
}

export interface EdgeConfig {
  hostname: string;
  domains: string[];
  smtpListen: HostPort;
  tunnelListen: HostPort;
  /** Base URL pairing tokens carry, without a trailing slash; home appends /tunnel or /pair. */
  publicUrl: string;
  forwards: EdgeForward[];
  /** ms */
  openTimeout: number;
  /** ms */
  stableAfter: number;
  limits: EdgeLimits;
  spool: EdgeSpool;
  outbound: EdgeOutbound;
  /** Lower-case domain → next hop, overriding MX. */
  transports: Record<string, HostPort>;
  /** In the form dns.setServers() takes; empty = the system resolvers. */
  dnsServers: string[];
  requireTLS: string[];
  metricsListen: HostPort | null;
  /** The priority of this edge's MX record (`mxtunnel-edge dns`, `doctor`). */
  mxPriority: number;
  /** The edge's public IP addresses (A/AAAA, SPF, PTR, DNSBL checks); empty: detected. */
  publicAddresses: string[];
  checks: EdgeChecks;
  logLevel: LogLevel;
}

/** What `doctor` checks against and when `status` warns. */
export interface EdgeChecks {
  /** DNS blocklist zones the edge's IPv4 addresses are looked up in. */
  dnsbls: string[];
  /** A remote SMTP server `doctor` connects to, proving outbound port 25 is open. */
  outboundProbe: HostPort;
  /** bytes: less free space than this under the state directory is a warning (a failure below a tenth). */
  minFreeSpace: number;
  /** ms: a paired home disconnected this long is a warning in `status`. */
  homeDownWarning: number;
}

export interface HomeService {
  target: HostPort;
  proxyProtocol: ProxyProtocolMode;
}

export interface HomeConfig {
  /** messageSizeLimit: bytes, the SIZE the edge announces while it spools (Postfix's message_size_limit). */
  postfix: { inject: HostPort; proxyProtocol: ProxyProtocolMode; messageSizeLimit: number };
  /** The recipient list the edge checks RCPT against while it spools (null: none, RCPT gets 450). */
  recipients: { file: string | null; delimiter: string; refresh: number };
  /** Every service home will connect to, including "smtp" (from `postfix`). */
  services: Record<string, HomeService>;
  allowPrivateClientIPs: boolean;
  relayListen: HostPort;
  relayAuth: { users: Record<string, string> } | null;
  /** What the relay listener accepts from Postfix (the edge enforces its own limits too). */
  relayLimits: { maxRecipients: number; maxMessageSize: number; messagesPerHour: number };
  /** ms: how long home waits for the edge's RESULT before answering Postfix 451 4.4.1. */
  relayTimeout: number;
  /** ms */
  reconnect: { minDelay: number; maxDelay: number };
  logLevel: LogLevel;
}

// ---------------------------------------------------------------------------------------------
// File shapes (what `init` writes)

export type DurationText = string | number;

export interface EdgeConfigFile {
  hostname: string;
  domains: string[];
  smtpListen?: string;
  tunnelListen?: string;
  publicUrl?: string;
  forwards?: Array<{
    listen: string;
    service: string;
    limits?: {
      maxConnections?: number;
      maxConnectionsPerIp?: number;
      idleTimeout?: DurationText;
      sessionTimeout?: DurationText;
    };
  }>;
  openTimeout?: DurationText;
  stableAfter?: DurationText;
  limits?: {
    maxConnections?: number;
    maxConnectionsPerIp?: number;
    idleTimeout?: DurationText;
    sessionTimeout?: DurationText;
    handshakesPerIpPerSecond?: number;
    handshakeBurst?: number;
    maxPendingHandshakes?: number;
    authTimeout?: DurationText;
  };
  spool?: {
    maxAge?: DurationText;
    recipientListMaxAge?: DurationText;
    maxRecipients?: number;
    defaultMessageSizeLimit?: number;
    messagesPerIpPerMinute?: number;
    drainConcurrency?: number;
    retryMin?: DurationText;
    retryMax?: DurationText;
    commandTimeout?: DurationText;
    dataTimeout?: DurationText;
  };
  outbound?: {
    retryMin?: DurationText;
    retryMax?: DurationText;
    maxAge?: DurationText;
    concurrency?: number;
    concurrencyPerDomain?: number;
    messagesPerHour?: number;
    maxRecipients?: number;
    maxMessageSize?: number;
    connectTimeout?: DurationText;
    commandTimeout?: DurationText;
    tlsCaFile?: string | null;
  };
  transports?: Record<string, string>;
  dnsServers?: string[];
  requireTLS?: string[];
  metricsListen?: string | null;
  mxPriority?: number;
  publicAddresses?: string[];
  checks?: {
    dnsbls?: string[];
    outboundProbe?: string;
    minFreeSpace?: number;
    homeDownWarning?: DurationText;
  };
  logLevel?: LogLevel;
}

export interface HomeConfigFile {
  postfix?: { inject?: string; proxyProtocol?: ProxyProtocolMode; messageSizeLimit?: number };
  recipients?: { file?: string | null; delimiter?: string; refresh?: DurationText };
  services?: Record<string, { target: string; proxyProtocol?: ProxyProtocolMode }>;
  allowPrivateClientIPs?: boolean;
  relayListen?: string;
  relayAuth?: { users: Record<string, string> } | null;
  relayLimits?: { maxRecipients?: number; maxMessageSize?: number; messagesPerHour?: number };
  relayTimeout?: DurationText;
  reconnect?: { minDelay?: DurationText; maxDelay?: DurationText };
  logLevel?: LogLevel;
}

export const EDGE_DEFAULTS = {
  smtpListen: "0.0.0.0:25",
  tunnelListen: "0.0.0.0:8443",
  openTimeout: "3s",
  stableAfter: "10s",
  limits: {
    maxConnections: 1000,
    maxConnectionsPerIp: 20,
    idleTimeout: "10m",
    sessionTimeout: "30m",
    handshakesPerIpPerSecond: 5,
    handshakeBurst: 20,
    maxPendingHandshakes: 256,
    authTimeout: "5s",
  },
  spool: {
    maxAge: "5d",
    recipientListMaxAge: "7d",
    maxRecipients: 100,
    defaultMessageSizeLimit: 10_240_000,
    messagesPerIpPerMinute: 60,
    drainConcurrency: 4,
    retryMin: "1m",
    retryMax: "1h",
    commandTimeout: "1m",
    dataTimeout: "10m",
  },
  outbound: {
    retryMin: "5m",
    retryMax: "1h",
    maxAge: "5d",
    concurrency: 20,
    concurrencyPerDomain: 4,
    messagesPerHour: 1000,
    maxRecipients: 100,
    maxMessageSize: 52_428_800,
    connectTimeout: "30s",
    commandTimeout: "5m",
    tlsCaFile: null,
  },
  mxPriority: 10,
  checks: {
    dnsbls: ["zen.spamhaus.org", "bl.spamcop.net", "psbl.surriel.com"],
    outboundProbe: "gmail-smtp-in.l.google.com:25",
    minFreeSpace: 1_073_741_824,
    homeDownWarning: "1h",
  },
  logLevel: "info",
} as const;

export const HOME_DEFAULTS = {
  postfix: { inject: "127.0.0.1:10025", proxyProtocol: "v2", messageSizeLimit: 10_240_000 },
  recipients: { file: null, delimiter: "+", refresh: "1m" },
  relayListen: "127.0.0.1:2525",
  relayLimits: { maxRecipients: 100, maxMessageSize: 52_428_800, messagesPerHour: 1000 },
  relayTimeout: "60s",
  reconnect: { minDelay: "1s", maxDelay: "30s" },
  logLevel: "info",
} as const;

/** setTimeout fires at once for delays above 2^31 - 1 ms, so no duration may exceed it (~24.8 days). */
export const MAX_DURATION_MS = 2 ** 31 - 1;

// ---------------------------------------------------------------------------------------------
// Scalar parsers: each throws Invalid(problem); the public wrappers add the key path.

class Invalid extends Error {}

function show(value: unknown): string {
  if (value === undefined) return "nothing";
  if (value === null) return "null";
  if (Array.isArray(value)) return "a list";
  if (typeof value === "object") return "an object";
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 48 ? `${text.slice(0, 45)}…` : text;
}

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

function checkDuration(value: unknown): number {
  const expected =
    'expected a duration: milliseconds as a number, or text such as "500ms", "3s", "10m", "1h", "5d"';
  let ms: number;
  if (typeof value === "number") {
    ms = value;
  } else if (typeof value === "string" && /^(\d+(\.\d+)?(ms|s|m|h|d))+$/.test(value.trim())) {
    ms = 0;
    for (const [, amount, unit] of value.trim().matchAll(/(\d+(?:\.\d+)?)(ms|s|m|h|d)/g)) {
      ms += Number(amount) * UNIT_MS[unit as string]!;
    }
  } else {
    throw new Invalid(`${expected}, got ${show(value)}`);
  }
  if (!Number.isFinite(ms) || ms < 0) throw new Invalid(`${expected}, got ${show(value)}`);
  ms = Math.round(ms);
  if (ms > MAX_DURATION_MS) throw new Invalid(`at most 24 days (${MAX_DURATION_MS} ms), got ${show(value)}`);
  return ms;
}

/** A DNS name: lower-cased, trailing dot dropped, LDH labels of 1..63, at most 253 characters. */
function checkDnsName(value: unknown, options: { needDot?: boolean } = {}): string {
  const expected = options.needDot ? "expected a domain name such as example.org" : "expected a DNS name";
  if (typeof value !== "string") throw new Invalid(`${expected}, got ${show(value)}`);
  const name = value.toLowerCase().replace(/\.$/, "");
  const labels = name.split(".");
  const valid =
    name.length > 0 &&
    name.length <= 253 &&
    labels.every((label) => /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/.test(label)) &&
    !/^[0-9]+$/.test(labels[labels.length - 1]!);
  if (!valid) {
    // biome-ignore lint/suspicious/noControlCharactersInRegex: matches anything outside ASCII
    const hint = /[^\x00-\x7f]/.test(value) ? " (write internationalised names in their xn-- form)" : "";
    throw new Invalid(`${expected}${hint}, got ${show(value)}`);
  }
  if (options.needDot && labels.length < 2) throw new Invalid(`${expected}, got ${show(value)}`);
  return name;
}

function checkHostPort(value: unknown): HostPort {
  const expected = 'expected "HOST:PORT" such as "0.0.0.0:25" or "[::1]:25"';
  if (typeof value !== "string") throw new Invalid(`${expected}, got ${show(value)}`);
  let host: string;
  let portText: string;
  const bracketed = /^\[([^\]]*)\]:(.*)$/.exec(value);
  if (bracketed) {
    host = bracketed[1]!;
    portText = bracketed[2]!;
    if (!isIPv6(host)) throw new Invalid(`${expected}; "${host.slice(0, 45)}" is not an IPv6 address`);
  } else {
    const colon = value.lastIndexOf(":");
    if (colon < 0) throw new Invalid(`${expected}, got ${show(value)} (no port)`);
    host = value.slice(0, colon);
    portText = value.slice(colon + 1);
    if (host.includes(":"))
      throw new Invalid(`${expected}; put an IPv6 address in brackets, like "[::1]:25"`);
    if (!isIPv4(host)) {
      try {
        host = checkDnsName(host);
      } catch {
        throw new Invalid(`${expected}, got ${show(value)} (bad host)`);
      }
    }
  }
  if (!/^[0-9]{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535) {
    throw new Invalid(`${expected}; the port must be 1..65535, got ${show(value)}`);
  }
  return { host, port: Number(portText) };
}

function checkInteger(min: number, max: number) {
  return (value: unknown): number => {
    if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
      throw new Invalid(`expected a whole number from ${min} to ${max}, got ${show(value)}`);
    }
    return value;
  };
}

function checkPositive(value: unknown): number {
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new Invalid(`expected a number greater than 0, got ${show(value)}`);
  }
  return value;
}

function checkOneOf<const T extends readonly string[]>(options: T) {
  return (value: unknown): T[number] => {
    if (typeof value !== "string" || !options.includes(value)) {
      throw new Invalid(`expected one of ${options.map((o) => `"${o}"`).join(", ")}, got ${show(value)}`);
    }
    return value as T[number];
  };
}

function checkServiceName(value: unknown): string {
  if (typeof value !== "string" || !/^[a-z][a-z0-9-]{0,31}$/.test(value)) {
    throw new Invalid(`expected a service name (a-z, 0-9, "-", starting with a letter), got ${show(value)}`);
  }
  return value;
}

function checkWebSocketUrl(value: unknown): string {
  const expected = 'expected a ws:// or wss:// URL such as "ws://mx.example.net:8443"';
  if (typeof value !== "string") throw new Invalid(`${expected}, got ${show(value)}`);
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new Invalid(`${expected}, got ${show(value)}`);
  }
  if (url.protocol !== "ws:" && url.protocol !== "wss:") throw new Invalid(`${expected}, got ${show(value)}`);
  if (url.username || url.password || url.search || url.hash) {
    throw new Invalid(`${expected} without user, query or fragment, got ${show(value)}`);
  }
  return url.href.replace(/\/+$/, "");
}

function checkDnsServer(value: unknown): string {
  const expected =
    'expected a resolver IP address, optionally with a port ("1.1.1.1", "[2606:4700::1111]:53")';
  if (typeof value === "string") {
    if (isIP(value)) return value;
    try {
      const { host } = checkHostPort(value);
      if (isIP(host)) return value;
    } catch {
      // fall through to the sentence below
    }
  }
  throw new Invalid(`${expected}, got ${show(value)}`);
}

/** An absolute path to a readable PEM file of CA certificates, or null. */
function checkCaFile(value: unknown): string | null {
  if (value === undefined || value === null) return null;
  if (typeof value !== "string" || !value.startsWith("/"))
    throw new Invalid(
      `expected an absolute path to a PEM file of CA certificates, or null, got ${show(value)}`,
    );
  try {
    readCaFile(value);
  } catch (error) {
    throw new Invalid((error as Error).message);
  }
  return value;
}

function checkUserName(value: string): string {
  if (!/^[A-Za-z0-9._@+-]{1,64}$/.test(value)) {
    throw new Invalid("expected a user name of 1..64 letters, digits or . _ @ + -");
  }
  return value;
}

function checkPassword(value: unknown): string {
  // never echo the value: it is a secret
  if (typeof value !== "string" || value.length < 1 || value.length > 512) {
    throw new Invalid("expected a password of 1..512 characters");
  }
  return value;
}

/** Parses "HOST:PORT" (IPv6 in brackets); throws a ConfigError naming `what`. */
export function parseHostPort(text: string, what: string): HostPort {
  return publicCheck(checkHostPort, text, what);
}

/** Parses a duration (a number of ms, or "500ms", "3s", "10m", "1h", "5d", "1h30m"); throws a ConfigError naming `what`. */
export function parseDuration(text: string | number, what: string): number {
  return publicCheck(checkDuration, text, what);
}

function publicCheck<T>(check: (value: unknown) => T, value: unknown, what: string): T {
  try {
    return check(value);
  } catch (error) {
    if (error instanceof Invalid) throw new ConfigError([`${what}: ${error.message}`]);
    throw error;
  }
}

// ---------------------------------------------------------------------------------------------
// Schemas

function field<T>(check: (value: unknown) => T) {
  return z
    .unknown()
    .optional()
    .transform((value, ctx): T => {
      try {
        return check(value);
      } catch (error) {
        if (!(error instanceof Invalid)) throw error;
        ctx.issues.push({ code: "custom", message: error.message, input: value });
        return z.NEVER;
      }
    });
}

function required<T>(check: (value: unknown) => T) {
  return field((value) => {
    if (value === undefined) throw new Invalid("is required");
    return check(value);
  });
}

function optional<T>(check: (value: unknown) => T) {
  return field((value) => (value === undefined ? undefined : check(value)));
}

function withDefault<T>(check: (value: unknown) => T, fallback: unknown) {
  return field((value) => check(value === undefined ? fallback : value));
}

/** A JSON object whose keys pass `checkKey` and whose values pass `value`, issues nested under each key. */
function recordOf<T>(checkKey: (key: string) => string, value: z.ZodType<T>) {
  return z
    .unknown()
    .optional()
    .transform((input, ctx): Record<string, T> => {
      if (input === undefined) return {};
      if (typeof input !== "object" || input === null || Array.isArray(input)) {
        ctx.issues.push({ code: "custom", message: `expected an object, got ${show(input)}`, input });
        return z.NEVER;
      }
      const entries: Array<[string, T]> = [];
      for (const [key, item] of Object.entries(input)) {
        let name = key;
        try {
          name = checkKey(key);
        } catch (error) {
          if (!(error instanceof Invalid)) throw error;
          ctx.issues.push({ code: "custom", message: error.message, input: key, path: [key] });
        }
        const parsed = value.safeParse(item, { error: errorMap });
        if (parsed.success) {
          entries.push([name, parsed.data]);
        } else {
          for (const issue of parsed.error.issues) {
            ctx.issues.push({ ...(issue as z.core.$ZodRawIssue), path: [key, ...issue.path] });
          }
        }
      }
      return Object.fromEntries(entries);
    });
}

function listOf<T>(item: z.ZodType<T>) {
  return z
    .array(item)
    .optional()
    .transform((list) => list ?? []);
}

const logLevel = withDefault(checkOneOf(LOG_LEVELS), EDGE_DEFAULTS.logLevel);
const proxyProtocol = withDefault(checkOneOf(["v2", "v1", "off"] as const), "v2");

const edgeSchema = z.strictObject({
  hostname: required(checkDnsName),
  domains: z
    .array(
      field((value) => checkDnsName(value, { needDot: true })),
      { error: "expected a list of domains" },
    )
    .min(1, { error: "expected at least one domain" }),
  smtpListen: withDefault(checkHostPort, EDGE_DEFAULTS.smtpListen),
  tunnelListen: withDefault(checkHostPort, EDGE_DEFAULTS.tunnelListen),
  publicUrl: field((value) => (value === undefined ? undefined : checkWebSocketUrl(value))),
  forwards: listOf(
    z.strictObject({
      listen: required(checkHostPort),
      service: required(checkServiceName),
      // Each key left out is taken from the edge's `limits` (parseEdgeConfig fills them in).
      limits: z
        .strictObject({
          maxConnections: optional(checkInteger(1, 1_000_000)),
          maxConnectionsPerIp: optional(checkInteger(1, 1_000_000)),
          idleTimeout: optional(checkDuration),
          sessionTimeout: optional(checkDuration),
        })
        .prefault({}),
    }),
  ),
  openTimeout: withDefault(checkDuration, EDGE_DEFAULTS.openTimeout),
  stableAfter: withDefault(checkDuration, EDGE_DEFAULTS.stableAfter),
  limits: z
    .strictObject({
      maxConnections: withDefault(checkInteger(1, 1_000_000), EDGE_DEFAULTS.limits.maxConnections),
      maxConnectionsPerIp: withDefault(checkInteger(1, 1_000_000), EDGE_DEFAULTS.limits.maxConnectionsPerIp),
      idleTimeout: withDefault(checkDuration, EDGE_DEFAULTS.limits.idleTimeout),
      sessionTimeout: withDefault(checkDuration, EDGE_DEFAULTS.limits.sessionTimeout),
      handshakesPerIpPerSecond: withDefault(checkPositive, EDGE_DEFAULTS.limits.handshakesPerIpPerSecond),
      handshakeBurst: withDefault(checkInteger(1, 1_000_000), EDGE_DEFAULTS.limits.handshakeBurst),
      maxPendingHandshakes: withDefault(
        checkInteger(1, 1_000_000),
        EDGE_DEFAULTS.limits.maxPendingHandshakes,
      ),
      authTimeout: withDefault(checkDuration, EDGE_DEFAULTS.limits.authTimeout),
    })
    .prefault({}),
  spool: z
    .strictObject({
      maxAge: withDefault(checkDuration, EDGE_DEFAULTS.spool.maxAge),
      recipientListMaxAge: withDefault(checkDuration, EDGE_DEFAULTS.spool.recipientListMaxAge),
      maxRecipients: withDefault(checkInteger(1, 10_000), EDGE_DEFAULTS.spool.maxRecipients),
      defaultMessageSizeLimit: withDefault(
        checkInteger(1024, 2 ** 31 - 1),
        EDGE_DEFAULTS.spool.defaultMessageSizeLimit,
      ),
      messagesPerIpPerMinute: withDefault(
        checkInteger(1, 1_000_000),
        EDGE_DEFAULTS.spool.messagesPerIpPerMinute,
      ),
      drainConcurrency: withDefault(checkInteger(1, 64), EDGE_DEFAULTS.spool.drainConcurrency),
      retryMin: withDefault(checkDuration, EDGE_DEFAULTS.spool.retryMin),
      retryMax: withDefault(checkDuration, EDGE_DEFAULTS.spool.retryMax),
      commandTimeout: withDefault(checkDuration, EDGE_DEFAULTS.spool.commandTimeout),
      dataTimeout: withDefault(checkDuration, EDGE_DEFAULTS.spool.dataTimeout),
    })
    .prefault({}),
  outbound: z
    .strictObject({
      retryMin: withDefault(checkDuration, EDGE_DEFAULTS.outbound.retryMin),
      retryMax: withDefault(checkDuration, EDGE_DEFAULTS.outbound.retryMax),
      maxAge: withDefault(checkDuration, EDGE_DEFAULTS.outbound.maxAge),
      concurrency: withDefault(checkInteger(1, 1000), EDGE_DEFAULTS.outbound.concurrency),
      concurrencyPerDomain: withDefault(checkInteger(1, 100), EDGE_DEFAULTS.outbound.concurrencyPerDomain),
      messagesPerHour: withDefault(checkInteger(1, 10_000_000), EDGE_DEFAULTS.outbound.messagesPerHour),
      maxRecipients: withDefault(checkInteger(1, 10_000), EDGE_DEFAULTS.outbound.maxRecipients),
      maxMessageSize: withDefault(checkInteger(1024, 2 ** 31 - 1), EDGE_DEFAULTS.outbound.maxMessageSize),
      connectTimeout: withDefault(checkDuration, EDGE_DEFAULTS.outbound.connectTimeout),
      commandTimeout: withDefault(checkDuration, EDGE_DEFAULTS.outbound.commandTimeout),
      tlsCaFile: field(checkCaFile),
    })
    .prefault({}),
  transports: recordOf((key) => checkDnsName(key), required(checkHostPort)),
  dnsServers: listOf(field(checkDnsServer)),
  requireTLS: listOf(field((value) => checkDnsName(value, { needDot: true }))),
  metricsListen: field((value) => (value === undefined || value === null ? null : checkHostPort(value))),
  mxPriority: withDefault(checkInteger(0, 65535), EDGE_DEFAULTS.mxPriority),
  publicAddresses: listOf(
    field((value) => {
      if (typeof value !== "string" || !isIP(value))
        throw new Invalid(`expected an IPv4 or IPv6 address such as "192.0.2.10", got ${show(value)}`);
      return value;
    }),
  ),
  checks: z
    .strictObject({
      // Left out: the default lists; [] turns the DNSBL check off.
      dnsbls: z
        .array(field((value) => checkDnsName(value, { needDot: true })))
        .optional()
        .transform((list) => list ?? [...EDGE_DEFAULTS.checks.dnsbls]),
      outboundProbe: withDefault(checkHostPort, EDGE_DEFAULTS.checks.outboundProbe),
      minFreeSpace: withDefault(checkInteger(0, Number.MAX_SAFE_INTEGER), EDGE_DEFAULTS.checks.minFreeSpace),
      homeDownWarning: withDefault(checkDuration, EDGE_DEFAULTS.checks.homeDownWarning),
    })
    .prefault({}),
  logLevel,
});

const homeSchema = z.strictObject({
  postfix: z
    .strictObject({
      inject: withDefault(checkHostPort, HOME_DEFAULTS.postfix.inject),
      proxyProtocol,
      messageSizeLimit: withDefault(checkInteger(1024, 2 ** 31 - 1), HOME_DEFAULTS.postfix.messageSizeLimit),
    })
    .prefault({}),
  recipients: z
    .strictObject({
      file: field((value) => {
        if (value === undefined || value === null) return null;
        if (typeof value !== "string" || !value.startsWith("/"))
          throw new Invalid(`expected an absolute file path or null, got ${show(value)}`);
        return value;
      }),
      delimiter: withDefault((value) => {
        if (typeof value !== "string" || value.length > 4 || /[@\s]/.test(value))
          throw new Invalid(
            `expected Postfix's recipient_delimiter characters (e.g. "+"), got ${show(value)}`,
          );
        return value;
      }, HOME_DEFAULTS.recipients.delimiter),
      refresh: withDefault(checkDuration, HOME_DEFAULTS.recipients.refresh),
    })
    .prefault({}),
  services: recordOf(
    (key) => {
      const name = checkServiceName(key);
      if (name === "smtp") throw new Invalid("smtp is set by postfix.inject; remove services.smtp");
      return name;
    },
    z.strictObject({ target: required(checkHostPort), proxyProtocol }),
  ),
  allowPrivateClientIPs: withDefault((value) => {
    if (typeof value !== "boolean") throw new Invalid(`expected true or false, got ${show(value)}`);
    return value;
  }, false),
  relayListen: withDefault(checkHostPort, HOME_DEFAULTS.relayListen),
  relayAuth: z
    .strictObject({
      users: recordOf(checkUserName, field(checkPassword)).refine((users) => Object.keys(users).length > 0, {
        error: "expected at least one user",
      }),
    })
    .nullable()
    .optional()
    .transform((auth) => auth ?? null),
  relayLimits: z
    .strictObject({
      maxRecipients: withDefault(checkInteger(1, 10_000), HOME_DEFAULTS.relayLimits.maxRecipients),
      maxMessageSize: withDefault(checkInteger(1024, 2 ** 31 - 1), HOME_DEFAULTS.relayLimits.maxMessageSize),
      messagesPerHour: withDefault(checkInteger(1, 10_000_000), HOME_DEFAULTS.relayLimits.messagesPerHour),
    })
    .prefault({}),
  relayTimeout: withDefault(checkDuration, HOME_DEFAULTS.relayTimeout),
  reconnect: z
    .strictObject({
      minDelay: withDefault(checkDuration, HOME_DEFAULTS.reconnect.minDelay),
      maxDelay: withDefault(checkDuration, HOME_DEFAULTS.reconnect.maxDelay),
    })
    .prefault({}),
  logLevel,
});

const errorMap: z.core.$ZodErrorMap = (issue) => {
  if (issue.code === "invalid_type") {
    if (issue.input === undefined) return "is required";
    const expected: Record<string, string> = { object: "an object", array: "a list", string: "text" };
    return `expected ${expected[issue.expected] ?? issue.expected}, got ${show(issue.input)}`;
  }
  return undefined;
};

// ---------------------------------------------------------------------------------------------
// Public parsing

/** Validates an edge.json value; throws a ConfigError listing every problem. */
export function parseEdgeConfig(input: unknown): EdgeConfig {
  const { data, problems } = run(edgeSchema, input);
  duplicates(data.domains ?? [], (domain, i) => problems.push(`domains[${i}]: ${domain} is listed twice`));
  duplicates(data.requireTLS ?? [], (domain, i) =>
    problems.push(`requireTLS[${i}]: ${domain} is listed twice`),
  );
  for (const key of ["commandTimeout", "dataTimeout"] as const) {
    const ms = data.spool?.[key];
    if (ms !== undefined && ms < 1000) problems.push(`spool.${key}: expected at least 1s, got ${ms}ms`);
  }
  const listeners: Array<[string, HostPort | null | undefined]> = [
    ["smtpListen", data.smtpListen],
    ["tunnelListen", data.tunnelListen],
    ...(data.forwards ?? []).map((f, i): [string, HostPort] => [`forwards[${i}].listen`, f.listen]),
    ["metricsListen", data.metricsListen],
  ];
  listeners.forEach(([key, address], i) => {
    if (!address) return;
    const clash = listeners.slice(0, i).find(([, other]) => other && overlaps(address, other));
    if (clash) problems.push(`${key}: port ${address.port} is already used by ${clash[0]}`);
  });
  if (!isComplete<typeof edgeSchema>(problems, data)) throw new ConfigError(problems);
  const { limits } = data;
  return {
    ...data,
    publicUrl: data.publicUrl ?? `ws://${data.hostname}:${data.tunnelListen.port}`,
    forwards: data.forwards.map((forward) => ({
      listen: forward.listen,
      service: forward.service,
      limits: {
        maxConnections: forward.limits.maxConnections ?? limits.maxConnections,
        maxConnectionsPerIp: forward.limits.maxConnectionsPerIp ?? limits.maxConnectionsPerIp,
        idleTimeout: forward.limits.idleTimeout ?? limits.idleTimeout,
        sessionTimeout: forward.limits.sessionTimeout ?? limits.sessionTimeout,
      },
    })),
  };
}

/** Validates a home.json value; throws a ConfigError listing every problem. */
export function parseHomeConfig(input: unknown): HomeConfig {
  const { data, problems } = run(homeSchema, input);
  const { relayListen, relayAuth, reconnect, postfix } = data;
  if (relayListen && relayAuth === null && !isLoopback(relayListen.host)) {
    problems.push(
      `relayListen: ${formatHostPort(relayListen)} is reachable beyond this machine, so relayAuth ` +
        'with at least one user is required (e.g. "relayAuth": { "users": { "postfix": "…" } }); ' +
        "otherwise anyone on the network could send mail as you",
    );
  }
  if (reconnect && reconnect.minDelay < 10) problems.push("reconnect.minDelay: expected at least 10ms");
  if (reconnect && reconnect.maxDelay < reconnect.minDelay) {
    problems.push("reconnect.maxDelay: expected a delay no shorter than reconnect.minDelay");
  }
  if (!isComplete<typeof homeSchema>(problems, data) || !postfix) throw new ConfigError(problems);
  return {
    ...data,
    services: { smtp: { target: postfix.inject, proxyProtocol: postfix.proxyProtocol }, ...data.services },
  };
}

/** The warnings of either agent's config (see edgeConfigWarnings, homeConfigWarnings). */
export function configWarnings(config: EdgeConfig | HomeConfig): string[] {
  return "hostname" in config ? edgeConfigWarnings(config) : homeConfigWarnings(config);
}

/** Things that are allowed but probably wrong; print them at start and in `run --check`. */
export function edgeConfigWarnings(config: EdgeConfig): string[] {
  const warnings: string[] = [];
  if (config.limits.idleTimeout < 10 * 60_000) {
    warnings.push("limits.idleTimeout is below 10 minutes, shorter than RFC 5321 asks servers to wait");
  }
  if (config.limits.sessionTimeout < 30 * 60_000) {
    warnings.push("limits.sessionTimeout is below 30 minutes: large messages on slow links may be cut off");
  }
  if (config.limits.maxConnectionsPerIp > config.limits.maxConnections) {
    warnings.push("limits.maxConnectionsPerIp is larger than limits.maxConnections and has no effect");
  }
  config.forwards.forEach((forward, i) => {
    const key = `forwards[${i}].limits`;
    if (forward.limits.maxConnectionsPerIp > forward.limits.maxConnections) {
      warnings.push(`${key}.maxConnectionsPerIp is larger than ${key}.maxConnections and has no effect`);
    }
    // A forward of port 25 (e.g. on [::]) carries SMTP from other MTAs: the same RFC 5321 timeouts apply.
    if (forward.service === "smtp" && forward.limits.idleTimeout < 10 * 60_000) {
      warnings.push(`${key}.idleTimeout is below 10 minutes, shorter than RFC 5321 asks servers to wait`);
    }
  });
  if (config.metricsListen && !isLoopback(config.metricsListen.host)) {
    warnings.push(
      `metricsListen ${formatHostPort(config.metricsListen)} exposes metrics beyond this machine`,
    );
  }
  return warnings;
}

/** Things that are allowed but probably wrong; print them at start and in `run --check`. */
export function homeConfigWarnings(config: HomeConfig): string[] {
  const warnings: string[] = [];
  for (const [name, service] of Object.entries(config.services)) {
    if (service.proxyProtocol !== "off") continue;
    const key = name === "smtp" ? "postfix.proxyProtocol" : `services.${name}.proxyProtocol`;
    warnings.push(
      `${key} is "off": ${name} will see every client as coming from this machine, so SPF, RBL checks, ` +
        "postscreen and fail2ban stop working",
    );
  }
  for (const [user, password] of Object.entries(config.relayAuth?.users ?? {})) {
    if (password.length < 12)
      warnings.push(`relayAuth.users.${user} has a password shorter than 12 characters`);
  }
  if (config.allowPrivateClientIPs) {
    warnings.push(
      "allowPrivateClientIPs is true: a compromised edge can make connections look like they come from your LAN",
    );
  }
  return warnings;
}

type ObjectSchema = z.ZodObject<z.core.$ZodLooseShape, z.core.$strict>;

/**
 * Parses `input` against a strict object schema. On failure the keys that did parse are still
 * returned, so cross-key rules can add their problems to the same report.
 */
function run<S extends ObjectSchema>(
  schema: S,
  input: unknown,
): { data: Partial<z.output<S>>; problems: string[] } {
  if (typeof input !== "object" || input === null || Array.isArray(input)) {
    return { data: {}, problems: [`(top level): expected a JSON object, got ${show(input)}`] };
  }
  const result = schema.safeParse(input, { error: errorMap });
  if (result.success) return { data: result.data, problems: [] };
  const problems = result.error.issues.flatMap((issue) => describeIssue(issue, schema));
  const data: Record<string, unknown> = {};
  for (const [key, child] of Object.entries(schema.shape)) {
    const parsed = (child as z.ZodType).safeParse((input as Record<string, unknown>)[key], {
      error: errorMap,
    });
    if (parsed.success) data[key] = parsed.data;
  }
  return { data: data as Partial<z.output<S>>, problems };
}

/** After run() reported no problems, the data is the whole parsed object. */
function isComplete<S extends ObjectSchema>(
  problems: readonly string[],
  _data: Partial<z.output<S>>,
): _data is z.output<S> {
  return problems.length === 0;
}

function describeIssue(issue: z.core.$ZodIssue, root: z.ZodType): string[] {
  const where = formatPath(issue.path);
  if (issue.code === "unrecognized_keys") {
    const known = knownKeys(root, issue.path);
    return issue.keys.map((key) => {
      const guess = closest(key, known);
      const path = formatPath([...issue.path, key]);
      return `${path}: unknown key${guess ? ` (did you mean "${guess}"?)` : ""}`;
    });
  }
  return [`${where || "(top level)"}: ${issue.message}`];
}

function formatPath(path: readonly PropertyKey[]): string {
  let text = "";
  for (const segment of path) {
    if (typeof segment === "number") text += `[${segment}]`;
    else if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(String(segment)))
      text += text ? `.${String(segment)}` : String(segment);
    else text += `[${JSON.stringify(String(segment))}]`;
  }
  return text;
}

/** Keys the strict object at `path` accepts, for spelling suggestions. */
function knownKeys(root: z.ZodType, path: readonly PropertyKey[]): string[] {
  let schema: unknown = root;
  for (const segment of [...path, undefined]) {
    // unwrap optional/transform layers down to an object or array
    for (let i = 0; i < 8; i++) {
      if (schema instanceof z.ZodOptional || schema instanceof z.ZodNullable) schema = schema.unwrap();
      else if (schema instanceof z.ZodPrefault || schema instanceof z.ZodDefault) schema = schema.unwrap();
      else if (schema instanceof z.ZodPipe) schema = schema.in;
      else break;
    }
    if (segment === undefined) break;
    if (schema instanceof z.ZodArray) schema = schema.element;
    else if (schema instanceof z.ZodObject)
      schema = (schema.shape as Record<string, unknown>)[String(segment)];
    else return [];
    if (schema instanceof z.ZodArray && typeof segment === "number") continue;
  }
  return schema instanceof z.ZodObject ? Object.keys(schema.shape) : [];
}

function closest(word: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(2, Math.floor(word.length / 3)) + 1;
  for (const candidate of candidates) {
    const distance = editDistance(word.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      current[j] = Math.min(previous[j]! + 1, current[j - 1]! + 1, previous[j - 1]! + cost);
    }
    previous = current;
  }
  return previous[b.length]!;
}

function duplicates(list: readonly string[], report: (item: string, index: number) => void): void {
  const seen = new Set<string>();
  list.forEach((item, i) => {
    if (seen.has(item)) report(item, i);
    seen.add(item);
  });
}

const WILDCARDS = new Set(["0.0.0.0", "::"]);

function overlaps(a: HostPort, b: HostPort): boolean {
  return a.port === b.port && (a.host === b.host || WILDCARDS.has(a.host) || WILDCARDS.has(b.host));
}

function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || (isIPv4(host) && host.startsWith("127."));
}

export function formatHostPort(address: HostPort): string {
  return address.host.includes(":") ? `[${address.host}]:${address.port}` : `${address.host}:${address.port}`;
}

// ---------------------------------------------------------------------------------------------
// Files

/** Reads and validates edge.json; errors name the file (and the line, for JSON syntax errors). */
export async function loadEdgeConfig(path: string): Promise<EdgeConfig> {
  return parseEdgeConfigText(await readConfigText(path, "mxtunnel-edge init"), path);
}

/** Reads and validates home.json; errors name the file (and the line, for JSON syntax errors). */
export async function loadHomeConfig(path: string): Promise<HomeConfig> {
  return parseHomeConfigText(await readConfigText(path, "mxtunnel-home pair"), path);
}

export function parseEdgeConfigText(text: string, fileName: string): EdgeConfig {
  return withFileName(fileName, () => parseEdgeConfig(jsonOf(text, fileName)));
}

export function parseHomeConfigText(text: string, fileName: string): HomeConfig {
  return withFileName(fileName, () => parseHomeConfig(jsonOf(text, fileName)));
}

async function readConfigText(path: string, howToCreate: string): Promise<string> {
  try {
    return await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") {
      throw new StateError(
        "STATE_MISSING",
        `There is no configuration file at ${path}; run \`${howToCreate}\`.`,
      );
    }
    throw error;
  }
}

function jsonOf(text: string, fileName: string): unknown {
  try {
    return parseJsonText(text, fileName);
  } catch (error) {
    throw new ConfigError([(error as Error).message], `invalid configuration: ${(error as Error).message}`);
  }
}

function withFileName<T>(fileName: string, parse: () => T): T {
  try {
    return parse();
  } catch (error) {
    if (!(error instanceof ConfigError) || error.message.startsWith("invalid configuration: ")) throw error;
    throw new ConfigError(
      error.problems,
      `invalid configuration in ${fileName}:\n  ${error.problems.join("\n  ")}`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Writing and printing

/** The edge.json `mxtunnel-edge init` writes: every key spelled out so operators see what they can tune. */
export function defaultEdgeConfig(fields: {
  hostname: string;
  domains: string[];
  smtpListen?: string;
  tunnelListen?: string;
  publicUrl?: string;
}): Required<EdgeConfigFile> {
  const tunnelListen = fields.tunnelListen ?? EDGE_DEFAULTS.tunnelListen;
  const port = parseHostPort(tunnelListen, "tunnelListen").port;
  const hostname = fields.hostname.toLowerCase();
  return {
    hostname,
    domains: fields.domains.map((domain) => domain.toLowerCase()),
    smtpListen: fields.smtpListen ?? EDGE_DEFAULTS.smtpListen,
    tunnelListen,
    publicUrl: fields.publicUrl ?? `ws://${hostname}:${port}`,
    forwards: [],
    openTimeout: EDGE_DEFAULTS.openTimeout,
    stableAfter: EDGE_DEFAULTS.stableAfter,
    limits: { ...EDGE_DEFAULTS.limits },
    spool: { ...EDGE_DEFAULTS.spool },
    outbound: { ...EDGE_DEFAULTS.outbound },
    transports: {},
    dnsServers: [],
    requireTLS: [],
    metricsListen: null,
    mxPriority: EDGE_DEFAULTS.mxPriority,
    publicAddresses: [],
    checks: { ...EDGE_DEFAULTS.checks, dnsbls: [...EDGE_DEFAULTS.checks.dnsbls] },
    logLevel: EDGE_DEFAULTS.logLevel,
  };
}

/** The home.json `mxtunnel-home pair` writes when there is none yet. */
export function defaultHomeConfig(): Required<HomeConfigFile> {
  return {
    postfix: { ...HOME_DEFAULTS.postfix },
    recipients: { ...HOME_DEFAULTS.recipients },
    services: {},
    allowPrivateClientIPs: false,
    relayListen: HOME_DEFAULTS.relayListen,
    relayLimits: { ...HOME_DEFAULTS.relayLimits },
    relayTimeout: HOME_DEFAULTS.relayTimeout,
    relayAuth: null,
    reconnect: { ...HOME_DEFAULTS.reconnect },
    logLevel: HOME_DEFAULTS.logLevel,
  };
}

const SECRET_FIELDS = new Set(["password", "pass", "secret", "token", "privateKey", "psk"]);
export const MASK = "********";

/** A deep copy safe to print: relay passwords and any secret-named field replaced by MASK. */
export function maskSecrets<T>(config: T): T {
  const mask = (value: unknown, path: readonly string[]): unknown => {
    if (Array.isArray(value)) return value.map((item) => mask(item, path));
    if (typeof value !== "object" || value === null) return value;
    const underUsers = path.length >= 2 && path.at(-1) === "users" && path.at(-2) === "relayAuth";
    return Object.fromEntries(
      Object.entries(value).map(([key, item]) => [
        key,
        underUsers || (SECRET_FIELDS.has(key) && item !== null) ? MASK : mask(item, [...path, key]),
      ]),
    );
  };
  return mask(config, []) as T;
}
