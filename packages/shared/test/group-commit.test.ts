import { describe, expect, it, vi } from "vitest";
import { GroupCommit } from "../src/group-commit.js";

/** A step whose runs finish only when the test says so. */
function controlledStep() {
  const runs: { finish: (error?: Error) => void }[] = [];
  const step = () =>
    new Promise<void>((resolve, reject) => {
      runs.push({ finish: (error) => (error ? reject(error) : resolve()) });
    });
  return { runs, step };
}

const settled = async () => {
  for (let i = 0; i < 5; i++) await Promise.resolve();
};

describe("GroupCommit", () => {
  it("serves requests made during a run with one later run, never with the run in flight", async () => {
    const { runs, step } = controlledStep();
    const group = new GroupCommit(step);
    const order: string[] = [];
    const first = group.request().then(() => order.push("first"));
    expect(runs).toHaveLength(1);
    const during = [1, 2, 3].map((i) => group.request().then(() => order.push(`during ${i}`)));
    await settled();
    expect(runs).toHaveLength(1);
    runs[0]?.finish();
    await first;
    await settled();
    expect(order).toEqual(["first"]);
    expect(runs).toHaveLength(2);
    runs[1]?.finish();
    await Promise.all(during);
    expect(order).toEqual(["first", "during 1", "during 2", "during 3"]);
    expect(runs).toHaveLength(2);
  });

  it("with a minimum interval, a lone request runs at once and a burst right after waits and shares one run", async () => {
    const { runs, step } = controlledStep();
    const group = new GroupCommit(step, 50);
    const first = group.request();
    expect(runs).toHaveLength(1);
    runs[0]?.finish();
    await first;
    // Right after the first run: not started at once, and everything asked meanwhile joins it.
    const burst = [group.request(), group.request()];
    await settled();
    expect(runs).toHaveLength(1);
    const late = group.request();
    expect(late).toBe(burst[0]);
    await vi.waitFor(() => expect(runs).toHaveLength(2), { timeout: 5_000, interval: 5 });
    runs[1]?.finish();
    await Promise.all([...burst, late]);
    expect(runs).toHaveLength(2);
  });

  it("rejects the callers of a failed run, and the next request runs the step again", async () => {
    const { runs, step } = controlledStep();
    const group = new GroupCommit(step);
    const failing = group.request();
    runs[0]?.finish(new Error("EIO"));
    await expect(failing).rejects.toThrow("EIO");
    const next = group.request();
    expect(runs).toHaveLength(2);
    runs[1]?.finish();
    await expect(next).resolves.toBeUndefined();
  });
});
