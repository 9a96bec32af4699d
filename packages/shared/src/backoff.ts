// Reconnect and retry delays: exponential growth, capped, with jitter so that many homes cut off by
// the same outage do not all redial the edge in the same second.

export interface BackoffOptions {
  /** The smallest delay, and the scale of growth. */
  minMs: number;
  /** No delay exceeds this. */
  maxMs: number;
  /** Growth per attempt; default 2. */
  factor?: number;
  /** Uniform in [0, 1); injectable for tests. Default Math.random. */
  random?: () => number;
}

/**
 * Attempt n (from 0) waits a whole number of milliseconds drawn uniformly from
 * [minMs, min(maxMs, minMs · factor^(n+1))] — full jitter above a floor, so even the first retry is
 * spread out yet never shorter than minMs.
 */
export class Backoff {
  readonly #minMs: number;
  readonly #maxMs: number;
  readonly #factor: number;
  readonly #random: () => number;
  #attempt = 0;

  constructor(options: BackoffOptions) {
    const { minMs, maxMs, factor = 2, random = Math.random } = options;
    if (!Number.isFinite(minMs) || minMs < 0) throw new RangeError("minMs must be a finite number ≥ 0");
    if (!Number.isFinite(maxMs) || maxMs < minMs) throw new RangeError("maxMs must be finite and ≥ minMs");
    if (!Number.isFinite(factor) || factor < 1) throw new RangeError("factor must be a finite number ≥ 1");
    this.#minMs = minMs;
    this.#maxMs = maxMs;
    this.#factor = factor;
    this.#random = random;
  }

  /** Delays handed out since construction or the last reset(). */
  get attempt(): number {
    return this.#attempt;
  }

  next(): number {
    const ceiling = Math.min(this.#maxMs, this.#minMs * this.#factor ** (this.#attempt + 1));
    this.#attempt++;
    const delay = this.#minMs + this.#random() * (ceiling - this.#minMs);
    return Math.min(ceiling, Math.round(delay));
  }

  /** After a success (e.g. a tunnel that stayed up), start again from minMs. */
  reset(): void {
    this.#attempt = 0;
  }
}
