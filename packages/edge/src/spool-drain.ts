// Drains the spool to home over `spool` streams: oldest first, a few at a time, each file sent as
// its sealed bytes (home verifies and opens them). A file is deleted only after home's RESULT says
// Postfix took it; a 4xx is retried with backoff; a 5xx or expiry is never silently dropped. When
// Postfix takes it for some recipients only, those are done for good (home logs them), the ones it
// refused for good get the undeliverable treatment, and only the deferred ones are retried.
import {
  type Logger,
  type MuxStream,
  openSpoolCipherStream,
  ResetCode,
  readSpoolMeta,
} from "@mxtunnel/shared";
import type { SpoolEntry, SpoolStore } from "./spool-store.js";
import type { RecipientFailure } from "./undeliverable.js";

/** Where the header begins in a spool file: after "MXSPOOL1" and the u32 header length. */
const SPOOL_HEADER_OFFSET = 12;

import type { TunnelServer } from "./tunnel-server.js";

/** How often the spool is scanned for expired messages while no tunnel can take any. */
const EXPIRY_SCAN_INTERVAL_MS = 900;

export interface SpoolDrainOptions {
  store: SpoolStore;
  tunnels: TunnelServer;
  logger: Logger;
  concurrency: number;
  retryMinMs: number;
  retryMaxMs: number;
  maxAgeMs: number;
  /** How long home may take to inject one message before the attempt counts as failed. */
  resultTimeoutMs?: number;
  /** A tunnel must have been up this long before it drains (the same stability rule as live). */
  stableAfterMs: number;
  /**
   * A message home's Postfix refused for good (5xx), or one that expired: the owner sends a DSN
   * when the sender was authenticated at spool time, and quarantines it otherwise. With `failed`,
   * only those recipients failed; with `partial`, the file stays for other recipients.
   */
  onUndeliverable: (
    entry: SpoolEntry,
    reason: string,
    failed?: RecipientFailure[],
    partial?: boolean,
  ) => Promise<void>;
}

export interface SpoolResult {
  status: "delivered" | "deferred" | "rejected" | "corrupt";
  duplicate?: boolean;
  code?: number;
  message?: string;
  rejected?: string[];
  /** Postfix's reply per refused recipient (homes since per-recipient results; see docs/protocol.md). */
  refused?: { recipient: string; code?: number; message: string }[];
}

export class SpoolDrain {
  private readonly inFlight = new Set<string>();
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private scheduled = false;
  private lastScanAt = 0;
  readonly counters = { delivered: 0, deferred: 0, rejected: 0, duplicates: 0 };

  constructor(private readonly options: SpoolDrainOptions) {
    options.tunnels.on("up", () => this.kick());
    // Retries come due with time; a slow heartbeat picks them up.
    this.timer = setInterval(() => this.kick(), 1000);
    this.timer.unref();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
  }

  /** Looks for work soon (coalesced). */
  kick(): void {
    if (this.scheduled || this.stopped) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.pass();
    });
  }

  private pass(): void {
    const { store, tunnels, concurrency, stableAfterMs, maxAgeMs } = this.options;
    const now = Date.now();
    // With no tunnel to drain to, only expiries can be due, and the heartbeat finds those: a scan of
    // the whole spool for every message spooled while home is away would cost O(n) each.
    const sendable = tunnels.liveTunnels().some((t) => !t.mux.closed && now - t.connectedAt >= stableAfterMs);
    if (!sendable && now - this.lastScanAt < EXPIRY_SCAN_INTERVAL_MS) return;
    this.lastScanAt = now;
    for (const entry of store.inOrder()) {
      if (this.inFlight.size >= concurrency || this.stopped) return;
      if (this.inFlight.has(entry.id) || entry.nextAttemptAt > now) continue;
      if (now - entry.receivedAt > maxAgeMs) {
        this.inFlight.add(entry.id);
        const reason = `could not be delivered to the home mail server for ${Math.round(maxAgeMs / 3600_000)} hours`;
        void this.options
          .onUndeliverable(entry, reason)
          .catch((error: Error) =>
            this.options.logger.error({ id: entry.id, err: error.message }, "undeliverable handling failed"),
          )
          .finally(() => this.inFlight.delete(entry.id));
        continue;
      }
      const tunnel = tunnels.tunnelOf(entry.homeKey);
      if (!tunnel || tunnel.mux.closed || now - tunnel.connectedAt < stableAfterMs) continue;
      this.inFlight.add(entry.id);
      this.options.logger.debug({ id: entry.id, tries: entry.tries }, "draining to home");
      void this.send(entry, tunnel.mux.open.bind(tunnel.mux)).finally(() => {
        this.inFlight.delete(entry.id);
        this.kick();
      });
    }
  }

  private async send(
    entry: SpoolEntry,
    open: (kind: "spool", meta: Record<string, unknown>) => MuxStream,
  ): Promise<void> {
    const { store, logger } = this.options;
    const log = logger.child({ id: entry.id });
    let result: SpoolResult;
    try {
      const meta = await readSpoolMeta(entry.path);
      // The stream carries the header's exact bytes, then the sealed chunks: a header with many
      // recipients may outgrow the 8 KiB limit on stream metadata. The preamble is the 8-byte magic
      // and a u32 length, so the header starts at byte 12 and runs up to the cipher.
      const headerLength = meta.cipherOffset - SPOOL_HEADER_OFFSET;
      const stream = open("spool", {
        id: entry.id,
        headerLength,
        cipherLength: meta.cipherLength,
        cipherSha256: meta.cipherSha256,
        ...recipientsMeta(entry),
      });
      const body = openSpoolCipherStream(entry.path, {
        cipherOffset: SPOOL_HEADER_OFFSET,
        cipherLength: headerLength + meta.cipherLength,
      });
      result = await this.exchange(stream, body);
    } catch (error) {
      result = { status: "deferred", message: (error as Error).message };
    }
    const split = result.status === "corrupt" ? undefined : splitRefusals(result);
    if (split) {
      try {
        await this.settleRecipients(entry, result, split, log);
      } catch (error) {
        // Nothing was narrowed: the next attempt asks home again, which skips whom it delivered to.
        log.error({ err: (error as Error).message }, "handling refused recipients failed");
        await this.defer(entry, `refused recipients not yet handled: ${(error as Error).message}`, log);
      }
      return;
    }
    switch (result.status) {
      case "delivered":
        if (result.duplicate) this.counters.duplicates++;
        this.counters.delivered++;
        log.info(
          { duplicate: Boolean(result.duplicate), tries: entry.tries + 1 },
          "spooled message delivered to home",
        );
        await store.remove(entry.id);
        return;
      case "deferred":
        await this.defer(entry, result.message ?? "deferred", log);
        return;
      case "rejected":
        this.counters.rejected++;
        await this.options.onUndeliverable(
          entry,
          `${result.code ?? 550} ${result.message ?? "rejected by the home mail server"}`.trim(),
        );
        return;
      case "corrupt":
        this.counters.rejected++;
        await store.quarantine(entry.id, `home could not open it: ${result.message ?? "corrupt"}`);
        return;
    }
  }

  private async defer(entry: SpoolEntry, reason: string, log: Logger): Promise<void> {
    this.counters.deferred++;
    const delay = Math.min(this.options.retryMaxMs, this.options.retryMinMs * 2 ** Math.min(entry.tries, 20));
    log.warn({ reason, retryInMs: delay }, "home deferred a spooled message");
    await this.options.store.deferred(entry.id, reason, delay);
  }

  /**
   * Postfix answered recipient by recipient. The DSN (or quarantine copy) for the permanent failures
   * is queued before the entry is narrowed: a crash in between sends that DSN twice, never none.
   */
  private async settleRecipients(
    entry: SpoolEntry,
    result: SpoolResult,
    { permanent, temporary }: RecipientSplit,
    log: Logger,
  ): Promise<void> {
    const { store } = this.options;
    const delivered = result.status === "delivered";
    // Whether anyone else was or may still be delivered from this file: then it stays for them.
    const partial = delivered || temporary.length > 0 || entry.remaining !== null;
    if (delivered) {
      this.counters.delivered++;
      log.info(
        { tries: entry.tries + 1, refused: permanent.length + temporary.length },
        "spooled message delivered to home for some recipients",
      );
    }
    if (permanent.length) {
      this.counters.rejected++;
      const reason = permanent.map((f) => `<${f.address}>: ${f.diagnostic}`).join("; ");
      await this.options.onUndeliverable(entry, reason, permanent, partial);
    }
    if (!partial) return;
    if (temporary.length === 0) {
      await store.remove(entry.id);
      return;
    }
    await store.narrow(entry.id, temporary);
    await this.defer(
      entry,
      result.refused?.find((r) => temporary.includes(r.recipient))?.message ?? "deferred",
      log,
    );
  }

  private exchange(stream: MuxStream, body: NodeJS.ReadableStream): Promise<SpoolResult> {
    return new Promise((resolve) => {
      let settled = false;
      const settle = (result: SpoolResult) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        resolve(result);
      };
      const timer = setTimeout(
        () => {
          stream.reset(ResetCode.TIMEOUT, "no result in time");
          settle({ status: "deferred", message: "home did not answer in time" });
        },
        this.options.resultTimeoutMs ?? 10 * 60_000,
      );
      stream.once("result", (value: unknown) => {
        const result = value as SpoolResult;
        settle(
          result && typeof result.status === "string"
            ? result
            : { status: "deferred", message: "unreadable result" },
        );
        body.unpipe(stream);
        if (!stream.writableEnded) stream.end();
      });
      stream.once("reset", (code: number, reason: string) =>
        settle({ status: "deferred", message: `home reset the stream (${code} ${reason})` }),
      );
      stream.once("close", () => settle({ status: "deferred", message: "tunnel closed during delivery" }));
      stream.on("error", () => {});
      stream.resume();
      (body as NodeJS.ReadableStream & { on(e: "error", f: (e: Error) => void): void }).on(
        "error",
        (error: Error) => {
          stream.reset(ResetCode.INTERNAL, "spool file unreadable");
          settle({ status: "deferred", message: error.message });
        },
      );
      body.pipe(stream, { end: false });
      body.on("end", () => {
        if (!settled) stream.end();
      });
    });
  }
}

interface RecipientSplit {
  permanent: RecipientFailure[];
  /** Addresses to try again. */
  temporary: string[];
}

/**
 * The recipient-by-recipient part of a RESULT, if it has one. A home that predates `refused` lists
 * only addresses in `rejected`, and has logged the whole message as delivered, so a retry would never
 * reach them: they count as failed for good.
 */
function splitRefusals(result: SpoolResult): RecipientSplit | undefined {
  if (Array.isArray(result.refused) && result.refused.length > 0) {
    const permanent: RecipientFailure[] = [];
    const temporary: string[] = [];
    for (const r of result.refused) {
      if (r.code && r.code >= 500) permanent.push({ address: r.recipient, diagnostic: `${r.message}` });
      else temporary.push(r.recipient);
    }
    // Nothing taken and nothing refused for good: a plain deferral of what was asked for.
    if (result.status === "deferred" && permanent.length === 0) return undefined;
    return { permanent, temporary };
  }
  if (result.status === "delivered" && !result.duplicate && result.rejected?.length) {
    const diagnostic = "550 5.0.0 refused by the home mail server";
    return { permanent: result.rejected.map((address) => ({ address, diagnostic })), temporary: [] };
  }
  return undefined;
}

/**
 * The recipients still to deliver as indexes into the envelope (what the stream meta names, to stay
 * small); none when all are. Should one not be found, all are asked for: home skips whom it delivered
 * to, so that costs at most a repeated DSN, never a lost recipient.
 */
function recipientsMeta(entry: SpoolEntry): { recipients?: number[] } {
  if (!entry.remaining) return {};
  const wanted = new Set(entry.remaining);
  const indexes: number[] = [];
  entry.header.envelope.rcptTo.forEach((r, index) => {
    if (wanted.has(r.address)) indexes.push(index);
  });
  const found = new Set(indexes.map((index) => entry.header.envelope.rcptTo[index]!.address));
  return found.size === wanted.size ? { recipients: indexes } : {};
}
