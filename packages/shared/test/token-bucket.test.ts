import { describe, expect, it } from "vitest";
import { KeyedRateLimiter, TokenBucket } from "../src/token-bucket.js";

function clock() {
  let now = 1_000;
  return { now: () => now, advance: (ms: number) => (now += ms), set: (ms: number) => (now = ms) };
}

describe("TokenBucket", () => {
  it("allows a burst, then the sustained rate", () => {
    const c = clock();
    const bucket = new TokenBucket(5, 3, c.now);
    expect([bucket.take(), bucket.take(), bucket.take(), bucket.take()]).toEqual([true, true, true, false]);
    c.advance(199);
    expect(bucket.take()).toBe(false);
    c.advance(1);
    expect(bucket.take()).toBe(true);
    expect(bucket.take()).toBe(false);
  });

  it("never refills beyond the burst", () => {
    const c = clock();
    const bucket = new TokenBucket(100, 2, c.now);
    c.advance(60_000);
    expect(bucket.available).toBe(2);
    expect([bucket.take(), bucket.take(), bucket.take()]).toEqual([true, true, false]);
  });

  it("takes several tokens at once, or none", () => {
    const c = clock();
    const bucket = new TokenBucket(1, 10, c.now);
    expect(bucket.take(7)).toBe(true);
    expect(bucket.take(4)).toBe(false);
    expect(bucket.available).toBe(3);
    c.advance(1000);
    expect(bucket.take(4)).toBe(true);
  });

  it("ignores a clock that steps backwards", () => {
    const c = clock();
    const bucket = new TokenBucket(1, 1, c.now);
    expect(bucket.take()).toBe(true);
    c.set(0);
    expect(bucket.take()).toBe(false);
    c.advance(1000);
    expect(bucket.take()).toBe(true);
  });

  it("rejects nonsense limits", () => {
    expect(() => new TokenBucket(-1, 1)).toThrow(RangeError);
    expect(() => new TokenBucket(1, 0)).toThrow(RangeError);
    expect(() => new TokenBucket(Number.NaN, 1)).toThrow(RangeError);
  });
});

describe("KeyedRateLimiter", () => {
  it("limits each key separately", () => {
    const c = clock();
    const limiter = new KeyedRateLimiter(1, 2, 100, c.now);
    expect([limiter.take("a"), limiter.take("a"), limiter.take("a")]).toEqual([true, true, false]);
    expect([limiter.take("b"), limiter.take("b"), limiter.take("b")]).toEqual([true, true, false]);
    c.advance(1000);
    expect([limiter.take("a"), limiter.take("a")]).toEqual([true, false]);
  });

  it("forgets buckets that have refilled", () => {
    const c = clock();
    const limiter = new KeyedRateLimiter(10, 5, 100, c.now);
    for (let i = 0; i < 50; i++) limiter.take(`10.0.0.${i}`);
    expect(limiter.size).toBe(50);
    c.advance(1000); // all refilled
    for (let i = 0; i < 30; i++) limiter.take("203.0.113.9");
    // each call drops up to two refilled buckets from the least recently used end
    expect(limiter.size).toBe(1);
  });

  it("stays within maxKeys under a flood of distinct keys", () => {
    const c = clock();
    const limiter = new KeyedRateLimiter(1, 1, 1000, c.now);
    for (let i = 0; i < 20_000; i++) {
      expect(limiter.take(`key-${i}`)).toBe(true);
      expect(limiter.size).toBeLessThanOrEqual(1000);
    }
  });

  it("keeps a recently used key's state when evicting", () => {
    const c = clock();
    const limiter = new KeyedRateLimiter(0.001, 1, 3, c.now);
    expect(limiter.take("attacker")).toBe(true);
    limiter.take("x1");
    limiter.take("x2");
    expect(limiter.take("attacker")).toBe(false); // moves to most recently used
    limiter.take("x3"); // evicts x1, the least recently used
    expect(limiter.take("attacker")).toBe(false);
    expect(limiter.size).toBe(3);
  });
});
