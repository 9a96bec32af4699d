// The outbound queue: relay streams from homes are checked (the home's domains, rate, size), written
// durably (temp, fsync, rename, fsync dir) and only then answered `queued`; a runner delivers them
// (DKIM-signed, one connection per recipient domain), retries temporary failures with doubling
// delays up to outbound.maxAge, and turns permanent failures into a DSN that goes back to the
// sender's home. Relay ids are remembered durably while their message is queued and for 24 h after it
// left, so a lost RESULT never sends twice.
//
// On disk (DIR/outbound): <id>.eml (the message as received) and <id>.json (envelope and state); an
// entry exists once both are in place and the directory is synced, and only then is it answered.
// seen/<key>: relay ids of messages that have left the queue (the entry's .json, moved there in the
// same step that removes the entry, so no state lacks both). Bodies are never logged or listed.
import { createHash, randomBytes } from "node:crypto";
import { mkdir, readdir, readFile, rename, stat, unlink } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import { join } from "node:path";
import {
  buildDsn,
  ConfigError,
  type EdgeConfig,
  type EdgeOutbound,
  fsyncDirectory,
  isPrivateClientAddress,
  type Logger,
  type MuxStream,
  readCaFile,
  stageFile,
  TokenBucket,
  wantsFailureDsn,
  writeFileAtomic,
} from "@mxtunnel/shared";
import addressparser from "nodemailer/lib/addressparser";
import { Deliverer, type RecipientResult } from "./delivery.js";
import { type DkimKey, dkimSignature, domainOf, loadDkimKeys, splitMessage } from "./dkim.js";
import { type HomeMailbox, TunnelHomeMailbox } from "./home-mailbox.js";
import type { TunnelServer } from "./tunnel-server.js";

/** OPEN meta of a relay stream (docs/protocol.md "relay streams"). */
export interface RelayMeta {
  id: string;
  mailFrom: string;
  rcptTo: { address: string; params: Record<string, string> }[];
  params: Record<string, string>;
  size: number;
}

export type RelayResult =
  | { status: "queued"; id: string; duplicate?: true }
  | { status: "rejected" | "deferred"; code: number; enhanced: string; message: string };

export interface RelayHome {
  publicKey: string;
  name: string;
  domains: readonly string[];
}

type RecipientState = "pending" | "delivered" | "failed";

interface QueueRecipient {
  address: string;
  params: Record<string, string>;
  domain: string;
  state: RecipientState;
  tries: number;
  nextAttemptAt: number;
  code?: number;
  enhanced?: string;
  lastError?: string;
  remoteMta?: string;
}

interface QueueEntry {
  version: 1;
  id: string;
  /** relay: from a home, to the internet; dsn: a bounce going back to a home. */
  kind: "relay" | "dsn";
  relayId?: string;
  home: string;
  homeName: string;
  mailFrom: string;
  params: Record<string, string>;
  recipients: QueueRecipient[];
  size: number;
  sha256: string;
  createdAt: number;
  expiresAt: number;
  tries: number;
  lastError?: string;
  lastAttemptAt?: number;
}

/** One row of `mxtunnel-edge queue`: never the content. */
export interface OutboundQueueEntry {
  queue: "outbound";
  id: string;
  kind: "relay" | "dsn";
  home: string;
  from: string;
  to: string[];
  size: number;
  createdAt: string;
  ageSeconds: number;
  tries: number;
  nextAttemptAt: string | null;
  lastError: string | null;
  state: "active" | "queued" | "deferred";
}

export interface OutboundQueueOptions {
  dir: string;
  hostname: string;
  settings: EdgeOutbound;
  logger: Logger;
  dkimKeys: ReadonlyMap<string, DkimKey>;
  /** Delivers one message to one domain (the Deliverer in production, a fake in unit tests). */
  deliver: (request: {
    domain: string;
    mailFrom: string;
    params: Record<string, string>;
    recipients: { address: string; params: Record<string, string> }[];
    message: Buffer;
  }) => Promise<RecipientResult[]>;
  /** Where DSNs for a home's senders go. */
  mailbox: (homePublicKey: string) => HomeMailbox;
  now?: () => number;
}

export const DEDUP_WINDOW_MS = 24 * 3600_000;
/** How often the remembered relay ids are checked for expiry (not on every run of the queue). */
const PRUNE_INTERVAL_MS = 60_000;
const ID = /^[0-9a-f]{32}$/;
const MAX_ADDRESS = 320;

export class RelayRefusal extends Error {
  constructor(
    readonly status: "rejected" | "deferred",
    readonly code: number,
    readonly enhanced: string,
    message: string,
  ) {
    super(message);
  }
  get result(): RelayResult {
    return { status: this.status, code: this.code, enhanced: this.enhanced, message: this.message };
  }
}

const reject = (code: number, enhanced: string, message: string) =>
  new RelayRefusal("rejected", code, enhanced, message);

/** Whether `domain` is one of `domains` or below one of them (bounces come from mx.example.org). */
export function domainAllowed(domain: string, domains: readonly string[]): boolean {
  const d = domain.toLowerCase();
  return domains.some((allowed) => d === allowed || d.endsWith(`.${allowed}`));
}

function isAddress(text: unknown): text is string {
  return (
    typeof text === "string" &&
    text.length <= MAX_ADDRESS &&
    // biome-ignore lint/suspicious/noControlCharactersInRegex: refuses control characters
    !/[\x00-\x20<>\x7f]/.test(text) &&
    /^[^@]+@[^@]+\.[^@]+$/.test(text)
  );
}

function isParams(value: unknown): value is Record<string, string> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const entries = Object.entries(value);
  return (
    entries.length <= 16 &&
    entries.every(
      ([k, v]) =>
        /^[A-Z0-9-]{1,20}$/.test(k) && typeof v === "string" && v.length <= 500 && !/[\r\n]/.test(v),
    )
  );
}

/** Validates OPEN meta; throws RelayRefusal (5.5.4) naming what is wrong. */
export function parseRelayMeta(meta: Record<string, unknown>, maxRecipients: number): RelayMeta {
  const bad = (what: string) => reject(501, "5.5.4", `malformed relay request: ${what}`);
  if (typeof meta.id !== "string" || !ID.test(meta.id)) throw bad("id must be 32 lower-case hex digits");
  if (typeof meta.mailFrom !== "string" || (meta.mailFrom !== "" && !isAddress(meta.mailFrom)))
    throw bad("mailFrom must be an address or empty");
  if (!isParams(meta.params)) throw bad("params must map ESMTP keywords to text");
  if (typeof meta.size !== "number" || !Number.isInteger(meta.size) || meta.size < 0)
    throw bad("size must be a whole number");
  if (!Array.isArray(meta.rcptTo) || meta.rcptTo.length === 0) throw bad("rcptTo must list recipients");
  if (meta.rcptTo.length > maxRecipients)
    throw new RelayRefusal("rejected", 452, "4.5.3", `too many recipients (at most ${maxRecipients})`);
  const rcptTo = meta.rcptTo.map((r: unknown) => {
    const rcpt = r as { address?: unknown; params?: unknown };
    if (typeof r !== "object" || r === null || !isAddress(rcpt.address) || !isParams(rcpt.params))
      throw bad("each rcptTo needs an address and params");
    return { address: rcpt.address, params: rcpt.params };
  });
  return { id: meta.id, mailFrom: meta.mailFrom, rcptTo, params: meta.params, size: meta.size };
}

/** The addresses of the message's From field(s); throws RelayRefusal when there is not exactly one field. */
export function headerFromAddresses(message: Buffer): string[] {
  const froms = splitMessage(message).headers.filter((h) => h.name === "from");
  if (froms.length !== 1)
    throw reject(
      550,
      "5.6.0",
      froms.length === 0 ? "the message has no From header" : "more than one From header",
    );
  const value = froms[0]!.raw.slice(froms[0]!.raw.indexOf(":") + 1).replace(/\r\n/g, "");
  const addresses = addressparser(value, { flatten: true })
    .map((a) => ("address" in a ? (a.address ?? "") : ""))
    .filter(Boolean);
  if (addresses.length === 0) throw reject(550, "5.6.0", "the From header holds no address");
  return addresses;
}

export class OutboundQueue {
  private readonly dir: string;
  private readonly seenDir: string;
  private readonly entries = new Map<string, QueueEntry>();
  /** dedup key → when its message left the queue (epoch ms); kept DEDUP_WINDOW_MS */
  private readonly seen = new Map<string, number>();
  /** dedup keys of the relay entries in `entries` */
  private readonly queuedKeys = new Set<string>();
  private nextPruneAt = 0;
  private readonly inFlight = new Set<string>();
  private readonly buckets = new Map<string, TokenBucket>();
  private readonly active = new Set<string>();
  private readonly activePerDomain = new Map<string, number>();
  private timer: NodeJS.Timeout | undefined;
  private pumpScheduled = false;
  private stopped = false;
  private readonly running = new Set<Promise<void>>();
  private readonly now: () => number;
  readonly counters = {
    queued: 0,
    duplicates: 0,
    rejected: 0,
    deferred: 0,
    delivered: 0,
    failed: 0,
    dsns: 0,
  };
  /** Milliseconds spent in DKIM signing, and how many signatures. */
  readonly dkimStats = { ms: 0, count: 0 };

  constructor(private readonly options: OutboundQueueOptions) {
    this.dir = join(options.dir, "outbound");
    this.seenDir = join(this.dir, "seen");
    this.now = options.now ?? Date.now;
  }

  /** Loads the queue from disk, drops half-written files, restores dedup ids, and starts the runner. */
  async start(): Promise<void> {
    await mkdir(this.seenDir, { recursive: true, mode: 0o700 });
    const names = new Set(await readdir(this.dir));
    const loaded: QueueEntry[] = [];
    for (const name of names) {
      if (name.startsWith(".") && name.endsWith(".tmp")) await unlink(join(this.dir, name)).catch(() => {});
      // Half an entry (a body without its envelope, or the other way round) was never acknowledged:
      // the home still holds the message. Both halves are written before the answer.
      const half = name.endsWith(".eml")
        ? !names.has(`${name.slice(0, -4)}.json`)
        : name.endsWith(".json") && !names.has(`${name.slice(0, -5)}.eml`);
      if (half) await unlink(join(this.dir, name)).catch(() => {});
    }
    for (const name of names) {
      if (!name.endsWith(".json") || name.startsWith(".") || !names.has(`${name.slice(0, -5)}.eml`)) continue;
      const path = join(this.dir, name);
      try {
        loaded.push(JSON.parse(await readFile(path, "utf8")) as QueueEntry);
      } catch (error) {
        this.options.logger.error(
          { file: path, err: (error as Error).message },
          "unreadable queue file; left in place",
        );
      }
    }
    // The map's order is the order the runner tries entries in: oldest first.
    for (const entry of loaded.sort((a, b) => a.createdAt - b.createdAt)) this.addEntry(entry);
    const cutoff = this.now() - DEDUP_WINDOW_MS;
    for (const name of await readdir(this.seenDir)) {
      const path = join(this.seenDir, name);
      if (name.startsWith(".")) {
        await unlink(path).catch(() => {});
        continue;
      }
      const at = (await stat(path)).mtimeMs;
      if (at < cutoff) await unlink(path).catch(() => {});
      else this.seen.set(name, at);
    }
    this.nextPruneAt = this.now() + PRUNE_INTERVAL_MS;
    this.options.logger.info(
      { entries: this.entries.size, relayIds: this.seen.size + this.queuedKeys.size },
      "outbound queue loaded",
    );
    this.kick();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await Promise.allSettled([...this.running]);
  }

  /** Delivery attempts now for everything waiting (`queue flush`). */
  flush(): void {
    for (const entry of this.entries.values()) {
      for (const r of entry.recipients) if (r.state === "pending") r.nextAttemptAt = 0;
    }
    this.kick();
  }

  /** Removes an entry without delivering it (`queue delete ID`); true when it existed. */
  async delete(id: string): Promise<boolean> {
    const entry = this.entries.get(id);
    if (!entry || this.active.has(id)) return false;
    await this.remove(entry);
    return true;
  }

  entriesList(): OutboundQueueEntry[] {
    const now = this.now();
    return [...this.entries.values()]
      .sort((a, b) => a.createdAt - b.createdAt)
      .map((entry) => {
        return queueRow(entry, now, this.active.has(entry.id));
      });
  }

  get size(): number {
    return this.entries.size;
  }

  // ---- accepting relay streams --------------------------------------------------------------

  /** The "relay" stream handler: read, check, queue durably, answer RESULT, END. */
  handleStream(stream: MuxStream, home: RelayHome): void {
    const log = this.options.logger.child({ home: home.name, stream: stream.id });
    const answer = (result: RelayResult) => {
      if (stream.destroyed) return;
      stream.sendResult(result);
      stream.end();
      stream.resume(); // whatever the home still sends is discarded
    };
    this.accept(stream, home)
      .then(answer)
      .catch((error: unknown) => {
        if (error instanceof RelayRefusal) {
          if (error.status === "rejected") this.counters.rejected++;
          else this.counters.deferred++;
          log.info({ code: error.code, reason: error.message }, "relay refused");
          answer(error.result);
          return;
        }
        if (error instanceof StreamGone) {
          log.info("relay stream closed before the message was complete; nothing queued");
          return;
        }
        log.error({ err: (error as Error).message }, "relay failed");
        answer({
          status: "deferred",
          code: 451,
          enhanced: "4.3.0",
          message: "the edge could not queue the message",
        });
      });
  }

  private async accept(stream: MuxStream, home: RelayHome): Promise<RelayResult> {
    const { settings } = this.options;
    const meta = parseRelayMeta(stream.meta, settings.maxRecipients);
    if (meta.mailFrom !== "" && !domainAllowed(domainOf(meta.mailFrom), home.domains)) {
      throw reject(550, "5.7.1", `sender <${meta.mailFrom}> is not in this home's domains`);
    }
    if (meta.size > settings.maxMessageSize) {
      throw reject(552, "5.3.4", `message too big (limit ${settings.maxMessageSize} bytes)`);
    }
    const key = dedupKey(home.publicKey, meta.id);
    const message = await readAll(stream, settings.maxMessageSize);
    if (message.length !== meta.size) {
      throw reject(554, "5.6.0", `message is ${message.length} bytes, meta said ${meta.size}`);
    }
    for (const address of headerFromAddresses(message)) {
      if (!domainAllowed(domainOf(address), home.domains))
        throw reject(550, "5.7.1", `header From <${address}> is not in this home's domains`);
    }
    if (this.isKnown(key)) {
      this.counters.duplicates++;
      return { status: "queued", id: meta.id, duplicate: true };
    }
    if (!this.bucket(home.publicKey).take()) {
      throw new RelayRefusal(
        "deferred",
        451,
        "4.7.1",
        `rate limit: more than ${settings.messagesPerHour} messages an hour`,
      );
    }
    this.inFlight.add(key);
    try {
      const entry = this.newEntry({
        kind: "relay",
        relayId: meta.id,
        home,
        mailFrom: meta.mailFrom,
        params: meta.params,
        recipients: meta.rcptTo,
        message,
      });
      await this.commit(entry, message);
      this.counters.queued++;
      this.options.logger.info(
        { id: entry.id, relayId: meta.id, home: home.name, rcpt: entry.recipients.length, size: entry.size },
        "queued",
      );
      this.kick();
      return { status: "queued", id: meta.id };
    } finally {
      this.inFlight.delete(key);
    }
  }

  /**
   * Queues mail the edge writes itself for delivery out, such as a DSN for spooled mail that the
   * home's Postfix refused; committed with the same fsync discipline as relayed mail.
   */
  async enqueueLocal(
    envelope: { mailFrom: string; rcptTo: string[] },
    message: Buffer,
    home: { publicKey: string; name: string },
  ): Promise<string> {
    const entry = this.newEntry({
      kind: "relay",
      home,
      mailFrom: envelope.mailFrom,
      params: {},
      recipients: envelope.rcptTo.map((address) => ({ address, params: {} })),
      message,
    });
    await this.commit(entry, message);
    this.counters.queued++;
    this.options.logger.info(
      { id: entry.id, rcpt: entry.recipients.length, size: entry.size },
      "queued locally written mail",
    );
    this.kick();
    return entry.id;
  }

  private bucket(home: string): TokenBucket {
    let bucket = this.buckets.get(home);
    if (!bucket) {
      const perHour = this.options.settings.messagesPerHour;
      bucket = new TokenBucket(perHour / 3600, perHour);
      this.buckets.set(home, bucket);
    }
    return bucket;
  }

  /** A new entry, every recipient due now. */
  private newEntry(fields: {
    kind: QueueEntry["kind"];
    id?: string;
    relayId?: string;
    home: { publicKey: string; name: string };
    mailFrom: string;
    params: Record<string, string>;
    recipients: readonly { address: string; params: Record<string, string> }[];
    message: Buffer;
  }): QueueEntry {
    const now = this.now();
    return {
      version: 1,
      id: fields.id ?? randomBytes(8).toString("hex"),
      kind: fields.kind,
      ...(fields.relayId === undefined ? {} : { relayId: fields.relayId }),
      home: fields.home.publicKey,
      homeName: fields.home.name,
      mailFrom: fields.mailFrom,
      params: fields.params,
      recipients: fields.recipients.map((r) => ({
        address: r.address,
        params: r.params,
        domain: domainOf(r.address),
        state: "pending",
        tries: 0,
        nextAttemptAt: now,
      })),
      size: fields.message.length,
      sha256: createHash("sha256").update(fields.message).digest("hex"),
      createdAt: now,
      expiresAt: now + this.options.settings.maxAge,
      tries: 0,
    };
  }

  /**
   * Writes a new entry durably: body and envelope are written and fsync'd side by side, renamed into
   * place, and one directory fsync makes both names durable (two fsync latencies in all). Until that
   * fsync a crash may leave either half alone, which start() drops: nothing was answered yet.
   */
  private async commit(entry: QueueEntry, message: Buffer): Promise<void> {
    const body = join(this.dir, `${entry.id}.eml`);
    const envelope = join(this.dir, `${entry.id}.json`);
    const staged = await Promise.allSettled([
      stageFile(body, message, { mode: 0o600 }),
      stageFile(envelope, JSON.stringify(entry), { mode: 0o600 }),
    ]);
    const temps = staged.flatMap((s) => (s.status === "fulfilled" ? [s.value] : []));
    try {
      for (const s of staged) if (s.status === "rejected") throw s.reason;
      await rename(temps[0]!, body);
      await rename(temps[1]!, envelope);
      await fsyncDirectory(this.dir);
    } catch (error) {
      await Promise.all([...temps, envelope, body].map((path) => unlink(path).catch(() => {})));
      throw error;
    }
    this.addEntry(entry);
  }

  private addEntry(entry: QueueEntry): void {
    this.entries.set(entry.id, entry);
    if (entry.relayId) this.queuedKeys.add(dedupKey(entry.home, entry.relayId));
  }

  /** Whether a relay id (as its dedup key) is queued, being queued, or left the queue recently. */
  private isKnown(key: string): boolean {
    return this.queuedKeys.has(key) || this.inFlight.has(key) || this.seen.has(key);
  }

  private save(entry: QueueEntry): Promise<void> {
    return writeFileAtomic(join(this.dir, `${entry.id}.json`), JSON.stringify(entry), { mode: 0o600 });
  }

  /**
   * Drops an entry. The envelope goes first: without it a leftover body is dropped at the next start.
   * A relayed entry's envelope is renamed into seen/ rather than deleted, so its relay id stays
   * remembered: the rename is atomic, so no crash leaves the id neither queued nor seen.
   */
  private async remove(entry: QueueEntry): Promise<void> {
    const envelope = join(this.dir, `${entry.id}.json`);
    const key = entry.relayId === undefined ? undefined : dedupKey(entry.home, entry.relayId);
    if (key === undefined) await unlink(envelope).catch(ignoreMissing);
    else await rename(envelope, join(this.seenDir, key)).catch(ignoreMissing);
    await unlink(join(this.dir, `${entry.id}.eml`)).catch(ignoreMissing);
    await Promise.all([
      fsyncDirectory(this.dir),
      key === undefined ? undefined : fsyncDirectory(this.seenDir),
    ]);
    this.entries.delete(entry.id);
    if (key !== undefined) {
      this.queuedKeys.delete(key);
      this.seen.set(key, this.now());
    }
  }

  // ---- the runner ---------------------------------------------------------------------------

  private kick(): void {
    if (this.stopped || this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  private pump(): void {
    if (this.stopped) return;
    const { settings } = this.options;
    const now = this.now();
    let wake = Number.POSITIVE_INFINITY;
    if (now >= this.nextPruneAt) {
      this.nextPruneAt = now + PRUNE_INTERVAL_MS;
      this.pruneSeen(now);
    }
    // Entries are in the map oldest first (start() loads them sorted; new ones are appended).
    // One pass over each waiting entry's recipients, no arrays built: with a backlog (mail accepted
    // faster than one domain takes it) this loop runs over every entry on every kick.
    for (const entry of this.entries.values()) {
      if (this.active.has(entry.id)) continue;
      let pending = false;
      let due = false;
      // One domain per entry at a time keeps the entry's file writes in order: the first due
      // recipient's domain that has a delivery slot free.
      let domain: string | undefined;
      for (const r of entry.recipients) {
        if (r.state !== "pending") continue;
        pending = true;
        if (r.nextAttemptAt > now) {
          if (r.nextAttemptAt < wake) wake = r.nextAttemptAt;
          continue;
        }
        due = true;
        if (domain === undefined && (this.activePerDomain.get(r.domain) ?? 0) < settings.concurrencyPerDomain)
          domain = r.domain;
      }
      if (!due) {
        if (!pending) this.track(this.finish(entry));
        continue;
      }
      if (this.active.size >= settings.concurrency) break;
      if (entry.kind === "dsn") {
        this.track(this.runDsn(entry));
        continue;
      }
      if (domain === undefined) continue;
      const recipients = entry.recipients.filter(
        (r) => r.state === "pending" && r.nextAttemptAt <= now && r.domain === domain,
      );
      this.track(this.runDomain(entry, domain, recipients));
    }
    clearTimeout(this.timer);
    if (Number.isFinite(wake)) {
      this.timer = setTimeout(() => this.kick(), Math.min(2 ** 31 - 1, Math.max(0, wake - this.now())));
      this.timer.unref();
    }
  }

  private track(work: Promise<void>): void {
    this.running.add(work);
    void work.finally(() => {
      this.running.delete(work);
      this.kick();
    });
  }

  private retryDelay(tries: number): number {
    const { retryMin, retryMax } = this.options.settings;
    return Math.min(retryMax, retryMin * 2 ** Math.max(0, tries - 1));
  }

  private async runDomain(entry: QueueEntry, domain: string, recipients: QueueRecipient[]): Promise<void> {
    this.active.add(entry.id);
    this.activePerDomain.set(domain, (this.activePerDomain.get(domain) ?? 0) + 1);
    const log = this.options.logger.child({ id: entry.id, domain });
    try {
      const message = await readFile(join(this.dir, `${entry.id}.eml`));
      const signed = this.sign(message, entry, log);
      const results = await this.options.deliver({
        domain,
        mailFrom: entry.mailFrom,
        params: entry.params,
        recipients: recipients.map((r) => ({ address: r.address, params: r.params })),
        message: signed,
      });
      const now = this.now();
      entry.tries++;
      entry.lastAttemptAt = now;
      for (const r of recipients) {
        const result = results.find((x) => x.address === r.address) ?? {
          address: r.address,
          outcome: "deferred" as const,
          code: 451,
          enhanced: "4.3.0",
          message: "no result for this recipient",
        };
        r.tries++;
        r.code = result.code;
        r.enhanced = result.enhanced;
        if (result.outcome === "delivered") delete r.lastError;
        else r.lastError = result.message;
        if (result.remoteMta) r.remoteMta = result.remoteMta;
        if (result.outcome === "delivered") {
          r.state = "delivered";
          this.counters.delivered++;
        } else if (result.outcome === "failed") {
          r.state = "failed";
          this.counters.failed++;
        } else if (now >= entry.expiresAt) {
          r.state = "failed";
          r.enhanced = r.enhanced?.startsWith("4.") ? r.enhanced.replace(/^4/, "5") : "5.4.7";
          r.lastError = `gave up after ${Math.round((now - entry.createdAt) / 3600_000)} h: ${result.message}`;
          this.counters.failed++;
        } else {
          r.nextAttemptAt = now + this.retryDelay(r.tries);
        }
        if (r.state !== "pending" || result.outcome !== "delivered")
          log.info(
            {
              rcpt: r.address,
              outcome: r.state === "pending" ? "deferred" : r.state,
              code: result.code,
              reply: result.message,
            },
            "delivery attempt",
          );
      }
      const failedNow = results.find((x) => x.outcome !== "delivered");
      if (failedNow) entry.lastError = failedNow.message;
      if (entry.recipients.every((r) => r.state !== "pending")) await this.finishNow(entry);
      else await this.save(entry);
    } catch (error) {
      log.error({ err: (error as Error).message }, "delivery run failed");
      for (const r of recipients) r.nextAttemptAt = this.now() + this.retryDelay(Math.max(1, r.tries));
    } finally {
      this.active.delete(entry.id);
      const left = (this.activePerDomain.get(domain) ?? 1) - 1;
      if (left <= 0) this.activePerDomain.delete(domain);
      else this.activePerDomain.set(domain, left);
    }
  }

  private sign(message: Buffer, entry: QueueEntry, log: Logger): Buffer {
    let domain = "";
    try {
      domain = domainOf(headerFromAddresses(message)[0] ?? "");
    } catch {
      domain = domainOf(entry.mailFrom);
    }
    // The key of the From domain, or of the home domain it sits under (mx.example.org → example.org).
    const key =
      this.options.dkimKeys.get(domain) ??
      [...this.options.dkimKeys.values()].find((k) => domain.endsWith(`.${k.domain}`));
    if (!key) {
      log.warn({ fromDomain: domain }, "no DKIM key for this domain; sent unsigned");
      return message;
    }
    const started = performance.now();
    const header = dkimSignature(message, key, new Date(this.now()));
    this.dkimStats.ms += performance.now() - started;
    this.dkimStats.count++;
    return Buffer.concat([Buffer.from(header, "latin1"), message]);
  }

  private async finish(entry: QueueEntry): Promise<void> {
    this.active.add(entry.id);
    try {
      await this.finishNow(entry);
    } finally {
      this.active.delete(entry.id);
    }
  }

  /** Every recipient is settled: queue the DSN (if any is due), then drop the entry. */
  private async finishNow(entry: QueueEntry): Promise<void> {
    const failed = entry.recipients.filter((r) => r.state === "failed" && wantsFailureNotice(r));
    if (entry.kind === "relay" && failed.length > 0 && entry.mailFrom !== "") {
      const dsnId = `${entry.id}d`;
      if (!this.entries.has(dsnId)) {
        const original = await readFile(join(this.dir, `${entry.id}.eml`));
        const dsn = buildDsn({
          reportingMta: this.options.hostname,
          sender: entry.mailFrom,
          original,
          arrivalDate: new Date(entry.createdAt),
          envelopeId: entry.params.ENVID,
          returnFull: entry.params.RET?.toUpperCase() === "FULL",
          recipients: failed.map((r) => ({
            address: r.address,
            originalRecipient: r.params.ORCPT,
            action: "failed",
            status: /^5\.\d+\.\d+$/.test(r.enhanced ?? "") ? r.enhanced! : "5.0.0",
            diagnostic: r.lastError,
            remoteMta: r.remoteMta,
            lastAttempt: entry.lastAttemptAt ? new Date(entry.lastAttemptAt) : undefined,
          })),
          now: new Date(this.now()),
        });
        await this.commit(
          this.newEntry({
            kind: "dsn",
            id: dsnId,
            home: { publicKey: entry.home, name: entry.homeName },
            mailFrom: "",
            params: {},
            recipients: [{ address: entry.mailFrom, params: {} }],
            message: dsn,
          }),
          dsn,
        );
        this.counters.dsns++;
        this.options.logger.info(
          { id: entry.id, dsn: dsnId, failed: failed.length },
          "DSN queued for the sender",
        );
      }
    } else if (failed.length > 0) {
      this.options.logger.warn(
        { id: entry.id, failed: failed.length },
        "undeliverable bounce dropped (no DSN for <>)",
      );
    }
    await this.remove(entry);
    this.options.logger.info(
      {
        id: entry.id,
        delivered: entry.recipients.filter((r) => r.state === "delivered").length,
        failed: entry.recipients.filter((r) => r.state === "failed").length,
      },
      "done",
    );
  }

  private async runDsn(entry: QueueEntry): Promise<void> {
    this.active.add(entry.id);
    const recipient = entry.recipients[0]!;
    const log = this.options.logger.child({ id: entry.id, kind: "dsn" });
    try {
      const message = await readFile(join(this.dir, `${entry.id}.eml`));
      const now = this.now();
      entry.tries++;
      recipient.tries++;
      entry.lastAttemptAt = now;
      try {
        await this.options.mailbox(entry.home).submit({ mailFrom: "", rcptTo: [recipient.address] }, message);
        recipient.state = "delivered";
        log.info("DSN handed to home");
        await this.remove(entry);
        return;
      } catch (error) {
        const permanent = (error as { permanent?: boolean }).permanent === true;
        entry.lastError = (error as Error).message;
        recipient.lastError = entry.lastError;
        if (permanent || now >= entry.expiresAt) {
          log.error({ reason: entry.lastError }, "DSN could not be handed to home; dropped");
          await this.remove(entry);
          return;
        }
        recipient.nextAttemptAt = now + this.retryDelay(recipient.tries);
        log.info({ reason: entry.lastError }, "DSN deferred");
        await this.save(entry);
      }
    } catch (error) {
      log.error({ err: (error as Error).message }, "DSN run failed");
      recipient.nextAttemptAt = this.now() + this.retryDelay(Math.max(1, recipient.tries));
    } finally {
      this.active.delete(entry.id);
    }
  }

  private pruneSeen(now: number): void {
    const cutoff = now - DEDUP_WINDOW_MS;
    for (const [key, at] of this.seen) {
      if (at >= cutoff) continue;
      this.seen.delete(key);
      void unlink(join(this.seenDir, key)).catch(() => {});
    }
  }
}

/** NOTIFY=NEVER, or a NOTIFY list without FAILURE, asks for no failure DSN (RFC 3461). */
function wantsFailureNotice(r: QueueRecipient): boolean {
  return wantsFailureDsn(r.params.NOTIFY);
}

/** A home's relay ids live in their own space: one home cannot shadow another's. */
function dedupKey(home: string, relayId: string): string {
  return createHash("sha256").update(`${home}\0${relayId}`).digest("hex").slice(0, 40);
}

class StreamGone extends Error {}

/** Reads a stream to its END, at most `limit` bytes (more: RelayRefusal 552). */
function readAll(stream: MuxStream, limit: number): Promise<Buffer> {
  return new Promise((resolve, rejectPromise) => {
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = (error?: Error) => {
      if (done) return;
      done = true;
      stream.off("data", onData);
      stream.off("end", onEnd);
      stream.off("close", onClose);
      if (error) rejectPromise(error);
      else resolve(Buffer.concat(chunks, size));
    };
    const onData = (chunk: Buffer) => {
      size += chunk.length;
      if (size > limit) {
        finish(reject(552, "5.3.4", `message too big (limit ${limit} bytes)`));
        return;
      }
      chunks.push(chunk);
    };
    const onEnd = () => finish();
    const onClose = () => finish(new StreamGone());
    stream.on("data", onData);
    stream.once("end", onEnd);
    stream.once("close", onClose);
  });
}

function ignoreMissing(error: unknown): void {
  if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
}

/** The outbound queue as stored in DIR/outbound, for `mxtunnel-edge queue` when no agent runs. */
export async function outboundQueueEntries(edgeDir: string, now = Date.now()): Promise<OutboundQueueEntry[]> {
  const dir = join(edgeDir, "outbound");
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw error;
  }
  const rows: OutboundQueueEntry[] = [];
  for (const name of names.filter((n) => n.endsWith(".json") && !n.startsWith("."))) {
    let entry: QueueEntry;
    try {
      entry = JSON.parse(await readFile(join(dir, name), "utf8")) as QueueEntry;
    } catch {
      continue; // removed meanwhile, or damaged (the agent logs it at start)
    }
    rows.push(queueRow(entry, now, false));
  }
  return rows.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** Text rows for `mxtunnel-edge queue`. */
export function renderOutboundQueue(rows: readonly OutboundQueueEntry[]): string {
  if (rows.length === 0) return "outbound queue: empty";
  const lines = [`outbound queue: ${rows.length} message(s)`];
  for (const r of rows) {
    lines.push(
      `  ${r.id}  ${r.kind}  ${r.state}  age ${r.ageSeconds}s  ${r.size} B  tries ${r.tries}  next ${r.nextAttemptAt ?? "-"}  <${r.from}> → ${r.to.join(", ")}` +
        (r.lastError ? `\n      last error: ${r.lastError}` : ""),
    );
  }
  return lines.join("\n");
}

/** The edge's public address as home's Postfix should see it for DSNs (PROXY header). */
export function edgePublicAddress(config: EdgeConfig): string {
  for (const listen of [config.smtpListen, config.tunnelListen]) {
    if (net.isIP(listen.host) && listen.host !== "0.0.0.0" && listen.host !== "::") return listen.host;
  }
  for (const list of Object.values(os.networkInterfaces())) {
    for (const a of list ?? []) if (!a.internal && !isPrivateClientAddress(a.address)) return a.address;
  }
  return "127.0.0.1";
}

/** The extra CA certificates of `outbound.tlsCaFile` (checked at config load; read again here). */
function outboundTrustAnchors(config: EdgeConfig): string[] {
  const path = config.outbound.tlsCaFile;
  if (!path) return [];
  try {
    return readCaFile(path);
  } catch (error) {
    throw new ConfigError([`outbound.tlsCaFile: ${(error as Error).message}`]);
  }
}

/** Builds and starts the outbound queue of a running edge (DKIM keys, MX delivery, DSNs to homes). */
export async function startOutbound(options: {
  dir: string;
  config: EdgeConfig;
  tunnels: TunnelServer;
  logger: Logger;
  /** Where DSNs go; default: live SMTP over the home's tunnel (the spool can take this over). */
  mailbox?: (homePublicKey: string) => HomeMailbox;
}): Promise<OutboundQueue> {
  const { dir, config, tunnels, logger } = options;
  const dkimKeys = await loadDkimKeys(dir);
  for (const domain of config.domains) {
    if (!dkimKeys.has(domain))
      logger.warn({ domain }, "no DKIM key for this domain (run init again or add one)");
  }
  const deliverer = new Deliverer({
    hostname: config.hostname,
    transports: config.transports,
    dnsServers: config.dnsServers,
    requireTLS: config.requireTLS,
    tlsCa: outboundTrustAnchors(config),
    logger: logger.child({ component: "delivery" }),
    connectTimeoutMs: config.outbound.connectTimeout,
    commandTimeoutMs: config.outbound.commandTimeout,
    ownAddresses: [config.smtpListen.host, config.tunnelListen.host],
  });
  const clientAddress = edgePublicAddress(config);
  const queue = new OutboundQueue({
    dir,
    hostname: config.hostname,
    settings: config.outbound,
    logger,
    dkimKeys,
    deliver: (request) => deliverer.deliver(request),
    mailbox:
      options.mailbox ??
      ((homePublicKey) =>
        new TunnelHomeMailbox({
          tunnels,
          homePublicKey,
          hostname: config.hostname,
          clientAddress,
          logger: logger.child({ component: "home-mailbox" }),
        })),
  });
  await queue.start();
  return queue;
}

/** One row of `mxtunnel-edge queue` for an outbound entry: recipients still pending, never content. */
function queueRow(entry: QueueEntry, now: number, active: boolean): OutboundQueueEntry {
  const pending = entry.recipients.filter((r) => r.state === "pending");
  const next = pending.length ? Math.min(...pending.map((r) => r.nextAttemptAt)) : null;
  return {
    queue: "outbound",
    id: entry.id,
    kind: entry.kind,
    home: entry.homeName,
    from: entry.mailFrom,
    to: pending.map((r) => r.address),
    size: entry.size,
    createdAt: new Date(entry.createdAt).toISOString(),
    ageSeconds: Math.max(0, Math.round((now - entry.createdAt) / 1000)),
    tries: entry.tries,
    nextAttemptAt: next === null ? null : new Date(Math.max(next, entry.createdAt)).toISOString(),
    lastError: entry.lastError ?? null,
    state: active ? "active" : entry.tries > 0 ? "deferred" : "queued",
  };
}
