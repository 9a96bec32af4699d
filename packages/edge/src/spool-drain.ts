// Drains the spool to home over `spool` streams: oldest first, a few at a time, each file sent as
// its sealed bytes (home verifies and opens them). A file is deleted only after home's RESULT says
// Postfix took it; a 4xx is retried with backoff; a 5xx or expiry is never silently dropped.
import {
  type Logger,
  type MuxStream,
  openSpoolCipherStream,
  ResetCode,
  readSpoolMeta,
} from "@mxtunnel/shared";
import type { SpoolEntry, SpoolStore } from "./spool-store.js";

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
   * when the sender was authenticated at spool time, and quarantines it otherwise.
   */
  onUndeliverable: (entry: SpoolEntry, reason: string) => Promise<void>;
}

export interface SpoolResult {
  status: "delivered" | "deferred" | "rejected" | "corrupt";
  duplicate?: boolean;
  code?: number;
  message?: string;
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
      });
      const body = openSpoolCipherStream(entry.path, {
        cipherOffset: SPOOL_HEADER_OFFSET,
        cipherLength: headerLength + meta.cipherLength,
      });
      result = await this.exchange(stream, body);
    } catch (error) {
      result = { status: "deferred", message: (error as Error).message };
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
      case "deferred": {
        this.counters.deferred++;
        const delay = Math.min(
          this.options.retryMaxMs,
          this.options.retryMinMs * 2 ** Math.min(entry.tries, 20),
        );
        log.warn({ reason: result.message, retryInMs: delay }, "home deferred a spooled message");
        await store.deferred(entry.id, result.message ?? "deferred", delay);
        return;
      }
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
