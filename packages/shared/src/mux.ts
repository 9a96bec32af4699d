// Multiplexed streams over one MessageTransport: stream ids, credit-based flow control per stream and
// per tunnel, a round-robin sender, half-close, results, resets and liveness. Bytes only ever pass
// through wire.ts; this module works on typed frames.
//
// Credit model. Each side implicitly holds INITIAL_STREAM_CREDIT for every new stream and zero
// tunnel credit; a multiplexer grants its whole tunnel budget with WINDOW(0) as it starts. Credit
// goes back to the sender only as the application consumes data (reads it out of the Duplex), so
// what a tunnel holds unread is bounded by its budget however many streams there are.
import { EventEmitter } from "node:events";
import type net from "node:net";
import { Duplex } from "node:stream";
import { ConfigError, MxtunnelError, ProtocolError } from "./errors.js";
import { CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_PROTOCOL_ERROR, type MessageTransport } from "./transport.js";
import {
  batchOverhead,
  decodeMessage,
  encodeFrame,
  FRAME_HEADER_SIZE,
  type Frame,
  INITIAL_STREAM_CREDIT,
  MAX_CREDIT,
  MAX_MESSAGE_SIZE,
  MAX_RESET_REASON_SIZE,
  MessageBuilder,
  ResetCode,
  type StreamKind,
} from "./wire.js";

export interface MuxOptions {
  /** home opens odd stream ids (1, 3, 5…), edge even ones (2, 4, …). */
  role: "home" | "edge";
  /** Per-stream receive credit; default INITIAL_STREAM_CREDIT (1 MiB). */
  initialWindow?: number;
  /** Receive budget across all streams of the tunnel (HTTP/2's connection window); default 4 MiB. */
  tunnelBudget?: number;
  /** Concurrent streams the peer may open; default 1024. Past it: RESET(TOO_MANY_STREAMS). */
  maxStreams?: number;
  /** Stop sending DATA while transport.bufferedAmount exceeds this; default 1 MiB. */
  maxBufferedAmount?: number;
  /** Default 15000; 0 disables. */
  pingIntervalMs?: number;
  /** No frame at all for this long closes the transport (1001, "peer silent"); default 45000; 0 disables. */
  idleTimeoutMs?: number;
}

export interface MuxStats {
  openStreams: number;
  /** DATA bytes queued inside the mux, not yet handed to the transport. */
  queuedBytes: number;
  transportBuffered: number;
  /** DATA received and not yet consumed by readers. */
  receiveBuffered: number;
  /** Whole frames, headers included (not the BATCH envelopes around them). */
  bytesSent: number;
  bytesReceived: number;
  /** Transport messages (one Noise transport message each): a bare frame or a BATCH of frames. */
  messagesSent: number;
  messagesReceived: number;
}

export interface MuxEvents {
  stream: [stream: MuxStream];
  control: [message: Record<string, unknown>];
  close: [error?: Error];
  protocolError: [error: ProtocolError];
}

const DEFAULTS = {
  initialWindow: INITIAL_STREAM_CREDIT,
  tunnelBudget: 4 * 1024 * 1024,
  maxStreams: 1024,
  maxBufferedAmount: 1024 * 1024,
  pingIntervalMs: 15_000,
  idleTimeoutMs: 45_000,
} as const;

/** Fallback re-check while waiting for "drain", for transports whose low-water mark is above our cap. */
const BUFFERED_POLL_MS = 25;
const MAX_PENDING_PINGS = 64;
const MAX_STREAM_ID = 0xffffffff;
/**
 * A spliced socket is paused while this many of its bytes wait in the mux queue: the Duplex's
 * writableHighWaterMark that pipe() honoured before sockets were wired to the engine directly.
 */
const SPLICE_HIGH_WATER = 16 * 1024;
/** A transport's preferredMessageSize below this is not honoured (see the Engine constructor). */
const MIN_PREFERRED_MESSAGE_SIZE = 16 * 1024;

type WriteCallback = (error?: Error | null) => void;
const ignoreWriteResult: WriteCallback = () => {};

type Outgoing =
  | {
      kind: "data";
      chunk: Uint8Array;
      offset: number;
      callback: WriteCallback | undefined;
      batchBytes: number;
    }
  | { kind: "result"; frame: Uint8Array }
  | { kind: "end"; callback: WriteCallback };

type Incoming = Uint8Array | { result: unknown };

/** Array-backed queue with O(1) amortised shift. */
class Fifo<T> {
  private items: (T | undefined)[] = [];
  private head = 0;

  get length(): number {
    return this.items.length - this.head;
  }

  push(item: T): void {
    this.items.push(item);
  }

  peek(): T | undefined {
    return this.items[this.head];
  }

  shift(): T | undefined {
    if (this.head >= this.items.length) return undefined;
    const item = this.items[this.head];
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items = [];
      this.head = 0;
    } else if (this.head >= 1024 && this.head * 2 >= this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }

  drain(): T[] {
    const rest = this.items.slice(this.head) as T[];
    this.items = [];
    this.head = 0;
    return rest;
  }
}

/** The multiplexer's bookkeeping for one stream. */
class StreamState {
  readonly stream: MuxStream;
  // sending
  readonly out = new Fifo<Outgoing>();
  sendCredit = INITIAL_STREAM_CREDIT;
  /** In the ready queue or the tunnel-blocked list. */
  scheduled = false;
  /** Opener: the peer sent ACCEPT. Receiver: we sent ACCEPT. */
  accepted = false;
  endQueued = false;
  endSent = false;
  /** Bytes handed to the mux by the Writable so far. */
  enqueuedBytes = 0;
  /** Bytes handed to the mux whose write callback has not fired yet (still counted in writableLength). */
  unconfirmedBytes = 0;
  /** RESULTs waiting for the Writable's buffered chunks ahead of them to reach the mux. */
  pendingResults: { target: number; frame: Uint8Array }[] = [];
  /** DATA bytes in `out` not yet cut into frames. */
  queuedData = 0;
  /** Set when the stream is spliced to a socket directly: its bytes bypass the Duplex both ways. */
  splice: SocketSplice | undefined;
  // receiving
  readonly inbox = new Fifo<Incoming>();
  inboxBytes = 0;
  readWanted = false;
  remoteEnded = false;
  eofPushed = false;
  recvGranted = INITIAL_STREAM_CREDIT;
  recvTotal = 0;
  /** Last sampled unread bytes (inbox + Readable buffer), as counted in the tunnel total. */
  unreadSample = 0;
  // lifecycle
  resetSent = false;
  resetReceived = false;
  resetCode: number | undefined;
  resetReason: string | undefined;

  constructor(
    engine: Engine,
    readonly id: number,
    readonly kind: StreamKind,
    readonly meta: Record<string, unknown>,
    readonly local: boolean,
  ) {
    this.stream = new MuxStream({ engine, state: this } satisfies StreamInit);
  }
}

interface StreamInit {
  engine: Engine;
  state: StreamState;
}

interface PendingPing {
  sentAt: number;
  resolve: ((rttMs: number) => void) | undefined;
  reject: ((error: Error) => void) | undefined;
}

/** A breach of the protocol by the peer, detected by the mux (as opposed to one thrown by app code). */
class PeerViolation extends ProtocolError {}

type ResolvedOptions = Required<MuxOptions>;

function resolveOptions(options: MuxOptions): ResolvedOptions {
  const resolved: ResolvedOptions = { ...DEFAULTS, ...options };
  const problems: string[] = [];
  if (resolved.role !== "home" && resolved.role !== "edge") problems.push('role: expected "home" or "edge"');
  const ranges: [keyof ResolvedOptions, number, number][] = [
    ["initialWindow", 1, MAX_CREDIT],
    ["tunnelBudget", 1, MAX_CREDIT],
    ["maxStreams", 0, MAX_STREAM_ID],
    ["maxBufferedAmount", 0, Number.MAX_SAFE_INTEGER],
    ["pingIntervalMs", 0, 2 ** 31 - 1],
    ["idleTimeoutMs", 0, 2 ** 31 - 1],
  ];
  for (const [key, min, max] of ranges) {
    const value = resolved[key];
    if (typeof value !== "number" || !Number.isInteger(value) || value < min || value > max) {
      problems.push(`${key}: expected an integer in ${min}..${max}`);
    }
  }
  if (problems.length > 0)
    throw new ConfigError(problems, `invalid Mux options:\n  ${problems.join("\n  ")}`);
  return resolved;
}

function truncateUtf8(text: string, maxBytes: number): string {
  const bytes = Buffer.from(text, "utf8");
  if (bytes.byteLength <= maxBytes) return text;
  let end = maxBytes;
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end).toString("utf8");
}

/**
 * A socket spliced to a stream by the engine. Teardown as splice.ts: if either side fails both are
 * destroyed, but a side that ended cleanly is left to flush what it still has to write; onDone runs
 * once, when both are closed (at once, with the error, if the socket fails).
 */
class SocketSplice {
  paused = false;
  socketClosed = false;
  streamClosed = false;
  private done = false;

  constructor(
    private readonly engine: Engine,
    private readonly state: StreamState,
    readonly socket: net.Socket,
    private readonly onDone: ((error?: Error) => void) | undefined,
  ) {}

  /** Received bytes not yet handed to the kernel, counted only above the socket's high-water mark. */
  unread(): number {
    return this.socket.writableNeedDrain ? this.socket.writableLength : 0;
  }

  readonly onData = (chunk: Buffer): void => this.engine.spliceData(this.state, chunk);

  readonly onEnd = (): void => this.engine.spliceEnd(this.state);

  readonly onDrain = (): void => {
    if (!this.state.stream.destroyed) this.engine.onConsumed(this.state);
  };

  readonly resume = (): void => {
    if (!this.paused && !this.socket.destroyed) this.socket.resume();
  };

  readonly onError = (error: Error): void => {
    this.finish(error);
    this.state.stream.destroy();
  };

  readonly onClose = (): void => {
    this.socketClosed = true;
    // A socket that read its FIN and queued END, then closed, leaves the stream to send it.
    if (!(this.socket.readableEnded && this.state.endQueued)) this.state.stream.destroy();
    if (this.streamClosed) this.finish(undefined);
  };

  onStreamDestroyed(): void {
    if (this.streamClosed) return;
    this.streamClosed = true;
    // A clean END from the peer has already called socket.end(): let the socket flush and close.
    if (!(this.state.remoteEnded && this.socket.writableEnded)) this.socket.destroy();
    if (this.socketClosed) this.finish(undefined);
  }

  private finish(error: Error | undefined): void {
    if (this.done) return;
    this.done = true;
    this.onDone?.(error);
  }
}

class Engine {
  readonly streams = new Map<number, StreamState>();
  closed = false;
  lastRttMs: number | undefined;
  lastReceivedAt = Date.now();
  queuedBytes = 0;
  bytesSent = 0;
  bytesReceived = 0;
  messagesSent = 0;
  messagesReceived = 0;

  private readonly options: ResolvedOptions;
  private readonly streamGrantThreshold: number;
  private readonly tunnelGrantThreshold: number;
  private nextLocalId: number;
  private highestPeerId = 0;
  private peerStreams = 0;

  private readonly ready = new Fifo<StreamState>();
  private tunnelBlocked: StreamState[] = [];
  /** Streams whose short tail after a full frame waits for the next flush (see `holdTail`). */
  private heldTails: StreamState[] = [];
  private tunnelSendCredit = 0;
  private tunnelGranted = 0;
  private tunnelRecvTotal = 0;
  private tunnelUnread = 0;

  /**
   * Frames outside the round-robin (OPEN, ACCEPT, WINDOW, RESET, PING/PONG, CONTROL), in order. They
   * jump the DATA queue and the transport's backpressure, and leave with the next flush, so what one
   * turn of the event loop produces goes out together (one socket write under a corking transport).
   */
  private urgent: Uint8Array[] = [];
  /**
   * The transport message a flush is filling: urgent frames first, then DATA/RESULT/END in the
   * round-robin's order; it leaves when the next frame does not fit, at backpressure and at the end
   * of the flush, so a flush costs one Noise message per ~64 KiB rather than one per frame.
   */
  private readonly message: MessageBuilder;
  /** The largest DATA payload we send: a full frame alone fills a message of the transport's preferred size. */
  private readonly dataLimit: number;
  private flushImmediate: NodeJS.Immediate | undefined;
  private waitingForDrain = false;
  private drainPoll: NodeJS.Timeout | undefined;
  private pingTimer: NodeJS.Timeout | undefined;
  private idleTimer: NodeJS.Timeout | undefined;
  private readonly pings = new Map<bigint, PendingPing>();
  private pingCounter = 0n;

  constructor(
    private readonly mux: Mux,
    private readonly transport: MessageTransport,
    options: MuxOptions,
  ) {
    this.options = resolveOptions(options);
    this.nextLocalId = this.options.role === "home" ? 1 : 2;
    const preferred = transport.preferredMessageSize;
    // Far below 64 KiB the per-message costs would outweigh what a smaller message saves: ignored.
    const messageSize =
      preferred !== undefined && Number.isInteger(preferred) && preferred >= MIN_PREFERRED_MESSAGE_SIZE
        ? Math.min(preferred, MAX_MESSAGE_SIZE)
        : MAX_MESSAGE_SIZE;
    this.message = new MessageBuilder(messageSize);
    this.dataLimit = messageSize - FRAME_HEADER_SIZE;
    // A quarter, not half: the sender keeps three quarters of a window in flight while the grant travels.
    this.streamGrantThreshold = Math.max(1, Math.floor(this.options.initialWindow / 4));
    this.tunnelGrantThreshold = Math.max(1, Math.floor(this.options.tunnelBudget / 4));
    transport.on("message", this.onMessage);
    transport.on("close", this.onTransportClose);
    if (transport.closed) {
      queueMicrotask(() =>
        this.shutdown(new MxtunnelError("TUNNEL_CLOSED", "the transport was already closed")),
      );
      return;
    }
    this.tunnelGranted = this.options.tunnelBudget;
    // At once, not at the next flush: it joins the handshake's last message in the same write.
    this.sendNow(encodeFrame({ type: "window", stream: 0, credit: this.options.tunnelBudget }));
    if (this.options.pingIntervalMs > 0) {
      this.pingTimer = setInterval(() => this.sendPing(undefined), this.options.pingIntervalMs).unref();
    }
    if (this.options.idleTimeoutMs > 0) this.armIdle(this.options.idleTimeoutMs);
  }

  // ---- public operations -------------------------------------------------------------------------

  open(kind: StreamKind, meta: Record<string, unknown>): MuxStream {
    if (this.closed) throw new MxtunnelError("TUNNEL_CLOSED", "cannot open a stream: the tunnel is closed");
    const id = this.nextLocalId;
    if (id > MAX_STREAM_ID) {
      throw new MxtunnelError("TUNNEL_CLOSED", "this tunnel has used up its stream ids; reconnect");
    }
    const frame = encodeFrame({ type: "open", stream: id, kind, meta });
    this.nextLocalId += 2;
    const state = new StreamState(this, id, kind, meta, true);
    this.streams.set(id, state);
    this.sendRaw(frame);
    this.grantExtraInitialCredit(state);
    return state.stream;
  }

  sendControl(message: Record<string, unknown>): void {
    if (this.closed) throw new MxtunnelError("TUNNEL_CLOSED", "cannot send CONTROL: the tunnel is closed");
    this.sendRaw(encodeFrame({ type: "control", message }));
  }

  ping(): Promise<number> {
    if (this.closed) {
      return Promise.reject(new MxtunnelError("TUNNEL_CLOSED", "cannot ping: the tunnel is closed"));
    }
    return new Promise((resolve, reject) => this.sendPing({ resolve, reject }));
  }

  stats(): MuxStats {
    return {
      openStreams: this.streams.size,
      queuedBytes: this.queuedBytes,
      transportBuffered: this.transport.bufferedAmount,
      receiveBuffered: this.tunnelUnread,
      bytesSent: this.bytesSent,
      bytesReceived: this.bytesReceived,
      messagesSent: this.messagesSent,
      messagesReceived: this.messagesReceived,
    };
  }

  close(code: number, reason: string): void {
    this.shutdown(undefined, { code, reason });
  }

  // ---- stream operations (called by MuxStream) ---------------------------------------------------

  accept(state: StreamState): void {
    if (state.local) {
      throw new Error(`stream ${state.id} was opened locally; only the receiving side accepts`);
    }
    if (state.accepted || state.stream.destroyed || this.closed) return;
    state.accepted = true;
    this.sendFrame({ type: "accept", stream: state.id });
  }

  reset(state: StreamState, code: number, reason: string): void {
    if (state.stream.destroyed) return;
    const frame = encodeFrame({
      type: "reset",
      stream: state.id,
      code,
      reason: truncateUtf8(reason, MAX_RESET_REASON_SIZE),
    });
    // A stream already forgotten (both directions ended) needs no RESET: the peer would drop it.
    if (this.streams.get(state.id) === state) this.sendRaw(frame);
    state.resetSent = true;
    state.stream.destroy();
  }

  write(state: StreamState, chunks: readonly Uint8Array[], callback: WriteCallback): void {
    if (this.closed || state.stream.destroyed) {
      callback(new MxtunnelError("TUNNEL_CLOSED", `stream ${state.id} is closed`));
      return;
    }
    let batchBytes = 0;
    for (const chunk of chunks) batchBytes += chunk.byteLength;
    state.unconfirmedBytes += batchBytes;
    chunks.forEach((chunk, index) => {
      const last = index === chunks.length - 1;
      state.out.push({ kind: "data", chunk, offset: 0, callback: last ? callback : undefined, batchBytes });
      state.enqueuedBytes += chunk.byteLength;
      state.queuedData += chunk.byteLength;
      this.queuedBytes += chunk.byteLength;
      this.releaseResults(state, false);
    });
    this.makeReady(state);
  }

  /**
   * Wires a socket to the stream without the Duplex: socket reads go straight to the send queue (the
   * socket paused while SPLICE_HIGH_WATER bytes wait there) and DATA straight to socket.write(), its
   * credit held back while the socket's write buffer is over its high-water mark. False, and nothing
   * changed, when the Duplex has been read or written already.
   */
  splice(state: StreamState, socket: net.Socket, onDone: ((error?: Error) => void) | undefined): boolean {
    const stream = state.stream;
    const used =
      state.splice !== undefined ||
      state.readWanted ||
      stream.readableFlowing !== null ||
      stream.readableLength > 0 ||
      stream.writableLength > 0 ||
      stream.writableEnded;
    if (used) return false;
    if (this.closed || stream.destroyed || socket.destroyed) {
      // One side is gone already and its 'close' may have fired: take the other down now.
      stream.destroy();
      socket.destroy();
      onDone?.();
      return true;
    }
    const splice = new SocketSplice(this, state, socket, onDone);
    state.splice = splice;
    socket.on("data", splice.onData);
    socket.on("end", splice.onEnd);
    socket.on("drain", splice.onDrain);
    socket.on("error", splice.onError);
    socket.on("close", splice.onClose);
    // What arrived before the splice waits in the inbox (nobody read the Duplex): it goes first.
    while (state.inbox.length > 0) {
      const item = state.inbox.shift()!;
      if (item instanceof Uint8Array) socket.write(item);
      else process.nextTick(() => stream.emit("result", item.result));
    }
    state.inboxBytes = 0;
    if (state.remoteEnded) socket.end();
    this.sampleUnread(state);
    return true;
  }

  /** A spliced socket's read. */
  spliceData(state: StreamState, chunk: Buffer): void {
    const splice = state.splice!;
    if (this.closed || state.stream.destroyed || state.endQueued) return;
    const size = chunk.byteLength;
    if (size === 0) return;
    state.out.push({ kind: "data", chunk, offset: 0, callback: undefined, batchBytes: size });
    state.enqueuedBytes += size;
    state.queuedData += size;
    this.queuedBytes += size;
    if (state.pendingResults.length > 0) this.releaseResults(state, false);
    this.makeReady(state);
    if (!splice.paused && state.queuedData >= SPLICE_HIGH_WATER) {
      splice.paused = true;
      splice.socket.pause();
    }
  }

  /** A spliced socket's FIN: END after the data read before it. */
  spliceEnd(state: StreamState): void {
    if (state.endQueued) return;
    this.end(state, ignoreWriteResult);
  }

  sendResult(state: StreamState, result: unknown): void {
    if (state.endQueued) {
      throw new Error(
        `stream ${state.id}: sendResult() after the stream's END; send the RESULT before end()`,
      );
    }
    if (this.closed || state.stream.destroyed) return;
    const frame = encodeFrame({ type: "result", stream: state.id, result });
    // Chunks still buffered in the Writable (not yet passed to _write) were written before this
    // RESULT, so it waits until they have reached the mux queue.
    const target = state.enqueuedBytes + (state.stream.writableLength - state.unconfirmedBytes);
    state.pendingResults.push({ target, frame });
    this.releaseResults(state, false);
    this.makeReady(state);
  }

  end(state: StreamState, callback: WriteCallback): void {
    if (this.closed || state.stream.destroyed) return;
    this.releaseResults(state, true);
    state.endQueued = true;
    state.out.push({ kind: "end", callback });
    this.makeReady(state);
  }

  onRead(state: StreamState): void {
    state.readWanted = true;
    this.drainInbox(state);
    this.sampleUnread(state);
  }

  /** The application took data out of the Readable buffer (or the stream ended or was destroyed). */
  onConsumed(state: StreamState): void {
    this.sampleUnread(state);
  }

  onDestroy(state: StreamState, error: Error | null): void {
    const live = this.streams.get(state.id) === state;
    if (live) this.forget(state);
    const finished = state.remoteEnded && state.endSent;
    if (live && !this.closed && !finished && !state.resetSent && !state.resetReceived) {
      state.resetSent = true;
      // Local error text stays local (it may name LAN hosts); reset() is there for a chosen reason.
      const reason = error ? "stream failed" : "cancelled";
      this.sendFrame({ type: "reset", stream: state.id, code: ResetCode.CANCEL, reason });
    }
    if (state.out.length > 0) {
      // Built only when needed: an Error (with its stack) per closed stream showed in profiles.
      let dropped: MxtunnelError | undefined;
      for (const item of state.out.drain()) {
        if (item.kind !== "data") continue;
        this.queuedBytes -= item.chunk.byteLength - item.offset;
        if (!item.callback) continue;
        dropped ??= new MxtunnelError(
          "TUNNEL_CLOSED",
          `stream ${state.id} was closed before this write was sent`,
        );
        item.callback(dropped);
      }
    }
    state.queuedData = 0;
    state.pendingResults = [];
    state.inbox.drain();
    state.inboxBytes = 0;
    this.sampleUnread(state);
    state.splice?.onStreamDestroyed();
  }

  // ---- receiving ---------------------------------------------------------------------------------

  private readonly onMessage = (bytes: Uint8Array): void => {
    if (this.closed) return;
    this.lastReceivedAt = Date.now();
    this.messagesReceived++;
    let frames: Frame[];
    try {
      // The whole message first: a malformed BATCH is refused before any of its frames takes effect.
      frames = decodeMessage(bytes);
    } catch (error) {
      if (!(error instanceof ProtocolError)) throw error;
      this.fail(error);
      return;
    }
    this.bytesReceived += bytes.byteLength - batchOverhead(bytes, frames.length);
    for (const frame of frames) {
      // A frame (or the application handling it) may have closed the tunnel: drop the rest.
      if (this.closed) return;
      try {
        this.handle(frame);
      } catch (error) {
        // Only the peer's breaches close the tunnel; an application handler's own error propagates.
        if (!(error instanceof PeerViolation)) throw error;
        this.fail(error);
        return;
      }
    }
  };

  private handle(frame: Frame): void {
    switch (frame.type) {
      case "ping":
        this.sendFrame({ type: "pong", payload: frame.payload });
        return;
      case "pong":
        this.onPong(frame.payload);
        return;
      case "control":
        this.mux.emit("control", frame.message);
        return;
      case "open":
        this.onOpen(frame.stream, frame.kind, frame.meta);
        return;
      case "window":
        if (frame.stream === 0) {
          this.onTunnelWindow(frame.credit);
          return;
        }
        break;
      case "data":
        this.chargeTunnel(frame.data.byteLength);
        break;
    }
    const state = this.lookup(frame.stream, frame.type);
    if (!state) {
      // A stream we already closed: drop quietly, but its DATA no longer occupies the budget.
      if (frame.type === "data") this.maybeGrantTunnel();
      return;
    }
    switch (frame.type) {
      case "accept":
        this.onAccept(state);
        return;
      case "data":
        this.onData(state, frame.data);
        return;
      case "window":
        this.onStreamWindow(state, frame.credit);
        return;
      case "end":
        this.onEnd(state);
        return;
      case "result":
        state.inbox.push({ result: frame.result });
        this.drainInbox(state);
        return;
      case "reset":
        this.onReset(state, frame.code, frame.reason);
        return;
    }
  }

  private isLocalId(id: number): boolean {
    return (id % 2 === 1) === (this.options.role === "home");
  }

  private lookup(id: number, type: Frame["type"]): StreamState | undefined {
    const state = this.streams.get(id);
    if (state) return state;
    const past = this.isLocalId(id) ? id < this.nextLocalId : id <= this.highestPeerId;
    if (past) return undefined;
    throw new PeerViolation(
      "STREAM_UNKNOWN",
      `${type.toUpperCase()} for stream ${id}, which was never opened`,
    );
  }

  private onOpen(id: number, kind: StreamKind, meta: Record<string, unknown>): void {
    if (this.isLocalId(id)) {
      const peer = this.options.role === "home" ? "edge" : "home";
      const parity = peer === "home" ? "odd" : "even";
      throw new PeerViolation(
        "STREAM_ID_PARITY",
        `the ${peer} opened stream ${id}, but it opens ${parity} ids`,
      );
    }
    if (id <= this.highestPeerId) {
      throw new PeerViolation(
        "STREAM_ID_REUSED",
        `the peer opened stream ${id}, which is not above its last stream ${this.highestPeerId}`,
      );
    }
    this.highestPeerId = id;
    if (this.peerStreams >= this.options.maxStreams) {
      const reason = `more than ${this.options.maxStreams} concurrent streams`;
      this.sendFrame({ type: "reset", stream: id, code: ResetCode.TOO_MANY_STREAMS, reason });
      return;
    }
    if (this.mux.listenerCount("stream") === 0) {
      this.sendFrame({
        type: "reset",
        stream: id,
        code: ResetCode.REFUSED,
        reason: "nothing accepts streams",
      });
      return;
    }
    const state = new StreamState(this, id, kind, meta, false);
    this.streams.set(id, state);
    this.peerStreams++;
    this.grantExtraInitialCredit(state);
    this.mux.emit("stream", state.stream);
  }

  private onAccept(state: StreamState): void {
    if (!state.local) {
      throw new PeerViolation(
        "FRAME_MALFORMED",
        `ACCEPT for stream ${state.id}, which the peer opened itself`,
      );
    }
    if (state.accepted) return;
    state.accepted = true;
    state.stream.emit("accept");
  }

  private chargeTunnel(size: number): void {
    const outstanding = this.tunnelGranted - this.tunnelRecvTotal;
    if (size > outstanding) {
      throw new PeerViolation(
        "CREDIT_OVERFLOW",
        `the peer sent ${size} bytes with ${outstanding} bytes of tunnel credit left`,
      );
    }
    this.tunnelRecvTotal += size;
  }

  private onData(state: StreamState, data: Uint8Array): void {
    if (state.remoteEnded)
      throw new PeerViolation("STREAM_UNKNOWN", `DATA on stream ${state.id} after its END`);
    const outstanding = state.recvGranted - state.recvTotal;
    if (data.byteLength > outstanding) {
      throw new PeerViolation(
        "CREDIT_OVERFLOW",
        `the peer sent ${data.byteLength} bytes on stream ${state.id} with ${outstanding} bytes of credit left`,
      );
    }
    state.recvTotal += data.byteLength;
    const splice = state.splice;
    if (splice) {
      if (!splice.socket.destroyed) splice.socket.write(data);
      this.sampleUnread(state);
      return;
    }
    state.inbox.push(data);
    state.inboxBytes += data.byteLength;
    this.drainInbox(state);
    this.sampleUnread(state);
  }

  private onEnd(state: StreamState): void {
    if (state.remoteEnded) return;
    state.remoteEnded = true;
    if (state.splice) {
      if (!state.splice.socket.destroyed) state.splice.socket.end();
    } else {
      this.drainInbox(state);
    }
    this.maybeForget(state);
  }

  private onReset(state: StreamState, code: number, reason: string): void {
    state.resetReceived = true;
    state.resetCode = code;
    state.resetReason = reason;
    state.stream.emit("reset", code, reason);
    state.stream.destroy();
  }

  private onStreamWindow(state: StreamState, credit: number): void {
    if (state.sendCredit + credit > MAX_CREDIT) {
      throw new PeerViolation("CREDIT_OVERFLOW", `WINDOW raised stream ${state.id}'s credit past 2^31-1`);
    }
    state.sendCredit += credit;
    this.makeReady(state);
  }

  private onTunnelWindow(credit: number): void {
    if (this.tunnelSendCredit + credit > MAX_CREDIT) {
      throw new PeerViolation("CREDIT_OVERFLOW", "WINDOW raised the tunnel credit past 2^31-1");
    }
    this.tunnelSendCredit += credit;
    if (this.tunnelBlocked.length === 0) return;
    const blocked = this.tunnelBlocked;
    this.tunnelBlocked = [];
    for (const state of blocked) this.ready.push(state);
    this.scheduleFlush();
  }

  private onPong(payload: Uint8Array): void {
    const key = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength).readBigUInt64BE(0);
    const pending = this.pings.get(key);
    if (!pending) return;
    this.pings.delete(key);
    const rtt = performance.now() - pending.sentAt;
    this.lastRttMs = rtt;
    pending.resolve?.(rtt);
  }

  /** Moves received DATA into the Readable as far as it wants it; RESULT and END keep their place. */
  private drainInbox(state: StreamState): void {
    const stream = state.stream;
    while (state.inbox.length > 0 && !stream.destroyed) {
      const item = state.inbox.peek()!;
      if (item instanceof Uint8Array) {
        if (!state.readWanted) break;
        state.inbox.shift();
        state.inboxBytes -= item.byteLength;
        state.readWanted = stream.push(item);
      } else {
        state.inbox.shift();
        // After the 'data' events the pushes above schedule.
        process.nextTick(() => stream.emit("result", item.result));
      }
    }
    if (
      state.inbox.length === 0 &&
      state.remoteEnded &&
      !state.eofPushed &&
      !stream.destroyed &&
      !state.splice
    ) {
      state.eofPushed = true;
      stream.push(null);
    }
  }

  // ---- credit returned to the peer ---------------------------------------------------------------

  private grantExtraInitialCredit(state: StreamState): void {
    const extra = this.options.initialWindow - INITIAL_STREAM_CREDIT;
    if (extra <= 0) return;
    state.recvGranted += extra;
    this.sendFrame({ type: "window", stream: state.id, credit: extra });
  }

  private sampleUnread(state: StreamState): void {
    const stream = state.stream;
    const unread = stream.destroyed
      ? 0
      : state.splice
        ? state.splice.unread()
        : state.inboxBytes + stream.readableLength;
    if (unread !== state.unreadSample) {
      this.tunnelUnread += unread - state.unreadSample;
      state.unreadSample = unread;
    }
    if (this.closed) return;
    this.maybeGrantStream(state);
    this.maybeGrantTunnel();
  }

  private maybeGrantStream(state: StreamState): void {
    if (state.remoteEnded || this.streams.get(state.id) !== state) return;
    const outstanding = state.recvGranted - state.recvTotal;
    const credit = this.options.initialWindow - outstanding - state.unreadSample;
    if (credit < this.streamGrantThreshold) return;
    state.recvGranted += credit;
    this.sendFrame({ type: "window", stream: state.id, credit });
  }

  private maybeGrantTunnel(): void {
    const outstanding = this.tunnelGranted - this.tunnelRecvTotal;
    const credit = this.options.tunnelBudget - outstanding - this.tunnelUnread;
    if (credit <= 0) return;
    // Batch, except when the peer is nearly out of credit: then any consumed byte goes back at once,
    // so a stalled sender can never wait on credit we are holding for batching.
    if (credit < this.tunnelGrantThreshold && outstanding >= this.tunnelGrantThreshold) return;
    this.tunnelGranted += credit;
    this.sendFrame({ type: "window", stream: 0, credit });
  }

  // ---- sending -----------------------------------------------------------------------------------

  /** Queues a frame outside the round-robin; see `urgent`. */
  private sendRaw(bytes: Uint8Array): void {
    if (this.closed) return;
    this.urgent.push(bytes);
    this.scheduleFlush();
  }

  private sendFrame(frame: Frame): void {
    if (this.closed) return;
    this.sendRaw(encodeFrame(frame));
  }

  /** One frame as a message of its own, at once (only while no message is being filled). */
  private sendNow(bytes: Uint8Array): void {
    this.bytesSent += bytes.byteLength;
    this.messagesSent++;
    this.transport.send(bytes);
  }

  /** Adds a frame to the message being filled; a full message leaves first. */
  private queueFrame(bytes: Uint8Array): void {
    if (!this.message.add(bytes)) {
      this.sendMessage();
      // An empty message takes any frame the codec produced.
      if (!this.message.add(bytes)) throw new Error(`a ${bytes.byteLength}-byte frame fits no message`);
    }
    this.bytesSent += bytes.byteLength;
  }

  /** DATA as header and payload parts: a transport with sendParts encrypts the payload in place. */
  private queueData(stream: number, pieces: readonly Uint8Array[], size: number): void {
    if (!this.message.addData(stream, pieces)) {
      this.sendMessage();
      if (!this.message.addData(stream, pieces)) throw new Error(`${size} DATA bytes fit no message`);
    }
    this.bytesSent += FRAME_HEADER_SIZE + size;
  }

  /**
   * Up to `limit` bytes from the data at the head of a stream's queue, as pieces of one DATA frame:
   * a frame is cut across the chunks the application wrote, so a stream fed 64 KiB socket reads
   * sends full frames rather than a full frame and a short one per read (each its own
   * Noise message, WebSocket frame and socket write on the far side). Chunks taken whole leave the
   * queue, their write callbacks collected.
   */
  private takeData(state: StreamState, limit: number, callbacks: WriteCallback[]): [Uint8Array[], number] {
    const pieces: Uint8Array[] = [];
    let size = 0;
    for (let item = state.out.peek(); item?.kind === "data"; item = state.out.peek()) {
      const take = Math.min(item.chunk.byteLength - item.offset, limit - size);
      if (take > 0) {
        pieces.push(item.chunk.subarray(item.offset, item.offset + take));
        item.offset += take;
        size += take;
      }
      if (item.offset < item.chunk.byteLength) break;
      state.out.shift();
      if (item.callback) {
        state.unconfirmedBytes -= item.batchBytes;
        callbacks.push(item.callback);
      }
    }
    return [pieces, size];
  }

  private sendMessage(): void {
    const parts = this.message.take();
    if (parts.length === 0) return;
    this.messagesSent++;
    if (parts.length === 1) this.transport.send(parts[0]!);
    else if (this.transport.sendParts) this.transport.sendParts(parts);
    else this.transport.send(Buffer.concat(parts));
  }

  private queueUrgent(): void {
    if (this.urgent.length === 0) return;
    const frames = this.urgent;
    this.urgent = [];
    for (const bytes of frames) this.queueFrame(bytes);
  }

  private releaseResults(state: StreamState, all: boolean): void {
    while (state.pendingResults.length > 0) {
      const next = state.pendingResults[0]!;
      if (!all && next.target > state.enqueuedBytes) return;
      state.pendingResults.shift();
      state.out.push({ kind: "result", frame: next.frame });
    }
  }

  private sendable(state: StreamState): boolean {
    const head = state.out.peek();
    if (!head) return false;
    return head.kind !== "data" || head.offset >= head.chunk.byteLength || state.sendCredit > 0;
  }

  private makeReady(state: StreamState): void {
    if (state.scheduled || state.stream.destroyed || !this.sendable(state)) return;
    state.scheduled = true;
    this.ready.push(state);
    this.scheduleFlush();
  }

  private scheduleFlush(): void {
    if (this.flushImmediate || this.closed) return;
    if (this.waitingForDrain && this.urgent.length === 0) return;
    this.flushImmediate = setImmediate(this.flush);
  }

  /**
   * Urgent frames first, then one DATA/RESULT/END per stream per turn, round-robin, while the transport
   * has room; all of it packed into as few messages as fit (see `message`).
   */
  private readonly flush = (): void => {
    this.flushImmediate = undefined;
    if (this.closed) return;
    // Held tails go first this time, with whatever the last turn added behind them.
    if (this.heldTails.length > 0) {
      for (const state of this.heldTails) this.ready.push(state);
      this.heldTails = [];
    }
    this.queueUrgent();
    if (this.waitingForDrain) {
      this.sendMessage();
      return;
    }
    const callbacks: WriteCallback[] = [];
    while (this.ready.length > 0) {
      // The message being filled counts as buffered: it is already the transport's.
      if (this.transport.bufferedAmount + this.message.size > this.options.maxBufferedAmount) {
        this.sendMessage();
        this.waitForDrain();
        break;
      }
      const state = this.ready.shift()!;
      state.scheduled = false;
      const item = state.out.peek();
      if (!item || state.stream.destroyed) continue;
      if (item.kind === "data") {
        const remaining = item.chunk.byteLength - item.offset;
        if (remaining > 0) {
          if (state.sendCredit <= 0) continue; // a WINDOW for the stream makes it ready again
          if (this.tunnelSendCredit <= 0) {
            state.scheduled = true;
            this.tunnelBlocked.push(state);
            continue;
          }
          this.acceptImplicitly(state);
          const limit = Math.min(this.dataLimit, state.sendCredit, this.tunnelSendCredit);
          const [pieces, size] = this.takeData(state, limit, callbacks);
          this.queueData(state.id, pieces, size);
          state.sendCredit -= size;
          this.tunnelSendCredit -= size;
          this.queuedBytes -= size;
          state.queuedData -= size;
          const splice = state.splice;
          if (splice?.paused && state.queuedData < SPLICE_HIGH_WATER) {
            splice.paused = false;
            callbacks.push(splice.resume);
          }
          if (size === this.dataLimit && this.holdTail(state, callbacks)) continue;
        } else {
          state.out.shift();
          if (item.callback) {
            state.unconfirmedBytes -= item.batchBytes;
            callbacks.push(item.callback);
          }
        }
      } else if (item.kind === "result") {
        this.acceptImplicitly(state);
        state.out.shift();
        this.queueFrame(item.frame);
      } else {
        this.acceptImplicitly(state);
        state.out.shift();
        this.queueFrame(encodeFrame({ type: "end", stream: state.id }));
        state.endSent = true;
        callbacks.push(item.callback);
        this.maybeForget(state);
      }
      if (this.sendable(state)) {
        state.scheduled = true;
        this.ready.push(state);
      }
    }
    this.sendMessage();
    // Callbacks run application code (more writes, 'drain', 'finish'): only after the loop.
    for (const callback of callbacks) callback();
  };

  /**
   * After a full frame, the rest of a stream's last chunk (22 bytes of a 64 KiB socket read) waits
   * for the next flush instead of leaving now as a frame of its own: by then the next read is
   * usually queued behind it and they leave together as one full frame, so a bulk stream costs one
   * message per frame's worth of bytes. The chunk's write callback runs now, so the writer is not
   * held back; the next flush sends the tail whether or not more came.
   */
  private holdTail(state: StreamState, callbacks: WriteCallback[]): boolean {
    const item = state.out.peek();
    if (state.out.length !== 1 || item?.kind !== "data" || item.offset >= item.chunk.byteLength) return false;
    if (item.callback) {
      state.unconfirmedBytes -= item.batchBytes;
      callbacks.push(item.callback);
      item.callback = undefined;
    }
    state.scheduled = true;
    this.heldTails.push(state);
    this.scheduleFlush();
    return true;
  }

  /** A receiver that writes before calling accept() accepts the stream. */
  private acceptImplicitly(state: StreamState): void {
    if (state.local || state.accepted) return;
    state.accepted = true;
    this.queueFrame(encodeFrame({ type: "accept", stream: state.id }));
  }

  private waitForDrain(): void {
    if (this.waitingForDrain) return;
    this.waitingForDrain = true;
    this.transport.once("drain", this.onDrain);
    this.drainPoll = setTimeout(this.pollBuffered, BUFFERED_POLL_MS).unref();
  }

  private readonly onDrain = (): void => {
    if (!this.waitingForDrain) return;
    this.waitingForDrain = false;
    this.transport.off("drain", this.onDrain);
    clearTimeout(this.drainPoll);
    this.drainPoll = undefined;
    this.scheduleFlush();
  };

  private readonly pollBuffered = (): void => {
    if (this.transport.bufferedAmount <= this.options.maxBufferedAmount) this.onDrain();
    else this.drainPoll = setTimeout(this.pollBuffered, BUFFERED_POLL_MS).unref();
  };

  // ---- lifecycle ---------------------------------------------------------------------------------

  private maybeForget(state: StreamState): void {
    if (state.remoteEnded && state.endSent && this.streams.get(state.id) === state) {
      this.forget(state);
      // A Duplex closes itself once both sides ended; a spliced stream's Duplex saw neither.
      if (state.splice) state.stream.destroy();
    }
  }

  private forget(state: StreamState): void {
    this.streams.delete(state.id);
    if (!state.local) this.peerStreams--;
  }

  private sendPing(waiter: Pick<PendingPing, "resolve" | "reject"> | undefined): void {
    if (this.closed) return;
    const key = this.pingCounter++;
    const payload = Buffer.alloc(8);
    payload.writeBigUInt64BE(key);
    if (this.pings.size >= MAX_PENDING_PINGS) {
      // A peer that never answers: forget the oldest unanswered periodic ping.
      for (const [oldKey, old] of this.pings) {
        if (old.resolve) continue;
        this.pings.delete(oldKey);
        break;
      }
    }
    this.pings.set(key, { sentAt: performance.now(), resolve: waiter?.resolve, reject: waiter?.reject });
    this.sendFrame({ type: "ping", payload });
  }

  private armIdle(delayMs: number): void {
    this.idleTimer = setTimeout(this.checkIdle, delayMs).unref();
  }

  private readonly checkIdle = (): void => {
    const silentMs = Date.now() - this.lastReceivedAt;
    const limit = this.options.idleTimeoutMs;
    if (silentMs < limit) {
      this.armIdle(limit - silentMs);
      return;
    }
    const error = new MxtunnelError("TUNNEL_CLOSED", `no frame from the peer for ${silentMs} ms`);
    this.shutdown(error, { code: CLOSE_GOING_AWAY, reason: "peer silent" });
  };

  private readonly onTransportClose = (code: number, reason: string): void => {
    const normal = code === CLOSE_NORMAL;
    const detail = reason ? `${code}, ${reason}` : `${code}`;
    this.shutdown(normal ? undefined : new MxtunnelError("TUNNEL_CLOSED", `the tunnel closed (${detail})`));
  };

  private fail(error: ProtocolError): void {
    if (this.closed) return;
    this.mux.emit("protocolError", error);
    this.shutdown(error, { code: CLOSE_PROTOCOL_ERROR, reason: error.code });
  }

  private shutdown(error: Error | undefined, closeTransport?: { code: number; reason: string }): void {
    if (this.closed) return;
    // A RESET or CONTROL queued just before close() still reaches the peer ahead of the close.
    if (closeTransport && !this.transport.closed) {
      this.queueUrgent();
      this.sendMessage();
    }
    this.closed = true;
    clearInterval(this.pingTimer);
    clearTimeout(this.idleTimer);
    clearTimeout(this.drainPoll);
    if (this.flushImmediate) clearImmediate(this.flushImmediate);
    this.flushImmediate = undefined;
    this.transport.off("message", this.onMessage);
    this.transport.off("close", this.onTransportClose);
    this.transport.off("drain", this.onDrain);
    const pingError = error ?? new MxtunnelError("TUNNEL_CLOSED", "the tunnel closed before the PONG");
    for (const pending of this.pings.values()) pending.reject?.(pingError);
    this.pings.clear();
    for (const state of [...this.streams.values()]) state.stream.destroy();
    this.streams.clear();
    this.ready.drain();
    this.heldTails = [];
    this.urgent = [];
    this.message.take();
    this.tunnelBlocked = [];
    if (closeTransport) this.transport.close(closeTransport.code, closeTransport.reason);
    if (error) this.mux.emit("close", error);
    else this.mux.emit("close");
  }
}

/**
 * Multiplexed streams over one MessageTransport.
 * Events: "stream" (a MuxStream the peer opened; call accept() or reset()), "control" (message),
 * "protocolError" (ProtocolError, just before the tunnel closes), "close" (error?: why, unless the
 * tunnel was closed on purpose).
 */
export class Mux extends EventEmitter<MuxEvents> {
  readonly #engine: Engine;

  constructor(transport: MessageTransport, options: MuxOptions) {
    super();
    this.#engine = new Engine(this, transport, options);
  }

  /** Sends OPEN; the opener may write before ACCEPT arrives (within its initial credit). */
  open(kind: StreamKind, meta: Record<string, unknown>): MuxStream {
    return this.#engine.open(kind, meta);
  }

  sendControl(message: Record<string, unknown>): void {
    this.#engine.sendControl(message);
  }

  /** Resolves with the round-trip time in ms. */
  ping(): Promise<number> {
    return this.#engine.ping();
  }

  get lastRttMs(): number | undefined {
    return this.#engine.lastRttMs;
  }

  /** Epoch ms of the last frame received (any frame counts). */
  get lastReceivedAt(): number {
    return this.#engine.lastReceivedAt;
  }

  stats(): MuxStats {
    return this.#engine.stats();
  }

  /** Closes the transport and destroys every stream. */
  close(code: number = CLOSE_NORMAL, reason = ""): void {
    this.#engine.close(code, reason);
  }

  get closed(): boolean {
    return this.#engine.closed;
  }
}

/**
 * One stream of a Mux, as a binary Duplex. Extra events: "accept" (the peer accepted a stream we
 * opened), "result" (value), "reset" (code, reason). A RESET from the peer destroys the stream
 * without an "error" event; listen for "reset" or "close".
 */
export class MuxStream extends Duplex {
  readonly id: number;
  readonly kind: StreamKind;
  readonly meta: Record<string, unknown>;
  readonly initiatedLocally: boolean;
  readonly #engine: Engine;
  readonly #state: StreamState;

  /** @internal Streams come from Mux.open() and the Mux "stream" event. */
  constructor(internal: object) {
    super({ allowHalfOpen: true, decodeStrings: true });
    const { engine, state } = internal as StreamInit;
    this.#engine = engine;
    this.#state = state;
    this.id = state.id;
    this.kind = state.kind;
    this.meta = state.meta;
    this.initiatedLocally = state.local;
    this.on("end", () => engine.onConsumed(state));
  }

  /** Code of the RESET the peer sent, if it sent one. */
  get resetCode(): number | undefined {
    return this.#state.resetCode;
  }

  get resetReason(): string | undefined {
    return this.#state.resetReason;
  }

  /** Receiver side: sends ACCEPT. Writing before accept() accepts implicitly. */
  accept(): void {
    this.#engine.accept(this.#state);
  }

  /** Sends RESET and destroys the stream locally without an "error" event. */
  reset(code: number, reason: string): void {
    this.#engine.reset(this.#state, code, reason);
  }

  /**
   * Joins a socket to this stream both ways without Node's stream machinery (see splice.ts for the
   * semantics). False when the Duplex side has been used already; splice() then pipes instead.
   */
  spliceSocket(socket: net.Socket, onDone?: (error?: Error) => void): boolean {
    return this.#engine.splice(this.#state, socket, onDone);
  }

  /** Sends RESULT after the data already written; call it before end(). */
  sendResult(result: unknown): void {
    this.#engine.sendResult(this.#state, result);
  }

  override read(size?: number): ReturnType<Duplex["read"]> {
    const chunk = super.read(size);
    this.#engine.onConsumed(this.#state);
    return chunk;
  }

  override _read(): void {
    this.#engine.onRead(this.#state);
  }

  override _write(chunk: Uint8Array, _encoding: BufferEncoding, callback: WriteCallback): void {
    this.#engine.write(this.#state, [chunk], callback);
  }

  override _writev(chunks: { chunk: Uint8Array; encoding: BufferEncoding }[], callback: WriteCallback): void {
    this.#engine.write(
      this.#state,
      chunks.map((entry) => entry.chunk),
      callback,
    );
  }

  override _final(callback: WriteCallback): void {
    this.#engine.end(this.#state, callback);
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#engine.onDestroy(this.#state, error);
    callback(error);
  }
}
