// A tiny authoritative DNS server on UDP loopback for tests (extends packages/edge/test/dns-server.ts
// with TXT and PTR): answers MX, A, AAAA, TXT and PTR from a table the test may change while it runs,
// NXDOMAIN for names it does not know, NOERROR with no answer for known names without that type.
import dgram from "node:dgram";
import type { AddressInfo } from "node:net";

export interface Zone {
  mx?: { priority: number; exchange: string }[];
  a?: string[];
  aaaa?: string[];
  /** Each record is one string (split into 255-byte character-strings on the wire) . */
  txt?: string[];
  ptr?: string[];
}

const TYPE = { A: 1, PTR: 12, MX: 15, TXT: 16, AAAA: 28 } as const;

function encodeName(name: string): Buffer {
  const labels = name.replace(/\.$/, "").split(".").filter(Boolean);
  return Buffer.concat([
    ...labels.map((l) => Buffer.concat([Buffer.from([l.length]), Buffer.from(l, "ascii")])),
    Buffer.from([0]),
  ]);
}

function readName(buffer: Buffer, offset: number): { name: string; end: number } {
  const labels: string[] = [];
  let at = offset;
  for (;;) {
    const length = buffer[at]!;
    if (length === 0) return { name: labels.join(".").toLowerCase(), end: at + 1 };
    labels.push(buffer.subarray(at + 1, at + 1 + length).toString("ascii"));
    at += 1 + length;
  }
}

function ipv6Bytes(address: string): Buffer {
  const [head, tail] = address.split("::") as [string, string | undefined];
  const h = head ? head.split(":") : [];
  const t = tail ? tail.split(":") : [];
  const groups = [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
  const out = Buffer.alloc(16);
  groups.forEach((g, i) => {
    out.writeUInt16BE(Number.parseInt(g || "0", 16), i * 2);
  });
  return out;
}

function txtBytes(text: string): Buffer {
  const bytes = Buffer.from(text, "utf8");
  const parts: Buffer[] = [];
  for (let i = 0; i < bytes.length || i === 0; i += 255) {
    const piece = bytes.subarray(i, i + 255);
    parts.push(Buffer.from([piece.length]), piece);
    if (bytes.length === 0) break;
  }
  return Buffer.concat(parts);
}

/** The reverse-lookup name of an IPv4 address: 10.2.0.192.in-addr.arpa. */
export function reverseName(ipv4: string): string {
  return `${ipv4.split(".").reverse().join(".")}.in-addr.arpa`;
}

export interface TestDnsServer {
  /** "127.0.0.1:PORT", as config `dnsServers` takes it. */
  address: string;
  zones: Record<string, Zone>;
  queries: string[];
  stop(): Promise<void>;
}

export async function startDnsServer(zones: Record<string, Zone>): Promise<TestDnsServer> {
  const socket = dgram.createSocket("udp4");
  const queries: string[] = [];
  const server: TestDnsServer = {
    address: "",
    zones,
    queries,
    stop: () => new Promise<void>((resolve) => socket.close(() => resolve())),
  };
  socket.on("message", (query, peer) => {
    const { name, end } = readName(query, 12);
    const qtype = query.readUInt16BE(end);
    queries.push(`${name}/${qtype}`);
    const zone = server.zones[name];
    const answers: Buffer[] = [];
    const rr = (type: number, rdata: Buffer) => {
      const head = Buffer.alloc(12);
      head.writeUInt16BE(0xc00c, 0);
      head.writeUInt16BE(type, 2);
      head.writeUInt16BE(1, 4);
      head.writeUInt32BE(60, 6);
      head.writeUInt16BE(rdata.length, 10);
      answers.push(Buffer.concat([head, rdata]));
    };
    if (zone && qtype === TYPE.MX) {
      for (const mx of zone.mx ?? []) {
        const pref = Buffer.alloc(2);
        pref.writeUInt16BE(mx.priority);
        rr(TYPE.MX, Buffer.concat([pref, encodeName(mx.exchange)]));
      }
    }
    if (zone && qtype === TYPE.A)
      for (const a of zone.a ?? []) rr(TYPE.A, Buffer.from(a.split(".").map(Number)));
    if (zone && qtype === TYPE.AAAA) for (const a of zone.aaaa ?? []) rr(TYPE.AAAA, ipv6Bytes(a));
    if (zone && qtype === TYPE.TXT) for (const t of zone.txt ?? []) rr(TYPE.TXT, txtBytes(t));
    if (zone && qtype === TYPE.PTR) for (const p of zone.ptr ?? []) rr(TYPE.PTR, encodeName(p));
    const header = Buffer.alloc(12);
    header.writeUInt16BE(query.readUInt16BE(0), 0);
    header.writeUInt16BE(zone ? 0x8580 : 0x8583, 2); // response, authoritative, RD, RA; NXDOMAIN when unknown
    header.writeUInt16BE(1, 4);
    header.writeUInt16BE(answers.length, 6);
    socket.send(Buffer.concat([header, query.subarray(12, end + 4), ...answers]), peer.port, peer.address);
  });
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", resolve));
  const { port } = socket.address() as AddressInfo;
  server.address = `127.0.0.1:${port}`;
  return server;
}
