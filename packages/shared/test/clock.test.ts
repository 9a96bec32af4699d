import { afterEach, describe, expect, it, vi } from "vitest";
import { CLOCK_SKEW_WARN_MS, formatClockSkew, PeerClockWatch } from "../src/clock.js";
import { clockSkewWarning } from "../src/doctor-report.js";
import { Mux } from "../src/mux.js";
import { createMemoryTransportPair } from "../src/transport.js";

const QUIET = { pingIntervalMs: 0, idleTimeoutMs: 0 } as const;

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

/**
 * A watch on the edge's side of a tunnel whose home answers time-requests with its clock set
 * `peer.offsetMs` ahead, or not at all while `peer.silent`.
 */
function watchedPeer(intervalMs: number) {
  const [homeTransport, edgeTransport] = createMemoryTransportPair();
  const home = new Mux(homeTransport, { role: "home", ...QUIET });
  const edge = new Mux(edgeTransport, { role: "edge", ...QUIET });
  const peer = { offsetMs: 0, silent: false, requests: 0 };
  home.on("control", (message) => {
    if (message.type !== "time-request") return;
    peer.requests++;
    if (!peer.silent) home.sendControl({ type: "time", id: message.id, now: Date.now() + peer.offsetMs });
  });
  const watch = new PeerClockWatch(edge, intervalMs, 200);
  cleanups.push(() => {
    watch.stop();
    home.close();
    edge.close();
  });
  return { watch, peer, edge };
}

describe("PeerClockWatch", () => {
  it("measures at once and again every interval, keeping the sign: positive is the peer ahead", async () => {
    const { watch, peer } = watchedPeer(20);
    peer.offsetMs = 5000;
    // The skew is the offset give or take half the round trip (in-memory: well under a second).
    await vi.waitFor(() => expect(watch.skewMs).toBeGreaterThan(4000), { timeout: 5000, interval: 10 });
    expect(watch.skewMs).toBeLessThan(6000);
    peer.offsetMs = -70_000;
    await vi.waitFor(() => expect(watch.skewMs).toBeLessThan(-69_000), { timeout: 5000, interval: 10 });
    expect(watch.skewMs).toBeGreaterThan(-71_000);
  });

  it("keeps the last answer while the peer does not answer, and reports null once the tunnel closes", async () => {
    const { watch, peer, edge } = watchedPeer(20);
    peer.offsetMs = 3000;
    await vi.waitFor(() => expect(watch.skewMs).toBeGreaterThan(2000), { timeout: 5000, interval: 10 });
    const last = watch.skewMs;
    peer.silent = true;
    const asked = peer.requests;
    // A second unanswered request means the first one's wait ran out (measurements never overlap).
    await vi.waitFor(() => expect(peer.requests).toBeGreaterThanOrEqual(asked + 2), {
      timeout: 5000,
      interval: 10,
    });
    expect(watch.skewMs).toBe(last);
    edge.close();
    expect(watch.skewMs).toBeNull();
  });

  it("stays null while the peer never answers (an older agent)", async () => {
    const { watch, peer } = watchedPeer(20);
    peer.silent = true;
    await vi.waitFor(() => expect(peer.requests).toBeGreaterThanOrEqual(2), { timeout: 5000, interval: 10 });
    expect(watch.skewMs).toBeNull();
    peer.silent = false;
    await vi.waitFor(() => expect(watch.skewMs).not.toBeNull(), { timeout: 5000, interval: 10 });
  });
});

describe("clock skew in status", () => {
  it("warns past the doctor's warn threshold, either way, and names the fix", () => {
    expect(clockSkewWarning("home h", null)).toBeNull();
    expect(clockSkewWarning("home h", CLOCK_SKEW_WARN_MS)).toBeNull();
    expect(clockSkewWarning("home h", -CLOCK_SKEW_WARN_MS)).toBeNull();
    expect(clockSkewWarning("home h", CLOCK_SKEW_WARN_MS + 1)).toBe(
      "home h's clock is 2001 ms ahead: run NTP on both machines (systemd-timesyncd or chrony)",
    );
    expect(clockSkewWarning("mx.edge.test", -90_000)).toMatch(/^mx\.edge\.test's clock is 90000 ms behind: /);
  });

  it("formats the skew for the tables", () => {
    expect(formatClockSkew(null)).toBe("-");
    expect(formatClockSkew(0)).toBe("+0ms");
    expect(formatClockSkew(1200)).toBe("+1200ms");
    expect(formatClockSkew(-35)).toBe("-35ms");
  });
});
