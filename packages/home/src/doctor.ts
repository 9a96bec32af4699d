// `mxtunnel-home doctor`: live checks from the home box — each edge's tunnel and RTT and clock (from
// the running agent), each service reachable with its PROXY setting right (a probe session), and the
// Postfix lines `postfix-config` checks (relayhost, the tunnel-facing smtpd) through postconf.
import net from "node:net";
import {
  doctorCheck as check,
  connectedPeerChecks,
  type DoctorCheck,
  encodeProxyV1,
  encodeProxyV2,
  formatHostPort,
  type HomeConfig,
  type HostPort,
  type ProxyProtocolMode,
  proxyAddresses,
} from "@mxtunnel/shared";
import type { PostfixAdvice } from "./postfix-config.js";

/** What the running agent reports for `doctor` (admin command "probe"). */
export interface HomeProbe {
  version: string;
  edges: {
    hostname: string;
    fingerprint: string;
    connected: boolean;
    rttMs: number | null;
    clockSkewMs: number | null;
    peerVersion: string | null;
    downSince: string | null;
    lastError: string | null;
  }[];
}

/** Services whose server speaks first, and how its greeting begins. */
const GREETINGS: Record<string, RegExp> = {
  smtp: /^220[ -]/,
  submission: /^220[ -]/,
  imap: /^\* (OK|PREAUTH)/i,
  pop3: /^\+OK/,
  sieve: /^"IMPLEMENTATION"|^OK/i,
  managesieve: /^"IMPLEMENTATION"|^OK/i,
};

/** The client address probe sessions carry in their PROXY header (TEST-NET-1: never a real client). */
export const PROBE_CLIENT = { address: "192.0.2.1", port: 40000 };

export async function homeDoctor(input: {
  config: HomeConfig;
  probe: HomeProbe | null;
  postfix: PostfixAdvice | null;
  timeoutMs?: number;
  /** How long a server that expects a PROXY header is given to (wrongly) greet first. */
  quietMs?: number;
}): Promise<DoctorCheck[]> {
  const timeoutMs = input.timeoutMs ?? 5000;
  const services = await Promise.all(
    Object.entries(input.config.services).map(([name, service]) =>
      probeService(name, service.target, service.proxyProtocol, { timeoutMs, quietMs: input.quietMs ?? 700 }),
    ),
  );
  return [...tunnelChecks(input.probe), ...services, ...postfixChecks(input.postfix)];
}

function tunnelChecks(probe: HomeProbe | null): DoctorCheck[] {
  if (!probe)
    return [
      check(
        "fail",
        "agent",
        "the home agent is not running: no tunnels",
        "start it: `systemctl start mxtunnel-home` (or `mxtunnel-home run --dir …`)",
      ),
    ];
  const out = [check("pass", "agent", `the home agent is running (${probe.version})`)];
  if (probe.edges.length === 0)
    out.push(
      check(
        "fail",
        "tunnel",
        "no edge is paired",
        "`mxtunnel-home pair - --dir …` with a token from `mxtunnel-edge pair`",
      ),
    );
  for (const edge of probe.edges) {
    if (!edge.connected) {
      out.push(
        check(
          "fail",
          "tunnel",
          `${edge.hostname}: no tunnel${edge.downSince ? ` since ${edge.downSince}` : ""}${edge.lastError ? ` (${edge.lastError})` : ""}`,
          "check that the edge runs (`mxtunnel-edge status` there) and that this box reaches its tunnel port",
        ),
      );
      continue;
    }
    out.push(...connectedPeerChecks(edge.hostname, edge, "edge", "edge"));
  }
  return out;
}

function postfixChecks(advice: PostfixAdvice | null): DoctorCheck[] {
  if (!advice?.checked) return [check("skip", "postfix", "postconf not found: Postfix settings not checked")];
  return advice.checks.map((c) => check(c.level, "postfix", c.message, ...(c.fix ? [c.fix] : [])));
}

/**
 * A probe session like the edge's: connect, see whether the server greets before any PROXY header
 * (then it does not expect one), otherwise send a header for a TEST-NET client and read the greeting.
 */
export function probeService(
  name: string,
  target: HostPort,
  proxyProtocol: ProxyProtocolMode,
  options: { timeoutMs: number; quietMs: number },
): Promise<DoctorCheck> {
  const where = `${name} (${formatHostPort(target)}, PROXY ${proxyProtocol})`;
  const greeting = GREETINGS[name];
  return new Promise((resolve) => {
    const socket = net.connect({ host: target.host, port: target.port });
    let received = "";
    let headerSent = false;
    let finished = false;
    const timers: NodeJS.Timeout[] = [];
    const done = (result: DoctorCheck) => {
      if (finished) return;
      finished = true;
      for (const t of timers) clearTimeout(t);
      socket.removeAllListeners("data");
      socket.on("error", () => {});
      if (!socket.destroyed && greeting && (name === "smtp" || name === "submission")) socket.end("QUIT\r\n");
      else socket.end();
      setTimeout(() => socket.destroy(), 1000).unref();
      resolve(result);
    };
    const sendHeader = () => {
      headerSent = true;
      const local = { address: socket.localAddress ?? "127.0.0.1", port: socket.localPort ?? 0 };
      const remote = { address: target.host, port: target.port };
      // The destination is the service's own address, as the edge's header would name the edge's.
      const addresses = proxyAddresses(PROBE_CLIENT, net.isIP(remote.address) ? remote : local);
      socket.write(proxyProtocol === "v2" ? encodeProxyV2(addresses) : encodeProxyV1(addresses));
      timers.push(
        setTimeout(
          () =>
            done(
              check(
                "fail",
                "service",
                `${where}: no greeting within ${options.timeoutMs} ms after the PROXY header`,
                `check that the service expects PROXY ${proxyProtocol} (Postfix: smtpd_upstream_proxy_protocol=haproxy on that port)`,
              ),
            ),
          options.timeoutMs,
        ),
      );
    };
    socket.setEncoding("latin1");
    socket.once("connect", () => {
      clearTimeout(connectTimer);
      if (!greeting) {
        done(
          check(
            "pass",
            "service",
            `${where}: reachable (the client speaks first: PROXY setting not checked)`,
          ),
        );
        return;
      }
      // A server waiting for a PROXY header says nothing; one that greets at once does not expect one.
      timers.push(
        setTimeout(() => {
          if (proxyProtocol === "off")
            done(
              check(
                "fail",
                "service",
                `${where}: connected, but no greeting within ${options.quietMs} ms: it seems to wait for a PROXY header`,
                `set proxyProtocol to "v2" for ${name} in home.json (or turn PROXY off on the service)`,
              ),
            );
          else sendHeader();
        }, options.quietMs),
      );
    });
    socket.on("data", (chunk: string) => {
      received += chunk;
      if (!received.includes("\n")) return;
      const line = received.split("\r\n")[0]!.slice(0, 80);
      if (!headerSent && proxyProtocol !== "off") {
        done(
          check(
            "fail",
            "service",
            `${where}: greets before any PROXY header ("${line}"): it is not set up for PROXY, so it would read the header as a command`,
            name === "smtp"
              ? "run `mxtunnel-home postfix-config` and add its master.cf line (smtpd_upstream_proxy_protocol=haproxy) for this port"
              : `enable the PROXY protocol on the service, or set proxyProtocol "off" for ${name} (it then sees every client as this machine)`,
          ),
        );
      } else if (greeting?.test(line)) {
        done(
          check(
            "pass",
            "service",
            `${where}: ${headerSent ? `accepts the PROXY ${proxyProtocol} header and greets` : "greets"}: ${line}`,
          ),
        );
      } else {
        done(
          check(
            "fail",
            "service",
            `${where}: unexpected greeting "${line}"`,
            `check that ${formatHostPort(target)} is the ${name} service`,
          ),
        );
      }
    });
    socket.on("error", (error: NodeJS.ErrnoException) =>
      done(
        check(
          "fail",
          "service",
          `${where}: cannot connect (${error.code ?? error.message})`,
          name === "smtp"
            ? "start Postfix and check postfix.inject (see `mxtunnel-home postfix-config`)"
            : `start ${name} or fix its target in home.json`,
        ),
      ),
    );
    socket.on("close", () =>
      done(
        check(
          "fail",
          "service",
          `${where}: closed the connection ${headerSent ? `after the PROXY ${proxyProtocol} header` : "before greeting"}`,
          headerSent
            ? `the service may expect another PROXY version, or none: check proxyProtocol for ${name}`
            : `check the ${name} service's logs`,
        ),
      ),
    );
    const connectTimer = setTimeout(
      () => done(check("fail", "service", `${where}: cannot connect within ${options.timeoutMs} ms`)),
      options.timeoutMs,
    );
    timers.push(connectTimer);
  });
}
