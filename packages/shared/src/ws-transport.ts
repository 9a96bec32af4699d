// Adapts a `ws` WebSocket to MessageTransport: binary messages in, binary messages out, and a
// bufferedAmount that counts what we handed to ws and the socket has not written yet.
//
// Every message sent within one tick leaves in a single socket write: the first send of a tick corks
// the TCP socket and a process.nextTick uncorks it. ws corks only around one frame's header and
// payload, so without this each Noise message (one per mux flush since v2 batching, more under
// backpressure or past 64 KiB) would cost its own writev syscall.
import { EventEmitter } from "node:events";
import type { Socket } from "node:net";
import type WebSocket from "ws";
import {
  CLOSE_PROTOCOL_ERROR,
  DRAIN_LOW_WATER,
  type MessageTransport,
  type TransportEvents,
} from "./transport.js";

/** What Node's stream_base reads from a socket at most per read (libuv's suggested size). */
const SOCKET_READ_SIZE = 64 * 1024;

export class WebSocketTransport extends EventEmitter<TransportEvents> implements MessageTransport {
  private outstanding = 0;
  private aboveLowWater = false;
  private isClosed = false;
  private closeTimer: NodeJS.Timeout | undefined;
  private corked = false;

  constructor(private readonly ws: WebSocket) {
    super();
    ws.binaryType = "nodebuffer";
    ws.on("message", (data, isBinary) => {
      if (this.isClosed) return;
      if (!isBinary) {
        this.close(CLOSE_PROTOCOL_ERROR, "text frames are not part of the protocol");
        return;
      }
      this.emit("message", data as Buffer);
    });
    ws.on("close", (code, reason) => this.finish(code, reason.toString()));
    // Errors are followed by "close"; without a listener ws would throw.
    ws.on("error", () => {});
  }

  get bufferedAmount(): number {
    return this.outstanding;
  }

  /**
   * A whole frame of at most SOCKET_READ_SIZE bytes: Node reads a socket 64 KiB at a time, and ws
   * hands on a payload that lies within one read as a view of it but copies one that spans two into
   * a buffer of its own. A 65535-byte payload (the largest Noise message) makes a 65539-byte frame,
   * which spans two reads every time (copied: 64 KiB more to allocate, copy and collect per message);
   * at 64 KiB, back-to-back frames keep step with the reads. A server's frames have a 4-byte header
   * at this size, a client's 8 (with the mask).
   */
  get preferredMessageSize(): number {
    const server = (this.ws as unknown as { _isServer?: boolean })._isServer === true;
    return SOCKET_READ_SIZE - (server ? 4 : 8);
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /** The TCP socket under ws (a private field of ws 8; set once the connection is open). */
  private get socket(): Socket | undefined {
    return (this.ws as unknown as { _socket?: Socket })._socket;
  }

  get remoteAddress(): string | undefined {
    return this.socket?.remoteAddress;
  }

  send(message: Uint8Array): void {
    if (this.isClosed || this.ws.readyState !== 1) return;
    this.corkForTick();
    this.ws.send(message, { binary: true }, this.written(message.byteLength));
  }

  /**
   * Sends the concatenation of `parts` as one binary message. Frames a server sends are not masked,
   * so the edge writes the frame header and the parts to the socket as they are (one writev with the
   * rest of the tick) instead of joining them for ws.send: a 64 KiB copy and allocation less per
   * full-size message. ws's Sender writes every frame synchronously when it queues nothing (no
   * compression, no Blob data), so frames written here and by ws never interleave. A client must
   * mask (ws copies while masking anyway): joined and sent through ws.
   */
  sendParts(parts: readonly Uint8Array[]): void {
    if (this.isClosed || this.ws.readyState !== 1) return;
    const socket = this.socket;
    const internals = this.ws as unknown as { _isServer?: boolean; _sender?: { _state?: number } };
    // Sender state 0 is DEFAULT: nothing queued, every frame written at once.
    if (
      !socket ||
      internals._isServer !== true ||
      this.ws.extensions !== "" ||
      internals._sender?._state !== 0
    ) {
      this.send(parts.length === 1 ? parts[0]! : Buffer.concat(parts));
      return;
    }
    let size = 0;
    for (const part of parts) size += part.byteLength;
    this.corkForTick();
    const done = this.written(size);
    socket.write(binaryFrameHeader(size));
    const last = parts.length - 1;
    if (last < 0) {
      done();
      return;
    }
    for (let i = 0; i < last; i++) socket.write(parts[i]!);
    socket.write(parts[last]!, done);
  }

  /** The first send of a tick corks the socket; the uncork at the next tick writes it all at once. */
  private corkForTick(): void {
    if (this.corked) return;
    const socket = this.socket;
    if (!socket) return;
    this.corked = true;
    socket.cork();
    process.nextTick(this.uncork, socket);
  }

  /** Counts `size` bytes as buffered; the returned callback releases them once they are written. */
  private written(size: number): () => void {
    this.outstanding += size;
    if (this.outstanding > DRAIN_LOW_WATER) this.aboveLowWater = true;
    return () => {
      this.outstanding -= size;
      if (this.aboveLowWater && this.outstanding <= DRAIN_LOW_WATER) {
        this.aboveLowWater = false;
        this.emit("drain");
      }
    };
  }

  private readonly uncork = (socket: Socket): void => {
    this.corked = false;
    // end() and destroy() already flush or drop what was corked; uncork() is then a no-op.
    socket.uncork();
  };

  close(code = 1000, reason = ""): void {
    if (this.isClosed) return;
    this.isClosed = true;
    try {
      this.ws.close(code, reason.slice(0, 120));
    } catch {
      this.ws.terminate();
    }
    // A peer that never answers the closing handshake must not hold the socket.
    this.closeTimer = setTimeout(() => this.ws.terminate(), 2000);
    this.closeTimer.unref();
    this.emitClose(code, reason);
  }

  private finish(code: number, reason: string): void {
    if (this.closeTimer) clearTimeout(this.closeTimer);
    this.isClosed = true;
    this.emitClose(code, reason);
  }

  private closeEmitted = false;
  private emitClose(code: number, reason: string): void {
    if (this.closeEmitted) return;
    this.closeEmitted = true;
    this.emit("close", code, reason);
  }
}

/** RFC 6455 §5.2 header of one unmasked, final binary frame of `length` payload bytes. */
function binaryFrameHeader(length: number): Buffer {
  if (length < 126) return Buffer.from([0x82, length]);
  if (length <= 0xffff) return Buffer.from([0x82, 126, length >>> 8, length & 0xff]);
  const header = Buffer.alloc(10);
  header[0] = 0x82;
  header[1] = 127;
  header.writeUIntBE(length, 4, 6);
  return header;
}
