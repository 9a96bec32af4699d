// The edge's tunnel endpoint: accepts WebSocket upgrades from homes on /tunnel (Noise IK) and
// /pair (Noise IKpsk2), keeps handshake floods cheap, and owns the registry of live tunnels.
import { EventEmitter } from "node:events";
import http from "node:http";
import type { AddressInfo } from "node:net";
import type { Duplex } from "node:stream";
import {
  AGENT_VERSION,
  asHandshakeError,
  CloseCode,
  decodeKey,
  encodeKey,
  HandshakeError,
  type HostPort,
  KeyedRateLimiter,
  keyFingerprint,
  type Logger,
  Mux,
  type MuxOptions,
  offeredVersions,
  PAIR_PATH,
  PAIR_PROLOGUE,
  PROTOCOL_VERSION,
  respondHandshake,
  type SecureChannel,
  SUBPROTOCOL,
  SUPPORTED_HEADER,
  TokenBucket,
  TUNNEL_PATH,
  TUNNEL_PROLOGUE,
  versionMismatchMessage,
  WebSocketTransport,
  WS_MAX_PAYLOAD,
} from "@mxtunnel/shared";
import { type WebSocket, WebSocketServer } from "ws";
import type { EdgeState, HomeRecord } from "./state.js";

export interface TunnelLimits {
  handshakesPerIpPerSecond: number;
  handshakeBurst: number;
  /** Across all sources: what one small VPS core can afford to spend on handshakes. */
  handshakesPerSecond: number;
  maxPendingHandshakes: number;
  authTimeoutMs: number;
}

export interface TunnelServerOptions {
  state: EdgeState;
  listen: HostPort;
  hostname: string;
  limits: TunnelLimits;
  logger: Logger;
  mux?: Partial<Omit<MuxOptions, "role">>;
}

export interface Tunnel {
  readonly home: HomeRecord;
  readonly mux: Mux;
  readonly connectedAt: number;
  readonly remoteAddress: string;
  readonly peerVersion: string;
}

export interface TunnelServerEvents {
  up: [tunnel: Tunnel];
  down: [tunnel: Tunnel, reason: string];
}

export class TunnelServer extends EventEmitter<TunnelServerEvents> {
  private readonly http = http.createServer((_req, res) => {
    res.writeHead(404, { "content-type": "text/plain" }).end("mxtunnel edge: nothing here\n");
  });
  private readonly wss = new WebSocketServer({
    noServer: true,
    maxPayload: WS_MAX_PAYLOAD,
    perMessageDeflate: false,
    handleProtocols: () => SUBPROTOCOL,
    // `sockets` below tracks them; ws's own set would be a second add/delete per connection.
    clientTracking: false,
  });
  private readonly perIp: KeyedRateLimiter;
  private readonly global: TokenBucket;
  private pending = 0;
  /**
   * Sockets not yet authenticated → their deadline. The auth timeout is the same for all, so the
   * map is in deadline order and one timer, armed for the oldest, serves them all (instead of a
   * timer per handshake).
   */
  private readonly deadlines = new Map<WebSocketTransport, { at: number; release: () => void }>();
  private deadlineTimer: NodeJS.Timeout | undefined;
  private readonly tunnels = new Map<string, Tunnel>();
  private readonly sockets = new Set<WebSocket>();
  readonly counters = { handshakesRefused: 0, handshakesFailed: 0, rateLimited: 0, tunnelsOpened: 0 };
  private lastRefusalLoggedAt = 0;
  private refusalsNotLogged = 0;

  constructor(private readonly options: TunnelServerOptions) {
    super();
    const { limits } = options;
    this.perIp = new KeyedRateLimiter(limits.handshakesPerIpPerSecond, limits.handshakeBurst);
    this.global = new TokenBucket(limits.handshakesPerSecond, limits.handshakesPerSecond);
    this.http.on("upgrade", (req, socket, head) => this.onUpgrade(req, socket, head));
    this.http.on("clientError", (_error, socket) => socket.destroy());
  }

  async start(): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.http.once("error", reject);
      this.http.listen(this.options.listen.port, this.options.listen.host, () => {
        this.http.off("error", reject);
        resolve();
      });
    });
    return this.http.address() as AddressInfo;
  }

  get pendingHandshakes(): number {
    return this.pending;
  }

  /** The live tunnel of a home, if any. */
  tunnelOf(homePublicKey: string): Tunnel | undefined {
    return this.tunnels.get(homePublicKey);
  }

  liveTunnels(): Tunnel[] {
    return [...this.tunnels.values()];
  }

  disconnect(homePublicKey: string, code: number, reason: string): void {
    const tunnel = this.tunnels.get(homePublicKey);
    if (tunnel) tunnel.mux.close(code, reason);
  }

  async stop(): Promise<void> {
    clearTimeout(this.deadlineTimer);
    this.deadlineTimer = undefined;
    for (const tunnel of this.tunnels.values()) tunnel.mux.close(CloseCode.SHUTDOWN, "edge shutting down");
    for (const ws of this.sockets) ws.close(CloseCode.SHUTDOWN, "edge shutting down");
    const closed = new Promise<void>((resolve) => this.http.close(() => resolve()));
    // Sockets that ignore the closing handshake are cut after a short grace.
    const grace = setTimeout(() => {
      for (const ws of this.sockets) ws.terminate();
      this.http.closeAllConnections();
    }, 1000);
    await closed;
    clearTimeout(grace);
  }

  private onUpgrade(req: http.IncomingMessage, socket: Duplex, head: Buffer): void {
    const ip = req.socket.remoteAddress ?? "unknown";
    const path = (req.url ?? "").split("?")[0];
    if (path !== TUNNEL_PATH && path !== PAIR_PATH) {
      refuse(socket, 404, "Not Found", "no such endpoint");
      return;
    }
    if (!this.perIp.take(ip) || !this.global.take()) {
      this.counters.rateLimited++;
      refuse(socket, 429, "Too Many Requests", "handshake rate limit; retry later");
      return;
    }
    if (this.pending >= this.options.limits.maxPendingHandshakes) {
      this.counters.rateLimited++;
      refuse(socket, 503, "Service Unavailable", "too many handshakes in progress; retry later");
      return;
    }
    const versions = offeredVersions(req.headers["sec-websocket-protocol"]);
    if (!versions.includes(PROTOCOL_VERSION)) {
      this.counters.handshakesRefused++;
      const sentence = versionMismatchMessage(
        { role: "edge", version: PROTOCOL_VERSION },
        { role: "home", versions },
      );
      this.options.logger.warn({ ip, offered: versions }, sentence);
      refuse(socket, 426, "Upgrade Required", sentence, { [SUPPORTED_HEADER]: SUBPROTOCOL });
      return;
    }
    this.pending++;
    this.wss.handleUpgrade(req, socket, head, (ws) => {
      this.sockets.add(ws);
      ws.once("close", () => this.sockets.delete(ws));
      const transport = new WebSocketTransport(ws);
      const done = path === PAIR_PATH ? this.acceptPairing(transport, ip) : this.acceptTunnel(transport, ip);
      void done;
    });
  }

  /** Counts a socket as pending until it authenticates or closes; closes it at the deadline. */
  private guard(transport: WebSocketTransport): () => void {
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      this.pending--;
      this.deadlines.delete(transport);
    };
    this.deadlines.set(transport, { at: Date.now() + this.options.limits.authTimeoutMs, release });
    this.armDeadlineTimer();
    transport.once("close", release);
    return release;
  }

  private armDeadlineTimer(): void {
    if (this.deadlineTimer !== undefined) return;
    const first = this.deadlines.values().next();
    if (first.done) return;
    this.deadlineTimer = setTimeout(this.closeOverdue, Math.max(0, first.value.at - Date.now()));
    this.deadlineTimer.unref();
  }

  private readonly closeOverdue = (): void => {
    this.deadlineTimer = undefined;
    const now = Date.now();
    for (const [transport, { at, release }] of this.deadlines) {
      if (at > now) break;
      transport.close(CloseCode.AUTH_TIMEOUT, "authentication deadline passed");
      release();
    }
    this.armDeadlineTimer();
  };

  private async acceptTunnel(transport: WebSocketTransport, ip: string): Promise<void> {
    const release = this.guard(transport);
    const { state } = this.options;
    try {
      await respondHandshake(
        transport,
        {
          pattern: "IK",
          prologue: TUNNEL_PROLOGUE,
          staticKeyPair: state.keyPair,
          // No timer of its own: guard() closes the socket at the auth deadline.
          onRemoteStatic: (remoteStatic) => {
            if (!state.findHome(remoteStatic)) {
              throw new HandshakeError(
                "UNKNOWN_PEER",
                `home key ${keyFingerprint(remoteStatic)} is not paired with this edge`,
              );
            }
          },
          onPayload: () => ({
            reply: { version: AGENT_VERSION, protocol: PROTOCOL_VERSION, hostname: this.options.hostname },
          }),
        },
        (channel, payload, remoteStatic) =>
          this.establish(channel, transport, payload, remoteStatic, ip, release),
      );
    } catch (error) {
      release();
      const failure = asHandshakeError(error);
      this.counters.handshakesFailed++;
      const code = failure.code === "UNKNOWN_PEER" ? CloseCode.UNKNOWN_PEER : CloseCode.HANDSHAKE_FAILED;
      this.logRefusal({ ip, code: failure.code }, `tunnel handshake refused: ${failure.message}`);
      transport.close(
        code,
        failure.code === "UNKNOWN_PEER" ? "unknown home key: pair it first" : "handshake failed",
      );
    }
  }

  private establish(
    channel: SecureChannel,
    transport: WebSocketTransport,
    payload: Record<string, unknown>,
    remoteStatic: Uint8Array,
    ip: string,
    release: () => void,
  ): void {
    const home = this.options.state.findHome(remoteStatic);
    if (!home) return;
    const peerVersion = typeof payload.version === "string" ? payload.version : "unknown";
    // Message 1 can be replayed by anyone who saw it; only a transport message proves the peer
    // holds the keys. So the tunnel (its Mux, timers and WINDOW grant) is built only then: a
    // replayed or abandoned handshake costs the edge no more than the handshake itself. The Mux
    // attaches its listener here and is handed this first message; the tunnel is live before the
    // first frame is handled.
    channel.once("message", (first) => {
      release();
      const mux = new Mux(channel, { role: "edge", ...this.options.mux });
      const tunnel: Tunnel = { home, mux, connectedAt: Date.now(), remoteAddress: ip, peerVersion };
      const older = this.tunnels.get(home.publicKey);
      this.tunnels.set(home.publicKey, tunnel);
      this.counters.tunnelsOpened++;
      if (older) older.mux.close(CloseCode.REPLACED, "replaced by a newer tunnel from the same home");
      this.options.logger.info(
        { home: home.name, fingerprint: home.fingerprint, ip, peerVersion },
        "tunnel up",
      );
      mux.once("close", (error?: Error) => {
        const reason = error?.message ?? "closed";
        if (this.tunnels.get(home.publicKey) === tunnel) this.tunnels.delete(home.publicKey);
        this.options.logger.info({ home: home.name, reason }, "tunnel down");
        this.emit("down", tunnel, reason);
      });
      this.emit("up", tunnel);
      if (!mux.closed) channel.emit("message", first);
    });
    void transport;
  }

  private async acceptPairing(transport: WebSocketTransport, ip: string): Promise<void> {
    const release = this.guard(transport);
    const { state } = this.options;
    let tokenIdText = "";
    try {
      const channel = await respondHandshake(
        transport,
        {
          pattern: "IKpsk2",
          prologue: PAIR_PROLOGUE,
          staticKeyPair: state.keyPair,
          onRemoteStatic: () => {},
          onPayload: (remoteStatic, payload) => {
            tokenIdText = typeof payload.tokenId === "string" ? payload.tokenId : "";
            const { record, psk } = state.tokenForPairing(tokenIdText, remoteStatic);
            return {
              reply: { version: AGENT_VERSION, hostname: this.options.hostname, domains: record.domains },
              psk,
            };
          },
        },
        (secure, _payload, remoteStatic) => ({ secure, remoteStatic }),
      );
      const { secure, remoteStatic } = channel;
      // The first transport message (ENROL) proves home derived the PSK: only now is the token burned.
      secure.once("message", (message) => {
        void this.enrol(secure, message, tokenIdText, remoteStatic, ip).finally(release);
      });
    } catch (error) {
      release();
      const failure = asHandshakeError(error);
      this.counters.handshakesFailed++;
      this.logRefusal({ ip, code: failure.code }, `pairing refused: ${failure.message}`);
      transport.close(CloseCode.TOKEN_REFUSED, `${failure.code}: ${failure.message}`.slice(0, 120));
    }
  }

  /**
   * At most one refused handshake per second reaches the log, with a count of those left out: a flood
   * of bad handshakes must not become a flood of log lines (counters has them all).
   */
  private logRefusal(fields: Record<string, unknown>, message: string): void {
    const now = Date.now();
    if (now - this.lastRefusalLoggedAt < 1000) {
      this.refusalsNotLogged++;
      return;
    }
    const notLogged = this.refusalsNotLogged;
    this.lastRefusalLoggedAt = now;
    this.refusalsNotLogged = 0;
    this.options.logger.warn(notLogged > 0 ? { ...fields, notLogged } : fields, message);
  }

  private async enrol(
    channel: SecureChannel,
    message: Uint8Array,
    tokenIdText: string,
    homeKey: Uint8Array,
    ip: string,
  ): Promise<void> {
    const { state, logger } = this.options;
    try {
      const request = JSON.parse(new TextDecoder().decode(message)) as {
        type?: unknown;
        spoolPublicKey?: unknown;
        name?: unknown;
      };
      if (request.type !== "enrol" || typeof request.spoolPublicKey !== "string") {
        throw new HandshakeError("HANDSHAKE_FAILED", "expected an ENROL message");
      }
      const home = await state.enrol({
        tokenId: tokenIdText,
        homeKey,
        spoolPublicKey: decodeKey(request.spoolPublicKey, "spool public key"),
        name: typeof request.name === "string" ? request.name : "home",
      });
      logger.info(
        { home: home.name, fingerprint: home.fingerprint, ip, domains: home.domains },
        "home paired",
      );
      channel.send(
        new TextEncoder().encode(
          JSON.stringify({
            type: "enrolled",
            home: { name: home.name, fingerprint: home.fingerprint, domains: home.domains },
            edge: {
              hostname: this.options.hostname,
              fingerprint: state.fingerprint,
              publicKey: encodeKey(state.keyPair.publicKey),
            },
          }),
        ),
      );
      channel.close(1000, "paired");
    } catch (error) {
      const failure = asHandshakeError(error);
      logger.warn({ ip, code: failure.code }, `enrolment refused: ${failure.message}`);
      channel.send(
        new TextEncoder().encode(
          JSON.stringify({ type: "error", code: failure.code, message: failure.message }),
        ),
      );
      channel.close(CloseCode.TOKEN_REFUSED, failure.code);
    }
  }
}

function refuse(
  socket: Duplex,
  status: number,
  text: string,
  body: string,
  headers: Record<string, string> = {},
): void {
  // After 'upgrade' the HTTP server no longer listens for the socket's errors: a client that resets
  // while the refusal is written would otherwise raise an uncaught ECONNRESET and stop the edge.
  socket.on("error", () => socket.destroy());
  const extra = Object.entries(headers)
    .map(([name, value]) => `${name}: ${value}\r\n`)
    .join("");
  socket.end(
    `HTTP/1.1 ${status} ${text}\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: ${Buffer.byteLength(body) + 1}\r\n${extra}\r\n${body}\n`,
  );
}
