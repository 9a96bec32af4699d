// The transport seam: something that carries whole binary messages in order between two peers.
// The WebSocket adapter, the Noise secure channel and the in-memory test pair all implement it,
// so the multiplexer above never knows which one it runs over.
import { EventEmitter } from "node:events";

export interface TransportEvents {
  message: [message: Uint8Array];
  close: [code: number, reason: string];
  /** bufferedAmount fell back below the low-water mark after having been above it. */
  drain: [];
}

export interface MessageTransport {
  send(message: Uint8Array): void;
  /**
   * Sends the concatenation of `parts` as one message. Optional: a layer that transforms messages
   * (the secure channel encrypts part after part) implements it to skip joining them first.
   */
  sendParts?(parts: readonly Uint8Array[]): void;
  /** Bytes handed to send() that the underlying channel has not yet written out. */
  readonly bufferedAmount: number;
  /**
   * Optional: the largest message this transport carries without an extra cost on the receiving side
   * (WebSocketTransport: a copy when a frame spans two socket reads). The mux fills its messages up
   * to it rather than to the protocol's limit.
   */
  readonly preferredMessageSize?: number | undefined;
  close(code?: number, reason?: string): void;
  readonly closed: boolean;
  on<K extends keyof TransportEvents>(event: K, listener: (...args: TransportEvents[K]) => void): this;
  once<K extends keyof TransportEvents>(event: K, listener: (...args: TransportEvents[K]) => void): this;
  off<K extends keyof TransportEvents>(event: K, listener: (...args: TransportEvents[K]) => void): this;
}

export const CLOSE_NORMAL = 1000;
export const CLOSE_GOING_AWAY = 1001;
export const CLOSE_PROTOCOL_ERROR = 1002;
export const CLOSE_POLICY = 1008;

/** Default low-water mark below which a transport emits "drain". */
export const DRAIN_LOW_WATER = 256 * 1024;

/**
 * Two connected in-memory transports. Delivery is asynchronous (setImmediate) and a message counts
 * towards the sender's bufferedAmount until the receiver has been handed it, which lets flow-control
 * tests observe backpressure without sockets.
 */
export function createMemoryTransportPair(): [MemoryTransport, MemoryTransport] {
  const a = new MemoryTransport();
  const b = new MemoryTransport();
  a.peer = b;
  b.peer = a;
  return [a, b];
}

export class MemoryTransport extends EventEmitter<TransportEvents> implements MessageTransport {
  peer: MemoryTransport | undefined;
  private pending = 0;
  private wasAboveLowWater = false;
  private isClosed = false;
  /** When true, deliveries are held until resume(): a peer that stopped reading. */
  private paused = false;
  private held: Uint8Array[] = [];

  get bufferedAmount(): number {
    return this.pending;
  }

  get closed(): boolean {
    return this.isClosed;
  }

  send(message: Uint8Array): void {
    if (this.isClosed) return;
    const copy = Uint8Array.from(message);
    this.pending += copy.byteLength;
    if (this.pending > DRAIN_LOW_WATER) this.wasAboveLowWater = true;
    if (this.paused) {
      this.held.push(copy);
      return;
    }
    setImmediate(() => this.deliver(copy));
  }

  sendParts(parts: readonly Uint8Array[]): void {
    this.send(Buffer.concat(parts));
  }

  /** Stop delivering this side's outgoing messages (simulates a slow link). */
  pause(): void {
    this.paused = true;
  }

  resume(): void {
    this.paused = false;
    const held = this.held;
    this.held = [];
    for (const message of held) setImmediate(() => this.deliver(message));
  }

  private deliver(message: Uint8Array): void {
    this.pending -= message.byteLength;
    if (this.isClosed || !this.peer || this.peer.isClosed) return;
    this.peer.emit("message", message);
    if (this.wasAboveLowWater && this.pending <= DRAIN_LOW_WATER) {
      this.wasAboveLowWater = false;
      this.emit("drain");
    }
  }

  close(code = CLOSE_NORMAL, reason = ""): void {
    if (this.isClosed) return;
    this.isClosed = true;
    setImmediate(() => {
      this.emit("close", code, reason);
      const peer = this.peer;
      if (peer && !peer.isClosed) {
        peer.isClosed = true;
        peer.emit("close", code, reason);
      }
    });
  }
}
