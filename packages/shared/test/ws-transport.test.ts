import { randomBytes } from "node:crypto";
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

  it("prefers messages whose frame is one 64 KiB socket read (header: 4 bytes from a server, 8 from a client)", async () => {
    const [edge, home] = await connectedPair();
    expect(edge.preferredMessageSize).toBe(65_532);
    expect(home.preferredMessageSize).toBe(65_528);
    for (const [sender, receiver] of [
      [edge, home],
      [home, edge],
    ] as const) {
      const message = randomBytes(sender.preferredMessageSize);
      const arrived = once(receiver, "message") as Promise<[Uint8Array]>;
      sender.sendParts([message.subarray(0, 5), message.subarray(5)]);
      const [received] = await arrived;
      expect(Buffer.from(received).equals(message)).toBe(true);
    }
  });

  it("sendParts frames the parts as one message either way, in order with send, at every length size", async () => {
    const [edge, home] = await connectedPair();
    // 5 bytes (7-bit length), 300 (16-bit), 65535 (the largest Noise message) and an empty message.
    const messages = [
      [Buffer.from("head:"), Buffer.alloc(0)],
      [Buffer.alloc(100, 1), Buffer.alloc(200, 2)],
      [Buffer.alloc(5, 3), Buffer.alloc(65_514, 4), Buffer.alloc(16, 5)],
      [],
    ];
    for (const [receiver, sender] of [
      [home, edge],
      [edge, home],
    ] as const) {
      const received: Buffer[] = [];
      const all = new Promise<void>((resolve) => {
        const onMessage = (message: Uint8Array) => {
          received.push(Buffer.from(message));
          if (received.length === 2 * messages.length) {
            receiver.off("message", onMessage);
            resolve();
          }
        };
        receiver.on("message", onMessage);
      });
      for (const parts of messages) {
        sender.sendParts(parts);
        sender.send(Buffer.from("between"));
      }
      expect(sender.bufferedAmount).toBe(5 + 300 + 65_535 + 4 * 7);
      await all;
      expect(received.map((message) => message.toString("hex"))).toEqual(
        messages.flatMap((parts) => [
          Buffer.concat(parts).toString("hex"),
          Buffer.from("between").toString("hex"),
        ]),
      );
      expect(sender.bufferedAmount).toBe(0);
    }
  });

  it("sendParts delivers the parts joined as one message", async () => {
    const [edge, home] = await connectedPair();
    const message = once(home, "message") as Promise<[Uint8Array]>;
    edge.sendParts([Buffer.from("head:"), Buffer.from("body")]);
    const [received] = await message;
    expect(Buffer.from(received).toString()).toBe("head:body");
  });
});
