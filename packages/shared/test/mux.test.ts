import { randomBytes } from "node:crypto";
import { once } from "node:events";
import type { Readable, Writable } from "node:stream";
import { afterEach, describe, expect, it } from "vitest";
import { type ErrorCode, ProtocolError } from "../src/errors.js";
import { Mux, type MuxOptions, type MuxStream } from "../src/mux.js";
import {
  CLOSE_GOING_AWAY,
  CLOSE_PROTOCOL_ERROR,
  createMemoryTransportPair,
  type MemoryTransport,
} from "../src/transport.js";
import {
  decodeMessage,
  encodeFrame,
  encodeMessage,
  type Frame,
  INITIAL_STREAM_CREDIT,
  MAX_DATA_PAYLOAD,
  MAX_FRAME_SIZE,
  MAX_MESSAGE_SIZE,
  ResetCode,
} from "../src/wire.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const QUIET = { pingIntervalMs: 0, idleTimeoutMs: 0 } as const;

const muxes: Mux[] = [];
afterEach(() => {
  for (const mux of muxes.splice(0)) mux.close();
});

function track(mux: Mux): Mux {
  muxes.push(mux);
  return mux;
}

function pair(home: Partial<MuxOptions> = {}, edge: Partial<MuxOptions> = {}) {
  const [homeTransport, edgeTransport] = createMemoryTransportPair();
  const homeMux = track(new Mux(homeTransport, { role: "home", ...QUIET, ...home }));
  const edgeMux = track(new Mux(edgeTransport, { role: "edge", ...QUIET, ...edge }));
  return { homeTransport, edgeTransport, home: homeMux, edge: edgeMux };
}

/** A Mux (home) facing a raw transport that the test drives frame by frame. */
function rawPeer(options: Partial<MuxOptions> = {}) {
  const [muxTransport, raw] = createMemoryTransportPair();
  const mux = track(new Mux(muxTransport, { role: "home", ...QUIET, ...options }));
  const received: Frame[] = [];
  raw.on("message", (bytes) => received.push(...decodeMessage(bytes)));
  const send = (frame: Frame) => raw.send(encodeFrame(frame));
  return { mux, raw, received, send };
}

/** Records every frame a transport hands over, in order. */
function tapSends(transport: MemoryTransport): Frame[] {
  const frames: Frame[] = [];
  const send = transport.send.bind(transport);
  transport.send = (message: Uint8Array) => {
    frames.push(...decodeMessage(message));
    send(message);
  };
  return frames;
}

function collect(stream: Readable): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    stream.once("end", () => resolve(Buffer.concat(chunks)));
    stream.once("error", reject);
  });
}

async function writeAll(stream: Writable, data: Uint8Array, chunkSize = 16 * KiB): Promise<void> {
  for (let offset = 0; offset < data.byteLength; offset += chunkSize) {
    if (!stream.write(data.subarray(offset, offset + chunkSize))) await once(stream, "drain");
  }
}

/** Resolves once `check()` holds, re-evaluated after every message the transport receives. */
function whenAfterMessages(transport: MemoryTransport, check: () => boolean): Promise<void> {
  return new Promise((resolve) => {
    if (check()) return resolve();
    const onMessage = () => {
      if (!check()) return;
      transport.off("message", onMessage);
      resolve();
    };
    transport.on("message", onMessage);
  });
}

async function closed(stream: MuxStream): Promise<void> {
  if (!stream.closed) await once(stream, "close");
}

function nextStream(mux: Mux): Promise<MuxStream> {
  return new Promise((resolve) => mux.once("stream", resolve));
}

function failOnError(stream: MuxStream): MuxStream {
  stream.on("error", (error) => {
    throw new Error(`unexpected error event on stream ${stream.id}: ${error.message}`);
  });
  return stream;
}

describe("streams", () => {
  it("echoes on many streams at once", async () => {
    const { home, edge } = pair();
    edge.on("stream", (stream) => {
      stream.accept();
      stream.pipe(stream);
    });
    const payloads = Array.from({ length: 24 }, (_, i) => randomBytes(50 * KiB + i * 7919));
    const results = await Promise.all(
      payloads.map(async (payload) => {
        const stream = failOnError(home.open("forward", { service: "smtp" }));
        const echoed = collect(stream);
        await writeAll(stream, payload, 8 * KiB);
        stream.end();
        return echoed;
      }),
    );
    for (const [i, echoed] of results.entries()) expect(echoed.equals(payloads[i]!)).toBe(true);
    expect(home.stats().queuedBytes).toBe(0);
    expect(home.stats().receiveBuffered).toBe(0);
  });

  it("gives home odd ids and edge even ids, strictly increasing", async () => {
    const { home, edge } = pair();
    const seenByHome: number[] = [];
    const seenByEdge: number[] = [];
    home.on("stream", (stream) => seenByHome.push(stream.id));
    edge.on("stream", (stream) => seenByEdge.push(stream.id));
    const fromHome = [home.open("sync", {}), home.open("sync", {}), home.open("sync", {})];
    const fromEdge = [edge.open("spool", {}), edge.open("spool", {})];
    expect(fromHome.map((s) => s.id)).toEqual([1, 3, 5]);
    expect(fromEdge.map((s) => s.id)).toEqual([2, 4]);
    expect(fromHome.every((s) => s.initiatedLocally)).toBe(true);
    await new Promise<void>((resolve) => {
      const check = () => seenByEdge.length === 3 && seenByHome.length === 2 && resolve();
      home.on("stream", check);
      edge.on("stream", check);
    });
    expect(seenByEdge).toEqual([1, 3, 5]);
    expect(seenByHome).toEqual([2, 4]);
  });

  it("carries kind and meta, and emits accept", async () => {
    const { home, edge } = pair();
    const stream = home.open("forward", { service: "smtp", client: "203.0.113.9:4242" });
    const incoming = await nextStream(edge);
    expect(incoming.kind).toBe("forward");
    expect(incoming.meta).toEqual({ service: "smtp", client: "203.0.113.9:4242" });
    expect(incoming.initiatedLocally).toBe(false);
    const accepted = once(stream, "accept");
    incoming.accept();
    await accepted;
  });

  it("lets the opener write before ACCEPT, and a receiver that writes accepts implicitly", async () => {
    const { home, edge } = pair();
    const stream = home.open("spool", {});
    stream.end("early bytes");
    const incoming = await nextStream(edge);
    expect((await collect(incoming)).toString()).toBe("early bytes");
    const accepted = once(stream, "accept");
    incoming.end("reply");
    await accepted;
    expect((await collect(stream)).toString()).toBe("reply");
  });

  it("half-closes each direction independently, then forgets the stream", async () => {
    const { home, edge } = pair();
    const edgeFinished = new Promise<MuxStream>((resolve) => {
      edge.on("stream", async (stream) => {
        stream.accept();
        const request = await collect(stream);
        // The read side has ended; the write side still works.
        stream.write("got ");
        stream.end(request, () => resolve(stream));
      });
    });
    const stream = failOnError(home.open("relay", {}));
    const reply = collect(stream);
    stream.end("hello");
    expect((await reply).toString()).toBe("got hello");
    await edgeFinished;
    expect(edge.stats().openStreams).toBe(0);
    expect(home.stats().openStreams).toBe(0);
    // Both directions ended and were consumed: autoDestroy closes it without a RESET.
    await closed(stream);
    expect(stream.resetCode).toBeUndefined();
  });

  it("half-closes streams opened by the edge too", async () => {
    const { home, edge } = pair();
    home.on("stream", (stream) => {
      collect(stream).then((data) => stream.end(Buffer.concat([data, data])));
    });
    const stream = edge.open("spool", { id: "m1" });
    const reply = collect(stream);
    stream.end("ab");
    expect((await reply).toString()).toBe("abab");
  });

  it("orders RESULT after the data written before it, and END after RESULT", async () => {
    const { home, edge, homeTransport } = pair();
    const frames = tapSends(homeTransport);
    const total = 40 * 10 * KiB;
    const done = new Promise<{ atResult: number; result: unknown; atEnd: number }>((resolve) => {
      edge.on("stream", (stream) => {
        let received = 0;
        let atResult = -1;
        let result: unknown;
        stream.on("data", (chunk: Buffer) => {
          received += chunk.byteLength;
        });
        stream.on("result", (value) => {
          atResult = received;
          result = value;
        });
        stream.on("end", () => resolve({ atResult, result, atEnd: received }));
      });
    });
    const stream = home.open("relay", {});
    // Synchronous writes: most sit in the Writable's buffer, not yet in the mux, when sendResult runs.
    for (let i = 0; i < 40; i++) stream.write(Buffer.alloc(10 * KiB, i));
    stream.sendResult({ queued: "Q1" });
    stream.end();
    const { atResult, result, atEnd } = await done;
    expect(result).toEqual({ queued: "Q1" });
    expect(atResult).toBe(total);
    expect(atEnd).toBe(total);
    const types = frames.filter((f) => "stream" in f && f.stream === stream.id).map((f) => f.type);
    expect(types.lastIndexOf("data")).toBeLessThan(types.indexOf("result"));
    expect(types.indexOf("result")).toBeLessThan(types.indexOf("end"));
    expect(() => stream.sendResult("late")).toThrow(/before end/);
  });

  it("delivers a RESULT sent back by the receiver", async () => {
    const { home, edge } = pair();
    edge.on("stream", async (stream) => {
      const body = await collect(stream);
      stream.sendResult({ ok: true, size: body.byteLength });
      stream.end();
    });
    const stream = home.open("relay", { id: "r1" });
    const result = once(stream, "result");
    stream.resume();
    stream.end(randomBytes(300 * KiB));
    expect((await result)[0]).toEqual({ ok: true, size: 300 * KiB });
  });

  it("resets from the receiver: the opener gets 'reset' and 'close', never 'error'", async () => {
    const { home, edge } = pair();
    edge.on("stream", (stream) => failOnError(stream).reset(ResetCode.CONNECT_FAILED, "postfix is down"));
    const stream = failOnError(home.open("forward", { service: "smtp" }));
    stream.write("EHLO");
    const [code, reason] = await once(stream, "reset");
    expect(code).toBe(ResetCode.CONNECT_FAILED);
    expect(reason).toBe("postfix is down");
    expect(stream.resetCode).toBe(ResetCode.CONNECT_FAILED);
    expect(stream.resetReason).toBe("postfix is down");
    await closed(stream);
    expect(stream.destroyed).toBe(true);
    expect(home.stats().openStreams).toBe(0);
  });

  it("resets from the opener, and destroy() sends RESET(CANCEL)", async () => {
    const { home, edge, edgeTransport } = pair();
    const incoming: MuxStream[] = [];
    edge.on("stream", (stream) => {
      incoming.push(failOnError(stream));
      stream.accept();
    });
    const first = failOnError(home.open("forward", {}));
    const second = failOnError(home.open("forward", {}));
    await once(first, "accept");
    if (incoming.length < 2) await once(second, "accept");
    first.reset(ResetCode.TIMEOUT, "too slow");
    expect(first.destroyed).toBe(true);
    second.destroy();
    const [firstReset, secondReset] = await Promise.all([
      once(incoming[0]!, "reset"),
      once(incoming[1]!, "reset"),
    ]);
    expect(firstReset).toEqual([ResetCode.TIMEOUT, "too slow"]);
    expect(secondReset[0]).toBe(ResetCode.CANCEL);
    await whenAfterMessages(edgeTransport, () => edge.stats().openStreams === 0);
  });

  it("truncates a RESET reason to 1024 bytes of UTF-8", async () => {
    const { home, edge } = pair();
    edge.on("stream", (stream) => stream.reset(ResetCode.INTERNAL, "é".repeat(600)));
    const stream = home.open("forward", {});
    const [, reason] = await once(stream, "reset");
    expect(reason).toBe("é".repeat(512));
  });

  it("refuses streams when nothing listens for them", async () => {
    const { home } = pair();
    const stream = home.open("sync", {});
    const [code] = await once(stream, "reset");
    expect(code).toBe(ResetCode.REFUSED);
  });

  it("carries CONTROL messages", async () => {
    const { home, edge } = pair();
    home.sendControl({ health: { smtp: "up" } });
    const [message] = await once(edge, "control");
    expect(message).toEqual({ health: { smtp: "up" } });
  });

  it("rejects an oversize meta when opening, without burning the tunnel", async () => {
    const { home, edge } = pair();
    expect(() => home.open("forward", { pad: "x".repeat(9000) })).toThrow(ProtocolError);
    edge.on("stream", (stream) => stream.end("ok"));
    expect((await collect(home.open("forward", {}))).toString()).toBe("ok");
  });
});

describe("flow control", () => {
  it("bounds a stream whose reader is paused while another stream keeps moving", async () => {
    const { home, edge, edgeTransport } = pair();
    const incoming = new Map<string, MuxStream>();
    const bothOpen = new Promise<void>((resolve) => {
      edge.on("stream", (stream) => {
        incoming.set(String(stream.meta.name), stream);
        if (incoming.size === 2) resolve();
      });
    });
    const paused = failOnError(home.open("forward", { name: "paused" }));
    const moving = failOnError(home.open("forward", { name: "moving" }));
    await bothOpen;

    // Push up to 4 MiB into the paused stream; nobody reads it on the edge.
    const chunkSize = 16 * KiB;
    let writtenPaused = 0;
    let maxLeftWriter = 0;
    const sample = () => {
      // Everything that left the paused stream's Writable is queued in the mux, buffered in the
      // transport or unread at the edge, so this bounds queued + transport-buffered for the stream.
      maxLeftWriter = Math.max(maxLeftWriter, writtenPaused - paused.writableLength);
    };
    edgeTransport.on("message", sample);
    const pausedWriter = (async () => {
      while (writtenPaused < 4 * MiB) {
        writtenPaused += chunkSize;
        if (!paused.write(Buffer.alloc(chunkSize, 1))) await once(paused, "drain");
      }
      paused.end();
    })();

    const movingData = randomBytes(3 * MiB);
    const received = collect(incoming.get("moving")!);
    await writeAll(moving, movingData);
    moving.end();
    expect((await received).equals(movingData)).toBe(true);

    // The paused stream ends up holding exactly its window at the edge and nothing more in flight.
    await whenAfterMessages(edgeTransport, () => edge.stats().receiveBuffered === INITIAL_STREAM_CREDIT);
    sample();
    expect(maxLeftWriter).toBeLessThanOrEqual(INITIAL_STREAM_CREDIT + MAX_FRAME_SIZE);
    const sender = home.stats();
    expect(sender.queuedBytes + sender.transportBuffered).toBeLessThanOrEqual(chunkSize);
    expect(writtenPaused).toBeLessThan(INITIAL_STREAM_CREDIT + 4 * chunkSize);

    // Reading it releases the rest.
    const rest = collect(incoming.get("paused")!);
    await pausedWriter;
    expect((await rest).byteLength).toBe(4 * MiB);
  });

  it("keeps many streams' unread data within the tunnel budget, then delivers it all", async () => {
    const tunnelBudget = 2 * MiB;
    const { home, edge, edgeTransport } = pair({}, { tunnelBudget });
    const incoming: MuxStream[] = [];
    edge.on("stream", (stream) => incoming.push(stream));
    const perStream = 96 * KiB;
    const payloads = Array.from({ length: 64 }, () => randomBytes(perStream));
    const streams = payloads.map((payload) => {
      const stream = failOnError(home.open("spool", {}));
      stream.end(payload);
      return stream;
    });
    let maxBuffered = 0;
    await whenAfterMessages(edgeTransport, () => {
      maxBuffered = Math.max(maxBuffered, edge.stats().receiveBuffered);
      return edge.stats().receiveBuffered === tunnelBudget;
    });
    expect(maxBuffered).toBeLessThanOrEqual(tunnelBudget);
    expect(home.stats().queuedBytes).toBe(64 * perStream - tunnelBudget);
    expect(incoming).toHaveLength(64);
    const bodies = await Promise.all(incoming.map((stream) => collect(stream)));
    for (const [i, body] of bodies.entries()) expect(body.equals(payloads[i]!)).toBe(true);
    expect(edge.stats().receiveBuffered).toBe(0);
    expect(streams.every((stream) => stream.writableFinished)).toBe(true);
  });

  it("honours an initialWindow above and below the implicit initial credit", async () => {
    expect(INITIAL_STREAM_CREDIT).toBe(1 * MiB);
    for (const initialWindow of [64 * KiB, 2 * MiB]) {
      const { home, edge, edgeTransport } = pair({}, { initialWindow });
      let incoming: MuxStream | undefined;
      edge.on("stream", (stream) => {
        incoming = stream;
      });
      const stream = home.open("spool", {});
      stream.end(randomBytes(3 * MiB));
      const expected = Math.max(initialWindow, INITIAL_STREAM_CREDIT);
      await whenAfterMessages(edgeTransport, () => edge.stats().receiveBuffered === expected);
      // Consuming returns credit down to the configured window, not the implicit one.
      const body = collect(incoming!);
      expect((await body).byteLength).toBe(3 * MiB);
    }
  });
});

describe("transport backpressure", () => {
  it("stops at maxBufferedAmount on a slow link and resumes on drain", async () => {
    const maxBufferedAmount = 512 * KiB;
    const { home, edge, homeTransport } = pair(
      { maxBufferedAmount },
      { initialWindow: 16 * MiB, tunnelBudget: 16 * MiB },
    );
    let maxBuffered = 0;
    let stalls = 0;
    const send = homeTransport.send.bind(homeTransport);
    homeTransport.send = (message: Uint8Array) => {
      send(message);
      maxBuffered = Math.max(maxBuffered, homeTransport.bufferedAmount);
      if (homeTransport.bufferedAmount > maxBufferedAmount && stalls++ < 3) {
        // A link that stops for a moment, then catches up.
        homeTransport.pause();
        setTimeout(() => homeTransport.resume(), 20);
      }
    };
    edge.on("stream", (stream) => stream.resume());
    const stream = home.open("spool", {});
    stream.end(Buffer.alloc(6 * MiB));
    await once(stream, "finish");
    expect(stalls).toBeGreaterThan(1);
    expect(maxBuffered).toBeLessThanOrEqual(maxBufferedAmount + MAX_FRAME_SIZE);
  });
});

describe("fairness", () => {
  it("serves a small write on one stream within a few frames of a bulk stream's backlog", async () => {
    // A large window so the bulk stream is limited only by the transport's buffered cap.
    const { home, edge, homeTransport, edgeTransport } = pair(
      {},
      { initialWindow: 64 * MiB, tunnelBudget: 128 * MiB },
    );
    const frames = tapSends(homeTransport);
    const incoming = new Map<string, MuxStream>();
    edge.on("stream", (stream) => {
      incoming.set(String(stream.meta.name), stream);
      stream.resume();
    });
    const small = home.open("forward", { name: "small" });
    small.write("warm-up");
    const bulk = home.open("spool", { name: "bulk" });
    bulk.write(Buffer.alloc(32 * MiB, 7));
    // Let the bulk stream fill the transport to its cap at least once.
    let bulkFramesReceived = 0;
    edgeTransport.on("message", (bytes) => {
      for (const frame of decodeMessage(bytes)) {
        if (frame.type === "data" && frame.stream === bulk.id) bulkFramesReceived++;
      }
    });
    await whenAfterMessages(edgeTransport, () => bulkFramesReceived >= 40);
    expect(home.stats().queuedBytes).toBeGreaterThan(16 * MiB);
    const mark = frames.length;
    const arrived = new Promise<void>((resolve) => {
      incoming.get("small")!.on("data", (chunk: Buffer) => chunk.toString() === "urgent" && resolve());
    });
    small.write("urgent");
    await arrived;
    const urgentAt = frames.findIndex((f, i) => i >= mark && f.type === "data" && f.stream === small.id);
    const bulkFramesBefore = frames
      .slice(mark, urgentAt)
      .filter((f) => f.type === "data" && f.stream === bulk.id).length;
    expect(bulkFramesBefore).toBeLessThanOrEqual(2);
    bulk.destroy();
  });

  it("sends no DATA frame larger than MAX_DATA_PAYLOAD", async () => {
    const { home, edge, homeTransport } = pair();
    const frames = tapSends(homeTransport);
    edge.on("stream", (stream) => stream.resume());
    const stream = home.open("spool", {});
    stream.end(Buffer.alloc(1 * MiB));
    await once(stream, "finish");
    const sizes = frames.flatMap((f) => (f.type === "data" ? [f.data.byteLength] : []));
    expect(Math.max(...sizes)).toBe(MAX_DATA_PAYLOAD);
    expect(sizes.reduce((a, b) => a + b, 0)).toBe(1 * MiB);
  });
});

describe("a transport's preferredMessageSize", () => {
  /** A pair whose home transport prefers messages of `preferred` bytes. */
  function preferringPair(preferred: number) {
    const [homeTransport, edgeTransport] = createMemoryTransportPair();
    Object.defineProperty(homeTransport, "preferredMessageSize", { value: preferred });
    const home = track(new Mux(homeTransport, { role: "home", ...QUIET }));
    const edge = track(new Mux(edgeTransport, { role: "edge", ...QUIET }));
    const sizes: number[] = [];
    const send = homeTransport.send.bind(homeTransport);
    homeTransport.send = (message: Uint8Array) => {
      sizes.push(message.byteLength);
      send(message);
    };
    const frames = tapSends(homeTransport);
    return { home, edge, sizes, frames };
  }

  it("sizes DATA frames and batches to it, bytes and order intact", async () => {
    const preferred = 65_536 - 4 - 16; // one 64 KiB socket read per WebSocket frame, less the Noise tag
    const { home, edge, sizes, frames } = preferringPair(preferred);
    const received: Promise<Buffer>[] = [];
    const both = new Promise<void>((resolve) =>
      edge.on("stream", (stream) => {
        received.push(collect(stream));
        if (received.length === 2) resolve();
      }),
    );
    const small = failOnError(home.open("spool", {}));
    small.end(randomBytes(40 * KiB));
    const stream = failOnError(home.open("spool", {}));
    const data = randomBytes(12 * 64 * KiB + 100);
    stream.cork();
    for (let offset = 0; offset < data.byteLength; offset += 64 * KiB) {
      stream.write(data.subarray(offset, offset + 64 * KiB));
    }
    stream.uncork();
    stream.end();
    await both;
    const [smallReceived, bulkReceived] = await Promise.all(received);
    expect(smallReceived!.byteLength).toBe(40 * KiB);
    expect(bulkReceived!.equals(data)).toBe(true);
    const dataSizes = frames.flatMap((f) =>
      f.type === "data" && f.stream === stream.id ? [f.data.byteLength] : [],
    );
    expect(Math.max(...dataSizes)).toBe(preferred - 5);
    expect(dataSizes.slice(0, -1).every((size) => size === preferred - 5)).toBe(true);
    expect(Math.max(...sizes)).toBe(preferred);
  });

  it("is ignored when it is not a sensible size: the protocol's limit applies", async () => {
    for (const preferred of [100, Number.NaN, 70_000]) {
      const { home, edge, sizes, frames } = preferringPair(preferred);
      edge.on("stream", (stream) => stream.resume());
      const stream = failOnError(home.open("spool", {}));
      stream.end(Buffer.alloc(256 * KiB));
      await once(stream, "finish");
      const dataSizes = frames.flatMap((f) => (f.type === "data" ? [f.data.byteLength] : []));
      expect(Math.max(...dataSizes)).toBe(MAX_DATA_PAYLOAD);
      expect(Math.max(...sizes)).toBe(MAX_FRAME_SIZE);
    }
  });
});

describe("DATA frames across written chunks", () => {
  it("cuts full-size frames across 64 KiB chunks queued together, bytes and order intact", async () => {
    const { home, edge, homeTransport } = pair();
    const frames = tapSends(homeTransport);
    const received = nextStream(edge).then((stream) => collect(stream));
    const stream = home.open("spool", {});
    const data = randomBytes(16 * 64 * KiB);
    // Sixteen socket-sized reads arriving in one turn, as a busy edge reads a fast client.
    stream.cork();
    for (let offset = 0; offset < data.byteLength; offset += 64 * KiB) {
      stream.write(data.subarray(offset, offset + 64 * KiB));
    }
    stream.uncork();
    stream.end();
    expect((await received).equals(data)).toBe(true);
    const sizes = frames.flatMap((f) => (f.type === "data" ? [f.data.byteLength] : []));
    // Every frame but the last is full: 17 frames, where one frame per chunk would need 32.
    expect(sizes.length).toBe(Math.ceil(data.byteLength / MAX_DATA_PAYLOAD));
    expect(sizes.slice(0, -1).every((size) => size === MAX_DATA_PAYLOAD)).toBe(true);
  });

  it("joins the tail of a chunk to the next one written a turn later, as a socket read at a time", async () => {
    const { home, edge, homeTransport } = pair();
    const frames = tapSends(homeTransport);
    const received = nextStream(edge).then((stream) => collect(stream));
    const stream = home.open("spool", {});
    const data = randomBytes(8 * 64 * KiB);
    for (let offset = 0; offset < data.byteLength; offset += 64 * KiB) {
      stream.write(data.subarray(offset, offset + 64 * KiB));
      await new Promise((resolve) => setImmediate(resolve));
    }
    stream.end();
    expect((await received).equals(data)).toBe(true);
    const sizes = frames.flatMap((f) => (f.type === "data" ? [f.data.byteLength] : []));
    // 8 full frames and the 176 bytes left over, where a frame per chunk and its tail would be 16.
    expect(sizes).toEqual([
      ...Array<number>(8).fill(MAX_DATA_PAYLOAD),
      data.byteLength - 8 * MAX_DATA_PAYLOAD,
    ]);
  });

  it("still sends a lone chunk at once, without waiting for more to fill a frame", async () => {
    const { home, edge } = pair();
    const accepted = nextStream(edge);
    const stream = home.open("spool", {});
    stream.write(Buffer.from("hello"));
    const peer = await accepted;
    const [chunk] = (await once(peer, "data")) as [Buffer];
    expect(chunk.toString()).toBe("hello");
  });
});

describe("protocol violations close the tunnel", () => {
  async function expectTunnelFailure(
    peer: ReturnType<typeof rawPeer>,
    code: ErrorCode,
    provoke: () => void,
  ): Promise<void> {
    const protocolError = once(peer.mux, "protocolError");
    const muxClosed = once(peer.mux, "close");
    const rawClosed = once(peer.raw, "close");
    provoke();
    const [error] = await protocolError;
    expect(error).toBeInstanceOf(ProtocolError);
    expect((error as ProtocolError).code).toBe(code);
    const [closeError] = await muxClosed;
    expect(closeError).toBe(error);
    expect(await rawClosed).toEqual([CLOSE_PROTOCOL_ERROR, code]);
    expect(peer.mux.closed).toBe(true);
  }

  function withStreamListener(peer: ReturnType<typeof rawPeer>): MuxStream[] {
    const streams: MuxStream[] = [];
    peer.mux.on("stream", (stream) => streams.push(failOnError(stream)));
    return streams;
  }

  it("DATA past the stream's credit: CREDIT_OVERFLOW, and streams are destroyed", async () => {
    const peer = rawPeer();
    const streams = withStreamListener(peer);
    const own = failOnError(peer.mux.open("forward", {}));
    await expectTunnelFailure(peer, "CREDIT_OVERFLOW", () => {
      peer.send({ type: "open", stream: 2, kind: "forward", meta: {} });
      const data = new Uint8Array(MAX_DATA_PAYLOAD);
      for (let sent = 0; sent <= INITIAL_STREAM_CREDIT; sent += data.byteLength) {
        peer.send({ type: "data", stream: 2, data });
      }
    });
    expect(streams[0]!.destroyed).toBe(true);
    expect(own.destroyed).toBe(true);
  });

  it("DATA past the tunnel budget: CREDIT_OVERFLOW", async () => {
    const peer = rawPeer({ tunnelBudget: 100_000 });
    withStreamListener(peer);
    await expectTunnelFailure(peer, "CREDIT_OVERFLOW", () => {
      peer.send({ type: "open", stream: 2, kind: "spool", meta: {} });
      peer.send({ type: "data", stream: 2, data: new Uint8Array(60_000) });
      peer.send({ type: "data", stream: 2, data: new Uint8Array(60_000) });
    });
  });

  it("WINDOW pushing tunnel credit past 2^31-1: CREDIT_OVERFLOW", async () => {
    const peer = rawPeer();
    await expectTunnelFailure(peer, "CREDIT_OVERFLOW", () => {
      peer.send({ type: "window", stream: 0, credit: 2 ** 31 - 1 });
      peer.send({ type: "window", stream: 0, credit: 1 });
    });
  });

  it("WINDOW pushing stream credit past 2^31-1: CREDIT_OVERFLOW", async () => {
    const peer = rawPeer();
    const stream = peer.mux.open("relay", {});
    await expectTunnelFailure(peer, "CREDIT_OVERFLOW", () => {
      peer.send({ type: "window", stream: stream.id, credit: 2 ** 31 - INITIAL_STREAM_CREDIT });
    });
  });

  it("OPEN with the opener's wrong parity: STREAM_ID_PARITY", async () => {
    const peer = rawPeer();
    withStreamListener(peer);
    await expectTunnelFailure(peer, "STREAM_ID_PARITY", () => {
      peer.send({ type: "open", stream: 3, kind: "forward", meta: {} });
    });
  });

  it("OPEN of an id already used: STREAM_ID_REUSED", async () => {
    const peer = rawPeer();
    withStreamListener(peer);
    await expectTunnelFailure(peer, "STREAM_ID_REUSED", () => {
      peer.send({ type: "open", stream: 2, kind: "forward", meta: {} });
      peer.send({ type: "open", stream: 2, kind: "forward", meta: {} });
    });
  });

  it("OPEN of an id below the peer's last: STREAM_ID_REUSED", async () => {
    const peer = rawPeer();
    withStreamListener(peer);
    await expectTunnelFailure(peer, "STREAM_ID_REUSED", () => {
      peer.send({ type: "open", stream: 6, kind: "forward", meta: {} });
      peer.send({ type: "open", stream: 4, kind: "forward", meta: {} });
    });
  });

  it("DATA for a stream the peer never opened: STREAM_UNKNOWN", async () => {
    const peer = rawPeer();
    await expectTunnelFailure(peer, "STREAM_UNKNOWN", () => {
      peer.send({ type: "data", stream: 8, data: new Uint8Array(1) });
    });
  });

  it("END for a stream we never opened: STREAM_UNKNOWN", async () => {
    const peer = rawPeer();
    await expectTunnelFailure(peer, "STREAM_UNKNOWN", () => {
      peer.send({ type: "end", stream: 5 });
    });
  });

  it("an unknown frame type: FRAME_UNKNOWN_TYPE", async () => {
    const peer = rawPeer();
    await expectTunnelFailure(peer, "FRAME_UNKNOWN_TYPE", () => {
      peer.raw.send(new Uint8Array([0x0c, 0, 0, 0, 0]));
    });
  });

  it("an oversize frame: FRAME_TOO_LARGE", async () => {
    const peer = rawPeer();
    await expectTunnelFailure(peer, "FRAME_TOO_LARGE", () => {
      const bytes = new Uint8Array(MAX_FRAME_SIZE + 1);
      bytes.set([0x03, 0, 0, 0, 2]);
      peer.raw.send(bytes);
    });
  });

  it("garbage bytes: FRAME_MALFORMED", async () => {
    const peer = rawPeer();
    withStreamListener(peer);
    await expectTunnelFailure(peer, "FRAME_MALFORMED", () => {
      peer.raw.send(Buffer.from("01000000020172656c6179", "hex"));
    });
  });

  it("closes when the peer sends DATA after its END", async () => {
    const peer = rawPeer();
    withStreamListener(peer);
    await expectTunnelFailure(peer, "STREAM_UNKNOWN", () => {
      peer.send({ type: "open", stream: 2, kind: "forward", meta: {} });
      peer.send({ type: "end", stream: 2 });
      peer.send({ type: "data", stream: 2, data: new Uint8Array(1) });
    });
  });
});

describe("stream limits and closed streams", () => {
  it("resets streams past maxStreams and keeps the tunnel up", async () => {
    const peer = rawPeer({ maxStreams: 2 });
    const streams: MuxStream[] = [];
    peer.mux.on("stream", (stream) => streams.push(stream));
    peer.send({ type: "open", stream: 2, kind: "forward", meta: {} });
    peer.send({ type: "open", stream: 4, kind: "forward", meta: {} });
    peer.send({ type: "open", stream: 6, kind: "forward", meta: {} });
    // Frames for the refused stream are dropped quietly.
    peer.send({ type: "data", stream: 6, data: new Uint8Array(10) });
    peer.send({ type: "end", stream: 6 });
    await whenAfterMessages(peer.raw, () => peer.received.some((f) => f.type === "reset"));
    expect(peer.received.find((f) => f.type === "reset")).toEqual({
      type: "reset",
      stream: 6,
      code: ResetCode.TOO_MANY_STREAMS,
      reason: "more than 2 concurrent streams",
    });
    expect(streams.map((s) => s.id)).toEqual([2, 4]);
    // Once a stream goes away there is room again.
    peer.send({ type: "reset", stream: 2, code: ResetCode.CANCEL, reason: "" });
    peer.send({ type: "open", stream: 8, kind: "forward", meta: {} });
    peer.send({ type: "ping", payload: new Uint8Array(8).fill(9) });
    await whenAfterMessages(peer.raw, () => peer.received.some((f) => f.type === "pong"));
    expect(streams.map((s) => s.id)).toEqual([2, 4, 8]);
    expect(peer.mux.closed).toBe(false);
  });

  it("between two muxes: the opener sees RESET(TOO_MANY_STREAMS)", async () => {
    const { home, edge } = pair({}, { maxStreams: 1 });
    edge.on("stream", () => {});
    home.open("forward", {});
    const second = home.open("forward", {});
    const [code] = await once(second, "reset");
    expect(code).toBe(ResetCode.TOO_MANY_STREAMS);
    expect(home.closed || edge.closed).toBe(false);
  });

  it("drops frames for a stream it reset and still returns their tunnel credit", async () => {
    const tunnelBudget = 128 * KiB;
    const peer = rawPeer({ tunnelBudget });
    peer.mux.on("stream", (stream) => stream.reset(ResetCode.REFUSED, "no"));
    peer.send({ type: "open", stream: 2, kind: "spool", meta: {} });
    await whenAfterMessages(peer.raw, () => peer.received.some((f) => f.type === "reset"));
    const granted = () =>
      peer.received.reduce((sum, f) => sum + (f.type === "window" && f.stream === 0 ? f.credit : 0), 0);
    // Three times the budget: only possible if the dropped bytes' credit keeps coming back.
    let sent = 0;
    while (sent < 3 * tunnelBudget) {
      const size = Math.min(60_000, granted() - sent);
      if (size > 0) {
        peer.send({ type: "data", stream: 2, data: new Uint8Array(size) });
        sent += size;
      } else {
        const before = granted();
        await whenAfterMessages(peer.raw, () => granted() > before);
      }
    }
    peer.send({ type: "accept", stream: 2 });
    peer.send({ type: "window", stream: 2, credit: 5 });
    peer.send({ type: "end", stream: 2 });
    peer.send({ type: "ping", payload: new Uint8Array(8) });
    await whenAfterMessages(peer.raw, () => peer.received.some((f) => f.type === "pong"));
    expect(peer.mux.closed).toBe(false);
    expect(peer.mux.stats().receiveBuffered).toBe(0);
  });
});

describe("batching", () => {
  it("sends what one turn produces together at the next flush, OPEN and CONTROL ahead of DATA", async () => {
    const { home, edge, homeTransport } = pair();
    edge.on("stream", () => {});
    await once(homeTransport, "message"); // the edge's tunnel credit
    const frames = tapSends(homeTransport);
    const first = failOnError(home.open("forward", { n: 1 }));
    first.write("hello");
    home.open("forward", { n: 2 });
    home.sendControl({ type: "note" });
    expect(frames).toEqual([]);
    await new Promise((resolve) => setImmediate(resolve));
    expect(frames.map((frame) => frame.type)).toEqual(["open", "open", "control", "data"]);
    expect(frames[3]).toMatchObject({ type: "data", stream: first.id });
  });

  it("hands frames queued just before close() to the transport ahead of the close", () => {
    const { home, homeTransport } = pair();
    const events: string[] = [];
    const send = homeTransport.send.bind(homeTransport);
    homeTransport.send = (message: Uint8Array) => {
      events.push(...decodeMessage(message).map((frame) => frame.type));
      send(message);
    };
    const close = homeTransport.close.bind(homeTransport);
    homeTransport.close = (code?: number, reason?: string) => {
      events.push("close");
      close(code, reason);
    };
    home.open("forward", {});
    home.sendControl({ type: "bye" });
    home.close();
    expect(events).toEqual(["open", "control", "close"]);
  });

  it("carries full-size DATA as header and payload parts, byte for byte", async () => {
    const { home, edge, homeTransport } = pair();
    const parts: number[][] = [];
    const sendParts = homeTransport.sendParts.bind(homeTransport);
    homeTransport.sendParts = (chunks: readonly Uint8Array[]) => {
      parts.push(chunks.map((chunk) => chunk.byteLength));
      sendParts(chunks);
    };
    const incoming = new Promise<MuxStream>((resolve) => edge.once("stream", resolve));
    const stream = failOnError(home.open("spool", {}));
    const payload = randomBytes(3 * MAX_DATA_PAYLOAD + 100);
    stream.end(payload);
    expect((await collect(await incoming)).equals(payload)).toBe(true);
    expect(parts).toContainEqual([5, MAX_DATA_PAYLOAD]);
    expect(parts.every(([header]) => header === 5)).toBe(true);
  });

  it("packs what one flush produces into one transport message: control first, then DATA round-robin", async () => {
    const { home, edge, homeTransport, edgeTransport } = pair();
    edge.on("stream", (stream) => stream.resume());
    await once(homeTransport, "message"); // the edge's tunnel credit
    const messages: Frame[][] = [];
    const send = homeTransport.send.bind(homeTransport);
    homeTransport.send = (message: Uint8Array) => {
      messages.push(decodeMessage(message));
      send(message);
    };
    const streams = Array.from({ length: 20 }, (_, n) => home.open("forward", { n }));
    for (const stream of streams) stream.write(Buffer.alloc(2 * KiB, 1));
    home.sendControl({ type: "note" });
    await new Promise((resolve) => setImmediate(resolve));
    expect(messages).toHaveLength(1);
    const types = messages[0]!.map((frame) => frame.type);
    expect(types).toEqual([...Array(20).fill("open"), "control", ...Array(20).fill("data")]);
    const dataStreams = messages[0]!.flatMap((frame) => (frame.type === "data" ? [frame.stream] : []));
    expect(dataStreams).toEqual(streams.map((stream) => stream.id));
    await whenAfterMessages(edgeTransport, () => edge.stats().messagesReceived >= home.stats().messagesSent);
    expect(edge.stats().bytesReceived).toBe(home.stats().bytesSent);
  });

  it("fills each message up to MAX_MESSAGE_SIZE and starts another; a full-size DATA goes alone", async () => {
    const { home, edge, homeTransport, edgeTransport } = pair();
    const sizes: number[] = [];
    const frameCounts: number[] = [];
    const send = homeTransport.send.bind(homeTransport);
    homeTransport.send = (message: Uint8Array) => {
      sizes.push(message.byteLength);
      frameCounts.push(decodeMessage(message).length);
      send(message);
    };
    const received = new Map<number, Promise<Buffer>>();
    edge.on("stream", (stream) => received.set(stream.id, collect(stream)));
    const payloads = Array.from({ length: 30 }, (_, n) => randomBytes(10 * KiB + n));
    const streams = payloads.map((payload) => {
      const stream = failOnError(home.open("spool", {}));
      stream.end(payload);
      return stream;
    });
    const bulk = failOnError(home.open("spool", {}));
    const bulkPayload = randomBytes(2 * MAX_DATA_PAYLOAD);
    bulk.end(bulkPayload);
    await Promise.all([...streams, bulk].map((stream) => once(stream, "finish")));
    await whenAfterMessages(edgeTransport, () => received.size === 31);
    for (const [i, stream] of streams.entries()) {
      expect((await received.get(stream.id)!).equals(payloads[i]!)).toBe(true);
    }
    expect((await received.get(bulk.id)!).equals(bulkPayload)).toBe(true);
    expect(Math.max(...sizes)).toBeLessThanOrEqual(MAX_MESSAGE_SIZE);
    // 300 KiB of small writes plus OPEN/END frames: a handful of messages, not a hundred.
    expect(sizes.length).toBeLessThan(15);
    expect(frameCounts.some((count) => count > 5)).toBe(true);
    const alone = sizes.filter((size, i) => size === MAX_FRAME_SIZE && frameCounts[i] === 1);
    expect(alone).toHaveLength(2);
    expect(home.stats().messagesSent).toBe(sizes.length + 1); // and the tunnel credit, sent at once
  });

  it("a malformed frame inside a BATCH closes the tunnel before any frame of it takes effect", async () => {
    const peer = rawPeer();
    const opened: MuxStream[] = [];
    peer.mux.on("stream", (stream) => opened.push(stream));
    const protocolError = once(peer.mux, "protocolError");
    peer.raw.send(
      encodeMessage([
        encodeFrame({ type: "open", stream: 2, kind: "forward", meta: {} }),
        Uint8Array.of(0x04, 0, 0, 0, 2, 0, 0, 0, 0), // WINDOW with credit 0
      ]),
    );
    const [error] = await protocolError;
    expect((error as ProtocolError).code).toBe("FRAME_MALFORMED");
    expect(opened).toEqual([]);
    expect(await once(peer.raw, "close")).toEqual([CLOSE_PROTOCOL_ERROR, "FRAME_MALFORMED"]);
  });

  it("a breach inside a BATCH closes the tunnel and the frames after it are not handled", async () => {
    const peer = rawPeer();
    peer.mux.on("stream", () => {});
    const protocolError = once(peer.mux, "protocolError");
    peer.raw.send(
      encodeMessage([
        encodeFrame({ type: "open", stream: 2, kind: "forward", meta: {} }),
        encodeFrame({ type: "open", stream: 2, kind: "forward", meta: {} }),
        encodeFrame({ type: "ping", payload: new Uint8Array(8) }),
      ]),
    );
    const [error] = await protocolError;
    expect((error as ProtocolError).code).toBe("STREAM_ID_REUSED");
    await once(peer.raw, "close");
    expect(peer.received.some((frame) => frame.type === "pong")).toBe(false);
  });

  it("handles every frame of a BATCH in order, as if each had come alone", async () => {
    const peer = rawPeer();
    const events: string[] = [];
    peer.mux.on("stream", (stream) => {
      events.push(`stream ${stream.id}`);
      stream.on("data", (chunk: Buffer) => events.push(`data ${chunk}`));
      stream.on("end", () => events.push("end"));
    });
    peer.mux.on("control", (message) => events.push(`control ${String(message.n)}`));
    const frames = [
      encodeFrame({ type: "control", message: { n: 1 } }),
      encodeFrame({ type: "open", stream: 2, kind: "forward", meta: {} }),
      encodeFrame({ type: "data", stream: 2, data: Buffer.from("a") }),
      encodeFrame({ type: "data", stream: 2, data: Buffer.from("b") }),
      encodeFrame({ type: "end", stream: 2 }),
      encodeFrame({ type: "ping", payload: new Uint8Array(8).fill(3) }),
    ];
    peer.raw.send(encodeMessage(frames));
    await whenAfterMessages(peer.raw, () => peer.received.some((f) => f.type === "pong"));
    await new Promise((resolve) => setImmediate(resolve));
    expect(events).toEqual(["control 1", "stream 2", "data a", "data b", "end"]);
    expect(peer.mux.stats().messagesReceived).toBe(1);
    expect(peer.mux.stats().bytesReceived).toBe(frames.reduce((sum, frame) => sum + frame.byteLength, 0));
  });
});

describe("liveness and closing", () => {
  it("measures RTT with ping()", async () => {
    const { home } = pair();
    const rtt = await home.ping();
    expect(rtt).toBeGreaterThanOrEqual(0);
    expect(home.lastRttMs).toBe(rtt);
  });

  it("echoes PING payloads as PONG", async () => {
    const peer = rawPeer();
    const payload = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
    peer.send({ type: "ping", payload });
    await whenAfterMessages(peer.raw, () => peer.received.some((f) => f.type === "pong"));
    expect(peer.received.find((f) => f.type === "pong")).toEqual({ type: "pong", payload });
  });

  it("closes with 1001 'peer silent' when nothing arrives within idleTimeoutMs", async () => {
    const peer = rawPeer({ idleTimeoutMs: 200 });
    const before = peer.mux.lastReceivedAt;
    const [error] = await once(peer.mux, "close");
    expect(error).toBeInstanceOf(Error);
    expect(String((error as Error).message)).toMatch(/no frame from the peer/);
    expect(peer.mux.lastReceivedAt).toBe(before);
    expect(peer.mux.closed).toBe(true);
  });

  it("sends the peer's idle close code over the transport", async () => {
    const peer = rawPeer({ idleTimeoutMs: 150 });
    expect(await once(peer.raw, "close")).toEqual([CLOSE_GOING_AWAY, "peer silent"]);
  });

  it("stays up while periodic PINGs are answered", async () => {
    const options = { pingIntervalMs: 25, idleTimeoutMs: 300 };
    const { home, edge, edgeTransport } = pair(options, options);
    let pings = 0;
    edgeTransport.on("message", (bytes) => {
      for (const frame of decodeMessage(bytes)) if (frame.type === "ping") pings++;
    });
    // Twenty pings span about 500 ms, well past the 300 ms idle limit.
    await whenAfterMessages(edgeTransport, () => pings >= 20);
    expect(home.closed || edge.closed).toBe(false);
    expect(home.lastRttMs).toBeDefined();
    expect(edge.lastRttMs).toBeDefined();
  });

  it("rejects ping() when the tunnel closes first", async () => {
    const { home, homeTransport } = pair();
    homeTransport.pause();
    const rtt = home.ping();
    home.close();
    await expect(rtt).rejects.toThrow(/closed/);
    await expect(home.ping()).rejects.toThrow(/closed/);
  });

  it("close() destroys every stream without errors and closes the peer", async () => {
    const { home, edge, edgeTransport } = pair();
    const incoming: MuxStream[] = [];
    edge.on("stream", (stream) => incoming.push(failOnError(stream)));
    const streams = [home.open("forward", {}), home.open("spool", {})].map(failOnError);
    streams[0]!.write("pending");
    await whenAfterMessages(edgeTransport, () => incoming.length === 2);
    let closes = 0;
    edge.on("close", () => closes++);
    const edgeClosed = once(edge, "close");
    home.close();
    expect(home.closed).toBe(true);
    expect(streams.every((stream) => stream.destroyed)).toBe(true);
    const [error] = await edgeClosed;
    expect(error).toBeUndefined();
    await Promise.all(incoming.map(closed));
    expect(closes).toBe(1);
    expect(() => home.open("forward", {})).toThrow(/closed/);
  });

  it("a transport closing abnormally destroys streams and reports why", async () => {
    const { home, edge, edgeTransport } = pair();
    edge.on("stream", () => {});
    const stream = failOnError(home.open("forward", {}));
    const homeClosed = once(home, "close");
    edgeTransport.close(4000, "gone");
    const [error] = await homeClosed;
    expect(String((error as Error).message)).toMatch(/4000, gone/);
    await closed(stream);
  });
});
