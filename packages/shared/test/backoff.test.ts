import { describe, expect, it } from "vitest";
import { Backoff } from "../src/backoff.js";

describe("Backoff", () => {
  it("grows exponentially up to the cap when jitter is at its top", () => {
    const backoff = new Backoff({ minMs: 1000, maxMs: 30_000, random: () => 1 });
    const delays = Array.from({ length: 7 }, () => backoff.next());
    expect(delays).toEqual([2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
    expect(backoff.attempt).toBe(7);
  });

  it("never goes below the minimum", () => {
    const backoff = new Backoff({ minMs: 1000, maxMs: 30_000, random: () => 0 });
    expect(Array.from({ length: 5 }, () => backoff.next())).toEqual([1000, 1000, 1000, 1000, 1000]);
  });

  it("spreads delays uniformly between the minimum and the ceiling", () => {
    const backoff = new Backoff({ minMs: 100, maxMs: 10_000, factor: 3, random: () => 0.5 });
    expect([backoff.next(), backoff.next(), backoff.next()]).toEqual([200, 500, 1400]);
  });

  it("stays within bounds with real randomness", () => {
    const backoff = new Backoff({ minMs: 50, maxMs: 5000 });
    for (let i = 0; i < 200; i++) {
      const ceiling = Math.min(5000, 50 * 2 ** (i + 1));
      const delay = backoff.next();
      expect(delay).toBeGreaterThanOrEqual(50);
      expect(delay).toBeLessThanOrEqual(ceiling);
      expect(Number.isInteger(delay)).toBe(true);
    }
  });

  it("does not overflow after many attempts", () => {
    const backoff = new Backoff({ minMs: 1, maxMs: 1000, factor: 10, random: () => 0.999 });
    for (let i = 0; i < 2000; i++) backoff.next();
    expect(backoff.next()).toBeLessThanOrEqual(1000);
  });

  it("starts over after reset", () => {
    const backoff = new Backoff({ minMs: 1000, maxMs: 30_000, random: () => 1 });
    backoff.next();
    backoff.next();
    backoff.reset();
    expect(backoff.attempt).toBe(0);
    expect(backoff.next()).toBe(2000);
  });

  it("rejects nonsense options", () => {
    expect(() => new Backoff({ minMs: -1, maxMs: 10 })).toThrow(RangeError);
    expect(() => new Backoff({ minMs: 10, maxMs: 5 })).toThrow(RangeError);
    expect(() => new Backoff({ minMs: 1, maxMs: 5, factor: 0.5 })).toThrow(RangeError);
    expect(() => new Backoff({ minMs: 1, maxMs: Number.POSITIVE_INFINITY })).toThrow(RangeError);
  });
});
