import { describe, expect, it } from "vitest";
import { CLOCK_SKEW_FAIL_MS, CLOCK_SKEW_WARN_MS } from "../src/clock.js";
import { clockCheck, connectedPeerChecks } from "../src/doctor-report.js";
import { AGENT_VERSION } from "../src/protocol.js";

describe("clockCheck", () => {
  it("passes, warns and fails by how far the peer's clock is off", () => {
    expect(clockCheck("edge.example", 120, "edge")).toEqual({
      level: "pass",
      check: "clock",
      message: "edge.example's clock is 120 ms ahead",
    });
    expect(clockCheck("edge.example", -(CLOCK_SKEW_WARN_MS + 1), "edge")).toMatchObject({
      level: "warn",
      message: `edge.example's clock is ${CLOCK_SKEW_WARN_MS + 1} ms behind`,
      fix: "run NTP on both machines (systemd-timesyncd or chrony)",
    });
    expect(clockCheck("edge.example", CLOCK_SKEW_FAIL_MS + 1, "edge")).toMatchObject({ level: "fail" });
  });

  it("skips a peer that did not answer, naming what may be too old", () => {
    expect(clockCheck("home h1", null, "agent")).toEqual({
      level: "skip",
      check: "clock",
      message: "home h1: clock not compared (no answer to the time request; an older agent?)",
    });
  });
});

describe("connectedPeerChecks", () => {
  it("reports the tunnel's RTT and the clock, and warns on an incompatible peer version", () => {
    const checks = connectedPeerChecks(
      "home h1",
      { rttMs: 1.234, clockSkewMs: 5, peerVersion: "99.0.0" },
      "home",
      "agent",
    );
    expect(checks.map((c) => [c.level, c.check])).toEqual([
      ["pass", "tunnel"],
      ["pass", "clock"],
      ["warn", "version"],
    ]);
    expect(checks[0]?.message).toBe("home h1: tunnel up, RTT 1.2 ms");
    expect(checks[2]?.message).toMatch(/^home h1: version mismatch: this edge runs mxtunnel /);
  });

  it("leaves out the version line for a compatible peer and shows an unknown RTT as ?", () => {
    const checks = connectedPeerChecks(
      "edge.example",
      { rttMs: null, clockSkewMs: null, peerVersion: AGENT_VERSION },
      "edge",
      "edge",
    );
    expect(checks.map((c) => c.message)).toEqual([
      "edge.example: tunnel up, RTT ?",
      "edge.example: clock not compared (no answer to the time request; an older edge?)",
    ]);
  });
});
