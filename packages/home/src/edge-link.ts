// One home–edge tunnel, kept up forever: dial, Noise IK, run the Mux, and on any failure wait
// (exponential backoff with jitter, capped) and dial again. Never gives up on a failed login.
import { EventEmitter } from "node:events";
import {
  AGENT_VERSION,
  Backoff,
  CloseCode,
  decodeKey,
  HandshakeError,
  initiateHandshake,
  isMxtunnelError,
  type KeyPair,
  type Logger,
  Mux,
  type MuxOptions,
  type MuxStream,
  PROTOCOL_VERSION,
  TUNNEL_PATH,
  TUNNEL_PROLOGUE,
} from "@mxtunnel/shared";
import { connectToEdge } from "./connect.js";
import type { EdgeRecord } from "./state.js";

export interface EdgeLinkOptions {
  edge: EdgeRecord;
  keyPair: KeyPair;
  logger: Logger;
  reconnect: { minDelayMs: number; maxDelayMs: number };
  connectTimeoutMs?: number;
  mux?: Partial<Omit<MuxOptions, "role">>;
  onStream: (stream: MuxStream, link: EdgeLink) => void;
  onControl?: (message: Record<string, unknown>, link: EdgeLink) => void;
}

export interface EdgeLinkStatus {
  url: string;
  hostname: string;
  fingerprint: string;
  domains: string[];
  connected: boolean;
  connectedSince: string | null;
  rttMs: number | null;
  peerVersion: string | null;
  attempts: number;
  lastError: string | null;
}

export interface EdgeLinkEvents {
  up: [mux: Mux];
  down: [reason: string];
}

export class EdgeLink extends EventEmitter<EdgeLinkEvents> {
  private mux: Mux | undefined;
  private connectedSince: number | undefined;
  private peerVersion: string | undefined;
  private lastError: string | undefined;
  private attempts = 0;
  private stopped = false;
  private readonly abort = new AbortController();
  private loop: Promise<void> | undefined;
  private readonly backoff: Backoff;

  constructor(private readonly options: EdgeLinkOptions) {
    super();
    this.backoff = new Backoff({ minMs: options.reconnect.minDelayMs, maxMs: options.reconnect.maxDelayMs });
  }

  get edge(): EdgeRecord {
    return this.options.edge;
  }

  get currentMux(): Mux | undefined {
    return this.mux;
  }

  start(): void {
    this.loop ??= this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    this.mux?.close(CloseCode.SHUTDOWN, "home shutting down");
    await this.loop;
  }

  status(): EdgeLinkStatus {
    const { edge } = this.options;
    return {
      url: edge.url,
      hostname: edge.hostname,
      fingerprint: edge.fingerprint,
      domains: edge.domains,
      connected: this.mux !== undefined && !this.mux.closed,
      connectedSince: this.connectedSince ? new Date(this.connectedSince).toISOString() : null,
      rttMs: this.mux?.lastRttMs ?? null,
      peerVersion: this.peerVersion ?? null,
      attempts: this.attempts,
      lastError: this.lastError ?? null,
    };
  }

  private async run(): Promise<void> {
    const { logger } = this.options;
    while (!this.stopped) {
      this.attempts++;
      try {
        const mux = await this.connect();
        this.mux = mux;
        this.connectedSince = Date.now();
        this.lastError = undefined;
        logger.info({ edge: this.edge.hostname, attempts: this.attempts }, "tunnel up");
        this.emit("up", mux);
        const reason = await new Promise<string>((resolve) =>
          mux.once("close", (error?: Error) => resolve(error?.message ?? "closed")),
        );
        const lived = Date.now() - this.connectedSince;
        this.mux = undefined;
        this.connectedSince = undefined;
        this.emit("down", reason);
        if (this.stopped) break;
        logger.warn({ edge: this.edge.hostname, reason }, "tunnel down; reconnecting");
        // A tunnel that held for a while earns a fast first retry; a flapping one keeps backing off.
        if (lived > this.options.reconnect.maxDelayMs) this.backoff.reset();
        this.attempts = 0;
      } catch (error) {
        const message = error instanceof Error ? error.message : String(error);
        // Say each distinct failure once, not every attempt: a wrong version or a revoked key
        // must read as one clear line, not a loop of handshake failures.
        if (message !== this.lastError) {
          const level =
            isMxtunnelError(error) && (error.code === "VERSION_MISMATCH" || error.code === "UNKNOWN_PEER")
              ? "error"
              : "warn";
          logger[level](
            { edge: this.edge.hostname, code: isMxtunnelError(error) ? error.code : undefined },
            message,
          );
        }
        this.lastError = message;
      }
      if (this.stopped) break;
      await this.wait(this.backoff.next());
    }
  }

  private async connect(): Promise<Mux> {
    const { edge, keyPair } = this.options;
    const timeoutMs = this.options.connectTimeoutMs ?? 10_000;
    const transport = await connectToEdge(edge.url, TUNNEL_PATH, timeoutMs);
    if (this.stopped) {
      transport.close(CloseCode.SHUTDOWN, "home shutting down");
      throw new HandshakeError("HANDSHAKE_FAILED", "stopped");
    }
    return initiateHandshake(
      transport,
      {
        pattern: "IK",
        prologue: TUNNEL_PROLOGUE,
        staticKeyPair: keyPair,
        remoteStaticPublicKey: decodeKey(edge.publicKey, "edge key"),
        payload: { version: AGENT_VERSION, protocol: PROTOCOL_VERSION },
        timeoutMs,
        describeClose: (code, reason) =>
          code === CloseCode.UNKNOWN_PEER
            ? new HandshakeError(
                "UNKNOWN_PEER",
                `the edge ${edge.hostname} does not know this home's key (unpaired?): pair again with a new token`,
              )
            : new HandshakeError(
                "HANDSHAKE_FAILED",
                `the edge closed the connection during the handshake (${code} ${reason})`,
              ),
      },
      (channel, payload) => {
        this.peerVersion = typeof payload.version === "string" ? payload.version : "unknown";
        const mux = new Mux(channel, { role: "home", ...this.options.mux });
        mux.on("stream", (stream: MuxStream) => this.options.onStream(stream, this));
        mux.on("control", (message: Record<string, unknown>) => this.options.onControl?.(message, this));
        // The first transport message is what authenticates us to the edge and makes the tunnel live.
        mux.sendControl({ type: "hello", version: AGENT_VERSION });
        return mux;
      },
    );
  }

  private wait(ms: number): Promise<void> {
    return new Promise((resolve) => {
      if (this.abort.signal.aborted) return resolve();
      const timer = setTimeout(done, ms);
      function done() {
        resolve();
      }
      this.abort.signal.addEventListener(
        "abort",
        () => {
          clearTimeout(timer);
          resolve();
        },
        { once: true },
      );
    });
  }
}
