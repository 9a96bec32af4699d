import { describe, expect, it } from "vitest";
import {
  offeredVersions,
  PAIR_PROLOGUE,
  PROTOCOL_VERSION,
  SUBPROTOCOL,
  TUNNEL_PROLOGUE,
  versionMismatchMessage,
} from "../src/protocol.js";

describe("protocol identity", () => {
  it("is version 2 (BATCH framing) on the WebSocket and in the Noise prologues", () => {
    expect(PROTOCOL_VERSION).toBe(2);
    expect(SUBPROTOCOL).toBe("mxtunnel.v2");
    expect(Buffer.from(TUNNEL_PROLOGUE).toString()).toBe("mxtunnel/2 tunnel");
    expect(Buffer.from(PAIR_PROLOGUE).toString()).toBe("mxtunnel/2 pair");
  });

  it("parses offers and names both versions to a v1 peer, telling it to upgrade", () => {
    expect(offeredVersions("mxtunnel.v1")).toEqual([1]);
    expect(offeredVersions(" mxtunnel.v1, mxtunnel.v2 ,other")).toEqual([1, 2]);
    expect(offeredVersions(undefined)).toEqual([]);
    expect(versionMismatchMessage({ role: "edge", version: 2 }, { role: "home", versions: [1] })).toBe(
      "protocol version mismatch: this edge speaks mxtunnel.v2, the home speaks mxtunnel.v1; upgrade mxtunnel on the home",
    );
    expect(versionMismatchMessage({ role: "home", version: 2 }, { role: "edge", versions: [1] })).toBe(
      "protocol version mismatch: this home speaks mxtunnel.v2, the edge speaks mxtunnel.v1; upgrade mxtunnel on the edge",
    );
  });
});
