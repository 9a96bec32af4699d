// Serves `forward` streams from the edge: the edge only ever names a service; home connects to
// the target it lists for that name, writes the PROXY header carrying the real client address,
// accepts, and splices. Nothing else on the LAN can be reached through it.
import net from "node:net";
import {
  encodeProxyV1,
  encodeProxyV2,
  type HostPort,
  isPrivateClientAddress,
  type Logger,
  type MuxStream,
  proxyAddresses,
  ResetCode,
  splice,
} from "@mxtunnel/shared";

export type ProxyProtocol = "v2" | "v1" | "off";

export interface ServiceTarget {
  target: HostPort;
  proxyProtocol: ProxyProtocol;
}

export interface ServiceConnectorOptions {
  services: ReadonlyMap<string, ServiceTarget>;
  allowPrivateClientIPs: boolean;
  logger: Logger;
  connectTimeoutMs?: number;
}

interface ForwardMeta {
  service: string;
  session: string;
  client: { address: string; port: number };
  local: { address: string; port: number };
}

export class ServiceConnector {
  readonly counters = { accepted: 0, refusedService: 0, refusedAddress: 0, connectFailed: 0 };

  constructor(private readonly options: ServiceConnectorOptions) {}

  handle(stream: MuxStream): void {
    const { logger } = this.options;
    const meta = parseMeta(stream.meta);
    if (!meta) {
      logger.warn({ stream: stream.id }, "forward stream with malformed metadata refused");
      stream.reset(ResetCode.REFUSED, "malformed forward metadata");
      return;
    }
    // The name comes from the edge (up to 8 KiB of metadata): bounded before it reaches a log line.
    // Made only when there is something to log: a pino child per stream (bindings serialized and
    // redacted) cost more than the stream's own mux work.
    const log = () => logger.child({ session: meta.session, service: meta.service.slice(0, 64) });
    // A Map, never an object lookup: "__proto__" or "constructor" must not resolve to anything.
    const service = this.options.services.get(meta.service);
    if (!service) {
      // Refused before any socket exists: home opens no connection for a service it does not list.
      this.counters.refusedService++;
      log().warn("the edge asked for a service this home does not list; refused");
      stream.reset(ResetCode.REFUSED, `unknown service ${meta.service.slice(0, 64)}`);
      return;
    }
    let proxyHeader: Buffer | undefined;
    try {
      if (!this.options.allowPrivateClientIPs && isPrivateClientAddress(meta.client.address)) {
        this.counters.refusedAddress++;
        log().warn(
          { client: meta.client.address },
          "client address is private or loopback; refused (set allowPrivateClientIPs for tests)",
        );
        stream.reset(ResetCode.ADDRESS_REFUSED, "private client address");
        return;
      }
      const addresses = proxyAddresses(meta.client, meta.local);
      if (service.proxyProtocol === "v2") proxyHeader = encodeProxyV2(addresses);
      else if (service.proxyProtocol === "v1") proxyHeader = encodeProxyV1(addresses);
    } catch {
      this.counters.refusedAddress++;
      log().warn({ client: meta.client.address }, "client address is malformed; refused");
      stream.reset(ResetCode.ADDRESS_REFUSED, "malformed client address");
      return;
    }

    const socket = net.connect({ host: service.target.host, port: service.target.port, allowHalfOpen: true });
    socket.setNoDelay(true);
    const timer = setTimeout(
      () => socket.destroy(new Error("connect timeout")),
      this.options.connectTimeoutMs ?? 5000,
    );
    const abandon = () => socket.destroy();
    stream.once("close", abandon);
    const onConnectError = (error: Error) => {
      clearTimeout(timer);
      if (stream.destroyed) return;
      this.counters.connectFailed++;
      log().warn(
        { target: `${service.target.host}:${service.target.port}`, err: error.message },
        "cannot reach the service",
      );
      stream.reset(ResetCode.CONNECT_FAILED, `service ${meta.service} unreachable`);
    };
    socket.once("error", onConnectError);
    socket.once("connect", () => {
      clearTimeout(timer);
      stream.off("close", abandon);
      // From here on an error is the session's (splice tears both sides down), not a failed connect.
      socket.off("error", onConnectError);
      if (stream.destroyed) {
        socket.destroy();
        return;
      }
      if (proxyHeader) socket.write(proxyHeader);
      this.counters.accepted++;
      stream.accept();
      if (logger.isLevelEnabled("debug")) log().debug({ client: meta.client.address }, "forward accepted");
      splice(socket, stream);
    });
  }
}

function parseMeta(meta: Record<string, unknown>): ForwardMeta | undefined {
  const client = meta.client as Record<string, unknown> | undefined;
  const local = meta.local as Record<string, unknown> | undefined;
  if (typeof meta.service !== "string" || !client || !local) return undefined;
  if (typeof client.address !== "string" || typeof client.port !== "number") return undefined;
  if (typeof local.address !== "string" || typeof local.port !== "number") return undefined;
  return {
    service: meta.service,
    session: typeof meta.session === "string" ? meta.session.slice(0, 32) : "-",
    client: { address: client.address, port: client.port },
    local: { address: local.address, port: local.port },
  };
}
