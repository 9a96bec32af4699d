import { once } from "node:events";
import type { AddressInfo, Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import WebSocket, { WebSocketServer } from "ws";
import { WebSocketTransport } from "../src/ws-transport.js";

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

/** A real ws pair on loopback: [server side, client side], both wrapped. */
async function connectedPair(): Promise<[WebSocketTransport, WebSocketTransport, Socket]> {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0, perMessageDeflate: false });
  cleanups.push(() => server.close());
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  const accepted = once(server, "connection") as Promise<[WebSocket]>;
  const client = new WebSocket(`ws://127.0.0.1:${port}`, { perMessageDeflate: false });
  cleanups.push(() => client.terminate());
  await once(client, "open");
  const [serverSide] = await accepted;
  const socket = (serverSide as unknown as { _socket: Socket })._socket;
  return [new WebSocketTransport(serverSide), new WebSocketTransport(client), socket];
}

describe("WebSocketTransport", () => {
  it("sends every message of one tick in a single socket write, in order", async () => {
    const [edge, home, socket] = await connectedPair();
    const writes: number[] = [];
    const writev = socket._writev?.bind(socket);
    socket._writev = (chunks, callback) => {
      writes.push(chunks.length);
      writev?.(chunks, callback);
    };
    const write = socket._write.bind(socket);
    socket._write = (chunk, encoding, callback) => {
      writes.push(1);
      write(chunk, encoding, callback);
    };
    const received: string[] = [];
    const all = new Promise<void>((resolve) =>
      home.on("message", (message) => {
        received.push(Buffer.from(message).toString());
        if (received.length === 5) resolve();
      }),
    );
    for (let i = 0; i < 5; i++) edge.send(Buffer.from(`message ${i}`));
    expect(edge.bufferedAmount).toBe(5 * 9);
    await all;
    expect(received).toEqual([0, 1, 2, 3, 4].map((i) => `message ${i}`));
    // One writev of five WebSocket frames (header and payload each), not five writes.
    expect(writes).toEqual([10]);
    expect(edge.bufferedAmount).toBe(0);
  });

  it("sendParts delivers the parts joined as one message", async () => {
    const [edge, home] = await connectedPair();
    const message = once(home, "message") as Promise<[Uint8Array]>;
    edge.sendParts([Buffer.from("head:"), Buffer.from("body")]);
    const [received] = await message;
    expect(Buffer.from(received).toString()).toBe("head:body");
  });
});
