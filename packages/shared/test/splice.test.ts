// splice(): a TCP socket on each side of a Mux pair, joined to a forward stream the way the edge
// (client side) and home (service side) do it. MuxStreams are wired to their socket by the mux
// itself; these tests hold that path to pipe()'s semantics: bytes, backpressure, half-close, teardown.
import { randomBytes } from "node:crypto";
import { once } from "node:events";
import net from "node:net";
import { afterEach, describe, expect, it, vi } from "vitest";
import { quietMuxPair } from "../../../test/helpers/mux-pair.js";
import type { Mux, MuxStream } from "../src/mux.js";
import { splice } from "../src/splice.js";
import { INITIAL_STREAM_CREDIT, ResetCode } from "../src/wire.js";

const KiB = 1024;
const MiB = 1024 * KiB;

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const cleanup of cleanups.splice(0)) cleanup();
});

async function listen(server: net.Server): Promise<number> {
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  cleanups.push(() => server.close());
  return (server.address() as net.AddressInfo).port;
}

interface Side {
  stream: MuxStream;
  socket: net.Socket;
  done: Promise<Error | undefined>;
}

interface Harness {
  home: Mux;
  edge: Mux;
  /** The test's client, connected to the edge's listener. */
  client: net.Socket;
  /** The service's end of the connection home made. */
  service: Promise<net.Socket>;
  edgeSide: Promise<Side>;
  homeSide: Promise<Side>;
}

/**
 * client → [edge socket ⇄ edge stream] ⇄ Mux pair ⇄ [home stream ⇄ home socket] → service.
 * `beforeSplice` runs on the edge once home accepted; the edge splices when it resolves.
 */
async function harness(
  options: { beforeSplice?: (stream: MuxStream) => Promise<void> | void } = {},
): Promise<Harness> {
  const { home, edge, close } = quietMuxPair();
  cleanups.push(close);

  let serviceSocket!: (socket: net.Socket) => void;
  const service = new Promise<net.Socket>((resolve) => {
    serviceSocket = resolve;
  });
  const serviceServer = net.createServer({ allowHalfOpen: true }, (socket) => {
    cleanups.push(() => socket.destroy());
    socket.on("error", () => {});
    serviceSocket(socket);
  });
  const servicePort = await listen(serviceServer);

  const homeSide = new Promise<Side>((resolve) => {
    home.on("stream", (stream) => {
      const socket = net.connect({ host: "127.0.0.1", port: servicePort, allowHalfOpen: true });
      cleanups.push(() => socket.destroy());
      socket.on("error", () => {});
      socket.once("connect", () => {
        stream.accept();
        const done = new Promise<Error | undefined>((settle) => splice(socket, stream, settle));
        resolve({ stream, socket, done });
      });
    });
  });

  let edgeSpliced!: (side: Side) => void;
  const edgeSide = new Promise<Side>((resolve) => {
    edgeSpliced = resolve;
  });
  const front = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => {
    cleanups.push(() => socket.destroy());
    // A reset at teardown, before the splice owns the socket, is not a test failure (splice's own
    // error handling is asserted through `done`).
    socket.on("error", () => {});
    const stream = edge.open("forward", {});
    stream.once("accept", async () => {
      await options.beforeSplice?.(stream);
      const done = new Promise<Error | undefined>((settle) => splice(socket, stream, settle));
      socket.resume();
      edgeSpliced({ stream, socket, done });
    });
  });
  const frontPort = await listen(front);
  const client = net.connect({ host: "127.0.0.1", port: frontPort, allowHalfOpen: true });
  client.on("error", () => {});
  cleanups.push(() => client.destroy());
  return { home, edge, client, service, edgeSide, homeSide };
}

function collect(socket: net.Socket): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    socket.on("data", (chunk: Buffer) => chunks.push(chunk));
    socket.once("end", () => resolve(Buffer.concat(chunks)));
    socket.once("error", reject);
  });
}

async function writeAll(socket: net.Socket, data: Buffer, chunkSize = 64 * KiB): Promise<void> {
  for (let offset = 0; offset < data.byteLength; offset += chunkSize) {
    if (!socket.write(data.subarray(offset, offset + chunkSize))) await once(socket, "drain");
  }
}

/** A FIN read (the sockets here are half-open capable, so a peer's FIN alone does not close them). */
function ended(socket: net.Socket): Promise<void> {
  socket.resume();
  return socket.readableEnded ? Promise.resolve() : once(socket, "end").then(() => {});
}

function closed(emitter: net.Socket | MuxStream): Promise<void> {
  return emitter.closed ? Promise.resolve() : once(emitter, "close").then(() => {});
}

describe("splice of a socket and a MuxStream", () => {
  it("carries bytes both ways at once, intact, without the Duplex", async () => {
    const h = await harness();
    const up = randomBytes(6 * MiB);
    const down = randomBytes(6 * MiB);
    const service = await h.service;
    const serviceGot = collect(service);
    const clientGot = collect(h.client);
    await Promise.all([writeAll(h.client, up), writeAll(service, down)]);
    h.client.end();
    service.end();
    expect((await serviceGot).equals(up)).toBe(true);
    expect((await clientGot).equals(down)).toBe(true);
    const [edgeSide, homeSide] = await Promise.all([h.edgeSide, h.homeSide]);
    // pipe() would have switched the Readable to flowing.
    expect(edgeSide.stream.readableFlowing).toBe(null);
    expect(homeSide.stream.readableFlowing).toBe(null);
    expect(await edgeSide.done).toBeUndefined();
    expect(await homeSide.done).toBeUndefined();
    await Promise.all([closed(edgeSide.stream), closed(homeSide.stream)]);
    expect(edgeSide.stream.resetCode).toBeUndefined();
    expect(homeSide.stream.resetCode).toBeUndefined();
    expect(h.edge.stats().openStreams).toBe(0);
    expect(h.home.stats().openStreams).toBe(0);
  });

  it("half-closes: the client's FIN reaches the service, which still answers, then closes", async () => {
    const h = await harness();
    const service = await h.service;
    const clientGot = collect(h.client);
    h.client.end("QUIT\r\n");
    const request = await collect(service);
    expect(request.toString()).toBe("QUIT\r\n");
    // The service's write side still works after it read the FIN.
    service.end("221 bye\r\n");
    expect((await clientGot).toString()).toBe("221 bye\r\n");
    const [edgeSide, homeSide] = await Promise.all([h.edgeSide, h.homeSide]);
    await Promise.all([edgeSide.done, homeSide.done, closed(h.client)]);
    expect(edgeSide.stream.resetCode).toBeUndefined();
    expect(homeSide.stream.resetCode).toBeUndefined();
    expect(h.edge.stats().openStreams).toBe(0);
    expect(h.home.stats().openStreams).toBe(0);
  });

  it("half-closes the other way: the service's FIN reaches the client, which still sends", async () => {
    const h = await harness();
    const service = await h.service;
    const serviceGot = collect(service);
    service.end("220 banner, then nothing more\r\n");
    expect((await collect(h.client)).toString()).toBe("220 banner, then nothing more\r\n");
    h.client.end("late words\r\n");
    expect((await serviceGot).toString()).toBe("late words\r\n");
    const [edgeSide, homeSide] = await Promise.all([h.edgeSide, h.homeSide]);
    await Promise.all([edgeSide.done, homeSide.done]);
    expect(h.edge.stats().openStreams).toBe(0);
    expect(h.home.stats().openStreams).toBe(0);
  });

  it("delivers what arrived before the splice first, END included", async () => {
    const h = await harness({
      // Home's service speaks and closes before the edge splices: all of it waits in the stream.
      beforeSplice: async (stream) => {
        const service = await h.service;
        service.end("220 early\r\n");
        await vi.waitFor(() => expect(h.edge.stats().receiveBuffered).toBe(11), { interval: 5 });
        expect(stream.readableFlowing).toBe(null);
      },
    });
    expect((await collect(h.client)).toString()).toBe("220 early\r\n");
  });

  it("holds a reader's backlog to the stream window and pauses the far socket", async () => {
    const h = await harness();
    const service = await h.service;
    const [edgeSide, homeSide] = await Promise.all([h.edgeSide, h.homeSide]);
    // The client reads nothing: the kernel's buffers fill, then the edge socket's, then credit stops.
    h.client.pause();
    const data = randomBytes(48 * MiB);
    let written = 0;
    let writerBlocked = false;
    const writer = (async () => {
      for (; written < data.byteLength; written += 64 * KiB) {
        if (!service.write(data.subarray(written, written + 64 * KiB))) {
          writerBlocked = true;
          await once(service, "drain");
          writerBlocked = false;
        }
      }
      service.end();
    })();
    let maxQueued = 0;
    await vi.waitFor(
      () => {
        maxQueued = Math.max(maxQueued, h.home.stats().queuedBytes);
        // Stuck: credit is withheld (over three quarters of the window buffered at the edge socket),
        // home's socket is paused with its queue full, and the service cannot write.
        expect(h.edge.stats().receiveBuffered).toBeGreaterThan((INITIAL_STREAM_CREDIT * 3) / 4);
        expect(homeSide.socket.isPaused()).toBe(true);
        expect(writerBlocked).toBe(true);
        // ... and nothing waits in the transport (a frame in flight when the rest holds is not a pile-up).
        expect(h.home.stats().transportBuffered).toBe(0);
      },
      { timeout: 20_000, interval: 5 },
    );
    expect(edgeSide.socket.writableLength).toBeLessThanOrEqual(INITIAL_STREAM_CREDIT + 16 * KiB);
    expect(maxQueued).toBeLessThanOrEqual(16 * KiB + 64 * KiB);
    expect(written).toBeLessThan(data.byteLength);

    // Reading releases the rest, in order.
    const got = collect(h.client);
    h.client.resume();
    await writer;
    expect((await got).equals(data)).toBe(true);
  });

  it("a service that drops the connection resets the stream and closes the client", async () => {
    const h = await harness();
    const service = await h.service;
    const [edgeSide, homeSide] = await Promise.all([h.edgeSide, h.homeSide]);
    // An RST: a plain destroy() sends FIN, which is a half-close and travels as END.
    service.resetAndDestroy();
    await ended(h.client);
    await Promise.all([closed(edgeSide.stream), closed(homeSide.stream), edgeSide.done, homeSide.done]);
    expect(edgeSide.stream.resetCode).toBe(ResetCode.CANCEL);
    expect(edgeSide.socket.destroyed).toBe(true);
    expect(h.edge.stats().openStreams).toBe(0);
    expect(h.home.stats().openStreams).toBe(0);
  });

  it("a client reset: the edge reports the socket error, resets the stream, home closes the service", async () => {
    const h = await harness();
    const service = await h.service;
    const [edgeSide, homeSide] = await Promise.all([h.edgeSide, h.homeSide]);
    h.client.write("MAIL FROM:<a@example.org>\r\n");
    expect((await once(service, "data"))[0].toString()).toBe("MAIL FROM:<a@example.org>\r\n");
    h.client.resetAndDestroy();
    const error = await edgeSide.done;
    expect(error).toBeInstanceOf(Error);
    await Promise.all([ended(service), closed(homeSide.stream)]);
    expect(homeSide.stream.resetCode).toBe(ResetCode.CANCEL);
    expect(homeSide.socket.destroyed).toBe(true);
    expect(await homeSide.done).toBeUndefined();
  });

  it("the tunnel closing destroys both sockets", async () => {
    const h = await harness();
    const service = await h.service;
    const [edgeSide, homeSide] = await Promise.all([h.edgeSide, h.homeSide]);
    h.edge.close();
    await Promise.all([ended(h.client), ended(service), edgeSide.done, homeSide.done]);
    expect(edgeSide.socket.destroyed).toBe(true);
    expect(homeSide.socket.destroyed).toBe(true);
  });

  it("pipes a MuxStream whose Duplex was used already, after what was written to it", async () => {
    const h = await harness({
      beforeSplice: (stream) => {
        stream.write("written before the splice; ");
      },
    });
    const service = await h.service;
    const serviceGot = collect(service);
    const edgeSide = await h.edgeSide;
    expect(edgeSide.stream.spliceSocket(edgeSide.socket)).toBe(false);
    h.client.end("then the client");
    expect((await serviceGot).toString()).toBe("written before the splice; then the client");
    service.end();
    await edgeSide.done;
  });
});
