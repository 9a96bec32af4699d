// Free loopback TCP ports. The kernel picks them (bind to port 0); this process never hands out the
// same port twice, and a port for a dual-stack listener is free on 127.0.0.1 and on [::1] alike.
// Another process may still take a port between this check and its use: callers retry on EADDRINUSE.
import net from "node:net";
import os from "node:os";

const handedOut = new Set<number>();

function tryListen(host: string, port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.unref();
    server.once("error", () => resolve(undefined));
    server.listen({ host, port, exclusive: true }, () => {
      const address = server.address();
      const bound = typeof address === "object" && address !== null ? address.port : undefined;
      server.close(() => resolve(bound));
    });
  });
}

/** True when the machine has an IPv6 loopback address (`::1` on an interface). */
export function hasIPv6Loopback(): boolean {
  return Object.values(os.networkInterfaces()).some((addresses) =>
    (addresses ?? []).some((a) => a.family === "IPv6" && a.address === "::1"),
  );
}

export async function freePort(options: { ipv6?: boolean } = {}): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = await tryListen("127.0.0.1", 0);
    if (port === undefined || handedOut.has(port)) continue;
    if (options.ipv6 && (await tryListen("::1", port)) === undefined) continue;
    handedOut.add(port);
    return port;
  }
  throw new Error("no free loopback port found after 50 attempts");
}

export async function freePorts(count: number, options: { ipv6?: boolean } = {}): Promise<number[]> {
  const ports: number[] = [];
  for (let i = 0; i < count; i++) ports.push(await freePort(options));
  return ports;
}
