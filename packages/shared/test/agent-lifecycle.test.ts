import { describe, expect, it } from "vitest";
import { CleanupStack, holdStateLock, PeerDispatch, untilAborted } from "../src/agent-lifecycle.js";
import type { MuxStream } from "../src/mux.js";
import { ResetCode, type StreamKind } from "../src/wire.js";

describe("CleanupStack", () => {
  it("runs its steps last-in first-out, past a failing step, and only once", async () => {
    const ran: string[] = [];
    const stack = new CleanupStack();
    stack.push(async () => void ran.push("first"));
    stack.push(async () => {
      ran.push("failing");
      throw new Error("step failed");
    });
    stack.push(async () => void ran.push("last"));
    await Promise.all([stack.run(), stack.run()]);
    await stack.run();
    expect(ran).toEqual(["last", "failing", "first"]);
  });

  it("releases the state lock after everything started under it", async () => {
    const ran: string[] = [];
    const stack = await holdStateLock(async () => ({ release: async () => void ran.push("lock released") }));
    stack.push(async () => void ran.push("listener stopped"));
    await stack.run();
    expect(ran).toEqual(["listener stopped", "lock released"]);
  });
});

describe("PeerDispatch", () => {
  const fakeStream = (kind: StreamKind) => {
    const resets: [number, string][] = [];
    const stream = { kind, reset: (code: number, reason: string) => resets.push([code, reason]) };
    return { stream: stream as unknown as MuxStream, resets };
  };

  it("hands a stream to the handler for its kind, with the peer", () => {
    const dispatch = new PeerDispatch<string>((kind) => `no ${kind} here`);
    const seen: [StreamKind, string][] = [];
    dispatch.onStream("relay", (stream, peer) => seen.push([stream.kind, peer]));
    const { stream, resets } = fakeStream("relay");
    dispatch.stream(stream, "home-a");
    expect(seen).toEqual([["relay", "home-a"]]);
    expect(resets).toEqual([]);
  });

  it("refuses a stream of a kind nobody serves, with the reason it was given", () => {
    const dispatch = new PeerDispatch<string>((kind) => `no ${kind} here`);
    dispatch.onStream("relay", () => {});
    const { stream, resets } = fakeStream("spool");
    dispatch.stream(stream, "home-a");
    expect(resets).toEqual([[ResetCode.REFUSED, "no spool here"]]);
  });

  it("gives every CONTROL message to every control handler in order", () => {
    const dispatch = new PeerDispatch<string>(() => "");
    const seen: string[] = [];
    dispatch.onControl((message, peer) => seen.push(`a:${String(message.type)}:${peer}`));
    dispatch.onControl((message, peer) => seen.push(`b:${String(message.type)}:${peer}`));
    dispatch.control({ type: "limits" }, "edge-1");
    expect(seen).toEqual(["a:limits:edge-1", "b:limits:edge-1"]);
  });
});

describe("untilAborted", () => {
  it("resolves at once for a signal that has already aborted", async () => {
    await expect(untilAborted(AbortSignal.abort())).resolves.toBeUndefined();
  });

  it("resolves when the signal aborts later", async () => {
    const controller = new AbortController();
    let resolved = false;
    const waiting = untilAborted(controller.signal).then(() => {
      resolved = true;
    });
    await Promise.resolve();
    expect(resolved).toBe(false);
    controller.abort();
    await waiting;
    expect(resolved).toBe(true);
  });
});
