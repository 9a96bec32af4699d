// A public listener whose connections are forwarded through the tunnel to a named home service
// (port 25 → "smtp", 993 → "imaps", …). It reads nothing from the client until home has accepted;
// when no stable tunnel is there, or home does not accept in time, the `fallback` decides.
import net from "node:net";
import { type HostPort, type Logger, type MuxStream, ResetCode, splice } from "@mxtunnel/shared";
import type { Tunnel, TunnelServer } from "./tunnel-server.js";

export interface ForwardLimits {
  maxConnections: number;
  maxConnectionsPerIp: number;
  idleTimeoutMs: number;
  sessionTimeoutMs: number;
}

export type FallbackReason = "no-tunnel" | "unstable" | "open-timeout" | "refused" | "tunnel-lost";

export interface ForwardListenerOptions {
  listen: HostPort;
  service: string;
  tunnels: TunnelServer;
  limits: ForwardLimits;
  openTimeoutMs: number;
  /** A tunnel must have been up this long before it takes live sessions (flapping lines). */
  stableAfterMs: number;
  logger: Logger;
  /** What a client gets when the live path is not available; it owns the socket from then on. */
  fallback: (socket: net.Socket, reason: FallbackReason) => void;
  /** Answer for a client refused by a connection limit (e.g. an SMTP 421 line). */
  overLimitReply?: string;
}

let sessionCounter = 0;

export class ForwardListener {
  private readonly server: net.Server;
  private readonly perIp = new Map<string, number>();
  private readonly sockets = new Set<net.Socket>();
  readonly counters = { accepted: 0, spliced: 0, fallbacks: 0, overLimit: 0 };

  constructor(private readonly options: ForwardListenerOptions) {
    this.server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (socket) =>
      this.onConnection(socket),
    );
    this.server.maxConnections = options.limits.maxConnections + 64; // hard OS-level stop above the polite 421
  }

  async start(): Promise<net.AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(this.options.listen.port, this.options.listen.host, () => {
        this.server.off("error", reject);
        resolve();
      });
    });
    return this.server.address() as net.AddressInfo;
  }

  get liveSessions(): number {
    return this.sockets.size;
  }

  async stop(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const socket of this.sockets) socket.destroy();
    await closed;
  }

  private onConnection(socket: net.Socket): void {
    const { limits, logger } = this.options;
    const ip = socket.remoteAddress ?? "unknown";
    socket.on("error", () => {});
    const perIp = this.perIp.get(ip) ?? 0;
    if (this.sockets.size >= limits.maxConnections || perIp >= limits.maxConnectionsPerIp) {
      this.counters.overLimit++;
      logger.warn(
        { ip, service: this.options.service, perIp, total: this.sockets.size },
        "connection over limit refused",
      );
      socket.end(this.options.overLimitReply ?? "");
      socket.resume();
      return;
    }
    this.counters.accepted++;
    this.sockets.add(socket);
    this.perIp.set(ip, perIp + 1);
    // Session cap (RFC 5321 wants ≥ 30 min in total and ≥ 10 min idle after the final dot).
    const sessionTimer = setTimeout(() => socket.destroy(), limits.sessionTimeoutMs);
    sessionTimer.unref();
    socket.setTimeout(limits.idleTimeoutMs, () => socket.destroy());
    socket.once("close", () => {
      clearTimeout(sessionTimer);
      this.sockets.delete(socket);
      const left = (this.perIp.get(ip) ?? 1) - 1;
      if (left <= 0) this.perIp.delete(ip);
      else this.perIp.set(ip, left);
    });

    const tunnel = this.pickTunnel();
    if (!tunnel.ok) {
      this.fallBack(socket, tunnel.reason);
      return;
    }
    this.open(socket, tunnel.tunnel);
  }

  private pickTunnel(): { ok: true; tunnel: Tunnel } | { ok: false; reason: FallbackReason } {
    const live = this.options.tunnels.liveTunnels().filter((t) => !t.mux.closed);
    if (live.length === 0) return { ok: false, reason: "no-tunnel" };
    const now = Date.now();
    const stable = live.filter((t) => now - t.connectedAt >= this.options.stableAfterMs);
    if (stable.length === 0) return { ok: false, reason: "unstable" };
    // Least loaded first: several homes on one edge are rare, but a choice must be made.
    stable.sort((a, b) => a.mux.stats().openStreams - b.mux.stats().openStreams);
    return { ok: true, tunnel: stable[0]! };
  }

  private open(socket: net.Socket, tunnel: Tunnel): void {
    const session = `s${(++sessionCounter).toString(36)}`;
    // A child logger per session costs more than the session's own mux work (pino serializes and
    // redacts the bindings): made only when there is something to log.
    const log = () => this.options.logger.child({ session, service: this.options.service });
    let stream: MuxStream;
    try {
      stream = tunnel.mux.open("forward", {
        service: this.options.service,
        session,
        client: { address: socket.remoteAddress, port: socket.remotePort },
        local: { address: socket.localAddress, port: socket.localPort },
      });
    } catch (error) {
      log().warn({ err: error }, "could not open a stream");
      this.fallBack(socket, "tunnel-lost");
      return;
    }
    let settled = false;
    const settle = (accepted: boolean, reason: FallbackReason) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      stream.off("reset", onReset);
      stream.off("close", onClose);
      if (!accepted) {
        if (!stream.destroyed) stream.reset(ResetCode.TIMEOUT, reason);
        log().info({ reason }, "live path unavailable");
        this.fallBack(socket, reason);
        return;
      }
      this.counters.spliced++;
      if (this.options.logger.isLevelEnabled("debug"))
        log().debug({ client: socket.remoteAddress }, "spliced");
      splice(socket, stream);
      socket.resume();
    };
    const timer = setTimeout(() => settle(false, "open-timeout"), this.options.openTimeoutMs);
    const onReset = () => settle(false, "refused");
    const onClose = () => settle(false, "tunnel-lost");
    stream.once("accept", () => settle(true, "refused"));
    stream.once("reset", onReset);
    stream.once("close", onClose);
    socket.once("close", () => {
      if (!settled) {
        settled = true;
        clearTimeout(timer);
        stream.destroy();
      }
    });
  }

  private fallBack(socket: net.Socket, reason: FallbackReason): void {
    this.counters.fallbacks++;
    this.options.fallback(socket, reason);
  }
}

/**
 * The line a forwarded service's client gets before the edge closes the connection, in that
 * protocol's own words, for protocols where the server speaks first in plain text (so a mail client
 * shows a reason instead of a bare disconnect). Empty for everything else, TLS-from-the-first-byte
 * ports (imaps, submissions, pop3s) above all: those connections are just closed.
 */
export function goodbyeLine(service: string, hostname: string, why: string, smtpCode = "421 4.3.2"): string {
  switch (service) {
    case "smtp":
    case "submission":
      return `${smtpCode} ${hostname} ${why}, try again later\r\n`;
    case "imap":
      return `* BYE ${why}\r\n`;
    case "pop3":
      return `-ERR ${why}\r\n`;
    case "sieve":
    case "managesieve":
      return `BYE "${why}"\r\n`;
    default:
      return "";
  }
}

/** The fallback of a forwarded service (never spooled): a goodbye where the protocol has one, then close. */
export function forwardTryLater(service: string, hostname: string) {
  return (socket: net.Socket, reason: FallbackReason): void => {
    const why =
      reason === "no-tunnel" || reason === "tunnel-lost"
        ? "mail server unreachable"
        : "mail server not ready";
    const line = goodbyeLine(service, hostname, why);
    if (!line) {
      socket.destroy();
      return;
    }
    socket.end(line);
    socket.resume();
  };
}

/** What a forwarded service's client refused by a connection limit gets (see goodbyeLine). */
export function forwardOverLimitReply(service: string, hostname: string): string {
  return goodbyeLine(service, hostname, "too many connections", "421 4.7.0");
}
