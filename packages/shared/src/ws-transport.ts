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
    const size = message.byteLength;
    this.outstanding += size;
    if (this.outstanding > DRAIN_LOW_WATER) this.aboveLowWater = true;
    if (!this.corked) {
      const socket = this.socket;
      if (socket) {
        this.corked = true;
        socket.cork();
        process.nextTick(this.uncork, socket);
      }
    }
    this.ws.send(message, { binary: true }, () => {
      this.outstanding -= size;
      if (this.aboveLowWater && this.outstanding <= DRAIN_LOW_WATER) {
        this.aboveLowWater = false;
        this.emit("drain");
      }
    });
  }

  sendParts(parts: readonly Uint8Array[]): void {
    this.send(Buffer.concat(parts));
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
