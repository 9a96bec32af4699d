import { once } from "node:events";
import net from "node:net";
import { createLogger, type MuxStream, ResetCode } from "@mxtunnel/shared";
import { afterEach, describe, expect, it } from "vitest";
import { quietMuxPair } from "../../../test/helpers/mux-pair.js";
import { ServiceConnector } from "../src/service-connector.js";

const logger = createLogger({ name: "test", level: "silent" });
const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

/** A home mux serving forward streams with a ServiceConnector, and the edge mux that opens them. */
function tunnelTo(port: number) {
  const { home, edge, close } = quietMuxPair();
  cleanups.push(close);
  const connector = new ServiceConnector({
    services: new Map([["smtp", { target: { host: "127.0.0.1", port }, proxyProtocol: "off" }]]),
    allowPrivateClientIPs: true,
    logger,
  });
  home.on("stream", (stream: MuxStream) => connector.handle(stream));
  const open = () =>
    edge.open("forward", {
      service: "smtp",
      session: "s1",
      client: { address: "203.0.113.7", port: 40000 },
      local: { address: "198.51.100.1", port: 25 },
    });
  return { connector, open };
}

async function listen(server: net.Server): Promise<number> {
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  cleanups.push(() => server.close());
  return (server.address() as net.AddressInfo).port;
}

describe("ServiceConnector", () => {
  it("counts a refused connect as connectFailed and resets the stream with CONNECT_FAILED", async () => {
    const server = net.createServer();
    const port = await listen(server);
    server.close();
    await once(server, "close");
    const { connector, open } = tunnelTo(port);
    const stream = open();
    const [code] = (await once(stream, "reset")) as [number];
    expect(code).toBe(ResetCode.CONNECT_FAILED);
    expect(connector.counters).toMatchObject({ accepted: 0, connectFailed: 1 });
  });

  it("a service that fails after the connect is not a failed connect", async () => {
    const server = net.createServer((socket) => {
      socket.write("220 ready\r\n");
      // The service dies mid-session: a reset, i.e. an error on home's socket.
      socket.once("data", () => socket.resetAndDestroy());
    });
    const { connector, open } = tunnelTo(await listen(server));
    const stream = open();
    stream.on("error", () => {});
    const resets: number[] = [];
    stream.on("reset", (code: number) => resets.push(code));
    await once(stream, "accept");
    const [banner] = (await once(stream, "data")) as [Buffer];
    expect(banner.toString()).toBe("220 ready\r\n");
    stream.write("EHLO x\r\n");
    await once(stream, "close");
    expect(connector.counters).toMatchObject({ accepted: 1, connectFailed: 0 });
    expect(resets).not.toContain(ResetCode.CONNECT_FAILED);
  });
});
