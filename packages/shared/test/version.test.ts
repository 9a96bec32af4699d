import { describe, expect, it } from "vitest";
import { peerVersionProblem } from "../src/version.js";

describe("peerVersionProblem", () => {
  it("accepts the same major (and before 1.0 the same minor), and an unknown peer", () => {
    expect(peerVersionProblem("0.1.7", "home", "0.1.0")).toBeNull();
    expect(peerVersionProblem("1.9.0", "edge", "1.2.3")).toBeNull();
    expect(peerVersionProblem(null, "edge", "1.2.3")).toBeNull();
  });

  it("names both versions and the side to upgrade, in one sentence", () => {
    expect(peerVersionProblem("0.2.0", "home", "0.1.0")).toBe(
      "version mismatch: this edge runs mxtunnel 0.1.0, the home runs 0.2.0 (supported: 0.1.x); upgrade the edge",
    );
    expect(peerVersionProblem("1.4.0", "edge", "2.0.1")).toBe(
      "version mismatch: this home runs mxtunnel 2.0.1, the edge runs 1.4.0 (supported: 2.x); upgrade the edge",
    );
    expect(peerVersionProblem("banana", "edge", "1.0.0")).toBe(
      'the edge reports version "banana", which this home cannot read',
    );
  });
});
