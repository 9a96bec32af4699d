// A tiny authoritative DNS server on loopback UDP for tests: A, AAAA, MX, TXT and PTR records,
// NXDOMAIN for unknown names. Enough for SPF, DKIM, MX and doctor checks without the internet.
import dgram from "node:dgram";
import net from "node:net";

export interface TestZone {
  a?: string[];
  aaaa?: string[];
  mx?: { priority: number; exchange: string }[];
  txt?: string[];
  ptr?: string[];
}

const TYPES = { A: 1, PTR: 12, MX: 15, TXT: 16, AAAA: 28 } as const;

function readName(buffer: Buffer, offset: number): { name: string; end: number } {
  const labels: string[] = [];
  let i = offset;
  for (;;) {
    const length = buffer[i];
    if (length === undefined) throw new Error("truncated name");
    if (length === 0) return { name: labels.join(".").toLowerCase(), end: i + 1 };
    labels.push(buffer.subarray(i + 1, i + 1 + length).toString("latin1"));
    i += 1 + length;
  }
}

function encodeName(name: string): Buffer {
  const parts = name.replace(/\.$/, "").split(".").filter(Boolean);
  return Buffer.concat([
    ...parts.map((p) => Buffer.concat([Buffer.from([p.length]), Buffer.from(p, "latin1")])),
    Buffer.from([0]),
  ]);
}

function record(type: number, data: Buffer): Buffer {
  const head = Buffer.alloc(10);
  head.writeUInt16BE(0xc00c, 0); // pointer to the question's name
  head.writeUInt16BE(type, 2);
  head.writeUInt16BE(1, 4);
  head.writeUInt32BE(60, 6);
  return Buffer.concat([head.subarray(0, 10), Buffer.from([data.length >> 8, data.length & 0xff]), data]);
}

function answers(zone: TestZone, type: number): Buffer[] {
  const out: Buffer[] = [];
  if (type === TYPES.A)
    for (const ip of zone.a ?? []) out.push(record(type, Buffer.from(ip.split(".").map(Number))));
  if (type === TYPES.AAAA) {
    for (const ip of zone.aaaa ?? []) {
      const socket = new net.SocketAddress({ address: ip, family: "ipv6" });
      const full = expandIPv6(socket.address);
      out.push(
        record(
          type,
          Buffer.from(full.split(":").flatMap((h) => [parseInt(h, 16) >> 8, parseInt(h, 16) & 0xff])),
        ),
      );
    }
  }
  if (type === TYPES.MX) {
    for (const mx of zone.mx ?? []) {
      const pref = Buffer.alloc(2);
      pref.writeUInt16BE(mx.priority);
      out.push(record(type, Buffer.concat([pref, encodeName(mx.exchange)])));
    }
  }
  if (type === TYPES.TXT) {
    for (const text of zone.txt ?? []) {
      const bytes = Buffer.from(text, "utf8");
      const chunks: Buffer[] = [];
      for (let i = 0; i < bytes.length || i === 0; i += 255) {
        const part = bytes.subarray(i, i + 255);
        chunks.push(Buffer.from([part.length]), part);
      }
      out.push(record(type, Buffer.concat(chunks)));
    }
  }
  if (type === TYPES.PTR) for (const name of zone.ptr ?? []) out.push(record(type, encodeName(name)));
  return out;
}

function expandIPv6(address: string): string {
  const [head, tail] = address.split("::") as [string, string | undefined];
  const left = head ? head.split(":") : [];
  const right = tail ? tail.split(":") : [];
  const fill = Array(8 - left.length - right.length).fill("0");
  return [...left, ...(tail !== undefined ? fill : []), ...right].map((h) => h.padStart(4, "0")).join(":");
}

export interface TestDnsServer {
  /** "127.0.0.1:PORT", as edge config `dnsServers` takes it. */
  address: string;
  queries: string[];
  zones: Record<string, TestZone>;
  stop(): Promise<void>;
}

export async function startTestDns(zones: Record<string, TestZone>): Promise<TestDnsServer> {
  const socket = dgram.createSocket("udp4");
  const queries: string[] = [];
  const lowered: Record<string, TestZone> = {};
  for (const [name, zone] of Object.entries(zones)) lowered[name.toLowerCase().replace(/\.$/, "")] = zone;
  socket.on("message", (query, peer) => {
    try {
      const { name, end } = readName(query, 12);
      const type = query.readUInt16BE(end);
      queries.push(`${name} ${type}`);
      const zone = lowered[name];
      const found = zone ? answers(zone, type) : [];
      const header = Buffer.alloc(12);
      header.writeUInt16BE(query.readUInt16BE(0), 0);
      header.writeUInt16BE(0x8400 | (query.readUInt16BE(2) & 0x0100) | (zone ? 0 : 3), 2); // QR, AA, RD echoed, NXDOMAIN
      header.writeUInt16BE(1, 4);
      header.writeUInt16BE(found.length, 6);
      socket.send(Buffer.concat([header, query.subarray(12, end + 4), ...found]), peer.port, peer.address);
    } catch {
      // malformed query: ignore
    }
  });
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  return {
    address: `127.0.0.1:${socket.address().port}`,
    queries,
    zones: lowered,
    stop: () => new Promise<void>((resolve) => socket.close(() => resolve())),
  };
}
