// A home and an edge Mux joined by in-memory transports, with pings and idle timeouts off: for tests
// of what runs over the mux (splicing, services), not of the mux's own timers.
import { createMemoryTransportPair, Mux } from "@mxtunnel/shared";

const QUIET = { pingIntervalMs: 0, idleTimeoutMs: 0 } as const;

/** Both muxes; `close()` closes both (call it from afterEach). */
export function quietMuxPair(): { home: Mux; edge: Mux; close: () => void } {
  const [homeTransport, edgeTransport] = createMemoryTransportPair();
  const home = new Mux(homeTransport, { role: "home", ...QUIET });
  const edge = new Mux(edgeTransport, { role: "edge", ...QUIET });
  return {
    home,
    edge,
    close: () => {
      home.close();
      edge.close();
    },
  };
}
