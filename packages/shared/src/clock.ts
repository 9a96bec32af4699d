// Clock skew between edge and home, measured over CONTROL: one side sends `time-request` with an id,
// the other answers `time` with the same id and its clock; the skew is the peer's clock minus the
// midpoint of the round trip. Both agents answer; `doctor` on either side asks.
import { randomBytes } from "node:crypto";
import type { Mux } from "./mux.js";

/** Answers a peer's time-request; true when the message was one (the caller stops there). */
export function answerClockRequest(message: Record<string, unknown>, mux: Mux): boolean {
  if (message.type !== "time-request" || typeof message.id !== "string") return false;
  if (!mux.closed) mux.sendControl({ type: "time", id: message.id.slice(0, 64), now: Date.now() });
  return true;
}

/**
 * The peer's clock minus ours, in ms (positive: the peer is ahead), or null when the peer did not
 * answer within timeoutMs (an agent too old to know the request, or a dead tunnel).
 */
export function measureClockSkew(mux: Mux, timeoutMs = 3000): Promise<number | null> {
  if (mux.closed) return Promise.resolve(null);
  const id = randomBytes(8).toString("hex");
  return new Promise((resolve) => {
    const sentAt = Date.now();
    const onControl = (message: Record<string, unknown>) => {
      if (message.type !== "time" || message.id !== id || typeof message.now !== "number") return;
      const receivedAt = Date.now();
      finish(Math.round(message.now - (sentAt + receivedAt) / 2));
    };
    const finish = (skew: number | null) => {
      clearTimeout(timer);
      mux.off("control", onControl);
      mux.off("close", onClose);
      resolve(skew);
    };
    const onClose = () => finish(null);
    const timer = setTimeout(() => finish(null), timeoutMs);
    mux.on("control", onControl);
    mux.once("close", onClose);
    try {
      mux.sendControl({ type: "time-request", id });
    } catch {
      finish(null);
    }
  });
}

/**
 * What `doctor` asks of a live peer: a fresh round trip and the clock skew (each null when not
 * measured). A missing or closed mux is not asked.
 */
export async function measurePeer(
  mux: Mux | undefined,
): Promise<{ live: boolean; rttMs: number | null; clockSkewMs: number | null }> {
  if (mux === undefined || mux.closed) return { live: false, rttMs: null, clockSkewMs: null };
  const [rttMs, clockSkewMs] = await Promise.all([mux.ping().catch(() => null), measureClockSkew(mux, 3000)]);
  return { live: true, rttMs, clockSkewMs };
}

/** How often a running agent re-measures the skew with each connected peer (for `status`). */
export const CLOCK_WATCH_INTERVAL_MS = 60_000;

/**
 * The last measured clock skew with one connected peer, for `status`. Measured when the tunnel comes
 * up, then every intervalMs, with the same time-request `doctor` sends. It cannot ride on the mux's
 * periodic PING: a PONG only echoes an opaque 8-byte key, no clock, and changing that would change
 * the wire protocol; one CONTROL message each way a minute is a few dozen bytes next to a PING every
 * 15 s. A measurement without an answer (an older peer, a busy tunnel) keeps the previous value.
 */
export class PeerClockWatch {
  #skewMs: number | null = null;
  #measuring = false;
  readonly #timer: NodeJS.Timeout;

  constructor(
    private readonly mux: Mux,
    intervalMs = CLOCK_WATCH_INTERVAL_MS,
    private readonly answerTimeoutMs = 3000,
  ) {
    this.#timer = setInterval(() => this.#measure(), intervalMs);
    this.#timer.unref();
    mux.once("close", () => this.stop());
    this.#measure();
  }

  /** The peer's clock minus ours, in ms (positive: the peer is ahead); null when never answered or the tunnel is closed. */
  get skewMs(): number | null {
    return this.mux.closed ? null : this.#skewMs;
  }

  stop(): void {
    clearInterval(this.#timer);
  }

  #measure(): void {
    if (this.#measuring || this.mux.closed) return;
    this.#measuring = true;
    void measureClockSkew(this.mux, this.answerTimeoutMs).then((skew) => {
      this.#measuring = false;
      if (skew !== null) this.#skewMs = skew;
    });
  }
}

/** A skew for the status tables: "+1200ms" (the peer ahead), "-35ms", or "-" when not measured. */
export function formatClockSkew(skewMs: number | null): string {
  if (skewMs === null) return "-";
  return `${skewMs >= 0 ? "+" : ""}${skewMs}ms`;
}

/** Skew beyond these is a warning, then a failure (DKIM t=, token expiry, logs that disagree). */
export const CLOCK_SKEW_WARN_MS = 2_000;
export const CLOCK_SKEW_FAIL_MS = 60_000;
