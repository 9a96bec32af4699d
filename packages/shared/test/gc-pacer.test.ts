import { describe, expect, it } from "vitest";
import { GcPacer } from "../src/gc-pacer.js";

const nextTurn = () => new Promise((resolve) => setImmediate(resolve));

describe("GcPacer", () => {
  it("collects once per budget of traffic, after the current turn, never twice for one crossing", async () => {
    let collections = 0;
    const pacer = new GcPacer(1000, () => collections++);
    expect(pacer.active).toBe(true);
    pacer.note(600);
    pacer.note(399);
    await nextTurn();
    expect(collections).toBe(0);
    pacer.note(1);
    // Not inside the caller's turn: its transient objects are still alive there.
    expect(collections).toBe(0);
    // A second budget used up before the first collection ran queues nothing more.
    pacer.note(5000);
    await nextTurn();
    expect(collections).toBe(1);
    pacer.note(999);
    await nextTurn();
    expect(collections).toBe(1);
    pacer.note(1);
    await nextTurn();
    expect(collections).toBe(2);
  });

  it("does nothing without a collector (node without --expose-gc)", async () => {
    const pacer = new GcPacer(1, undefined);
    expect(pacer.active).toBe(false);
    pacer.note(1 << 30);
    await nextTurn();
  });

  it("refuses a budget that is not a positive integer", () => {
    for (const budget of [0, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY]) {
      expect(() => new GcPacer(budget, () => {})).toThrow(RangeError);
    }
  });
});
