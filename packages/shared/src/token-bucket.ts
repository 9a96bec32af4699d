// Rate limits: a token bucket, and a bounded map of them keyed by client IP for the edge's handshake
// limit (DESIGN.md "Responder cost control").

/**
 * `burst` tokens to start with, refilled at `ratePerSecond`, never above `burst`. `now` returns
 * milliseconds on a monotonic clock (default performance.now); injectable for tests.
 */
export class TokenBucket {
  readonly #rate: number;
  readonly #burst: number;
  readonly #now: () => number;
  #tokens: number;
  #last: number;

  constructor(ratePerSecond: number, burst: number, now: () => number = () => performance.now()) {
    checkLimits(ratePerSecond, burst);
    this.#rate = ratePerSecond;
    this.#burst = burst;
    this.#now = now;
    this.#tokens = burst;
    this.#last = now();
  }

  /** Takes `n` tokens if there are that many; otherwise takes none and returns false. */
  take(n = 1): boolean {
    this.#refill();
    if (this.#tokens < n) return false;
    this.#tokens -= n;
    return true;
  }

  /** Tokens available now (fractional). */
  get available(): number {
    this.#refill();
    return this.#tokens;
  }

  #refill(): void {
    const now = this.#now();
    const elapsed = Math.max(0, now - this.#last); // a clock that steps back grants nothing
    this.#last = now;
    this.#tokens = Math.min(this.#burst, this.#tokens + (elapsed * this.#rate) / 1000);
  }
}

interface KeyedBucket {
  tokens: number;
  last: number;
}

/**
 * One token bucket per key (e.g. client IP), in bounded memory. A bucket that has refilled to full is
 * indistinguishable from a new one, so it can be dropped without changing any answer; the map is kept
 * in least-recently-used order and a few of the oldest entries are examined on each call. When the map
 * is full of non-full buckets, the least recently used one is evicted: that key gets a fresh burst,
 * which a global limit must cover (an attacker with more than maxKeys addresses).
 */
export class KeyedRateLimiter {
  readonly #rate: number;
  readonly #burst: number;
  readonly #maxKeys: number;
  readonly #now: () => number;
  readonly #buckets = new Map<string, KeyedBucket>();

  constructor(
    ratePerSecond: number,
    burst: number,
    maxKeys = 10_000,
    now: () => number = () => performance.now(),
  ) {
    checkLimits(ratePerSecond, burst);
    if (!Number.isInteger(maxKeys) || maxKeys < 1) throw new RangeError("maxKeys must be an integer ≥ 1");
    this.#rate = ratePerSecond;
    this.#burst = burst;
    this.#maxKeys = maxKeys;
    this.#now = now;
  }

  /** Number of keys currently tracked. */
  get size(): number {
    return this.#buckets.size;
  }

  take(key: string): boolean {
    const now = this.#now();
    this.#pruneOldest(now, 2);
    let bucket = this.#buckets.get(key);
    if (bucket) {
      this.#buckets.delete(key); // re-inserted below: most recently used last
      bucket.tokens = this.#level(bucket, now);
      bucket.last = now;
    } else {
      if (this.#buckets.size >= this.#maxKeys) {
        const oldest = this.#buckets.keys().next();
        if (!oldest.done) this.#buckets.delete(oldest.value);
      }
      bucket = { tokens: this.#burst, last: now };
    }
    this.#buckets.set(key, bucket);
    if (bucket.tokens < 1) return false;
    bucket.tokens -= 1;
    return true;
  }

  #level(bucket: KeyedBucket, now: number): number {
    return Math.min(this.#burst, bucket.tokens + (Math.max(0, now - bucket.last) * this.#rate) / 1000);
  }

  /** Drops up to `count` least recently used buckets that have refilled to full. */
  #pruneOldest(now: number, count: number): void {
    for (const [key, bucket] of this.#buckets) {
      if (count-- <= 0 || this.#level(bucket, now) < this.#burst) return;
      this.#buckets.delete(key);
    }
  }
}

function checkLimits(ratePerSecond: number, burst: number): void {
  if (!Number.isFinite(ratePerSecond) || ratePerSecond < 0) {
    throw new RangeError("ratePerSecond must be a finite number ≥ 0");
  }
  if (!Number.isFinite(burst) || burst < 1) throw new RangeError("burst must be a finite number ≥ 1");
}
