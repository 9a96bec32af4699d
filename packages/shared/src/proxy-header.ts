// The HAProxy PROXY protocol header (v1 text, v2 binary; haproxy doc/proxy-protocol.txt) that home
// writes before the first byte of a forwarded connection so Postfix and Dovecot see the real client,
// plus the address rules around it: IPv4-mapped IPv6 goes out as TCP4, and private, loopback and
// link-local clients are recognised so home can refuse them.
import { BlockList, isIPv4, isIPv6 } from "node:net";
import { ProtocolError, ServiceError } from "./errors.js";

export type ProxyFamily = "TCP4" | "TCP6";

export interface ProxyAddresses {
  family: ProxyFamily;
  sourceAddress: string;
  sourcePort: number;
  destinationAddress: string;
  destinationPort: number;
}

export interface ParsedProxyHeader {
  /** null for a v2 LOCAL command, v1 UNKNOWN, or a v2 family other than TCP over IPv4/IPv6. */
  addresses: ProxyAddresses | null;
  /** Bytes the header occupies at the start of the buffer; the connection's data follows. */
  length: number;
}

export const PROXY_V2_SIGNATURE = Buffer.from([
  0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
]);
const V1_PREFIX = Buffer.from("PROXY ", "latin1");
/** The longest v1 line the spec allows, CRLF included. */
const V1_MAX_LENGTH = 107;

/**
 * Canonical form of a client's IP address and the PROXY family it travels as. IPv4-mapped IPv6
 * (`::ffff:203.0.113.9`, as a dual-stack listener reports IPv4 clients) becomes plain IPv4; IPv6 is
 * written in RFC 5952 form; a zone id (`%eth0`) is dropped because no PROXY header can carry it.
 * Anything that is not an IP address is refused.
 */
export function normaliseClientAddress(address: string): { address: string; family: ProxyFamily } {
  if (typeof address === "string") {
    if (isIPv4(address)) return { address, family: "TCP4" };
    const zone = address.indexOf("%");
    const bare = zone >= 0 && isIPv6(address) ? address.slice(0, zone) : address;
    const bytes = parseIPv6(bare);
    if (bytes) {
      if (isMappedIPv4(bytes)) return { address: bytes.subarray(12).join("."), family: "TCP4" };
      return { address: formatIPv6(bytes), family: "TCP6" };
    }
  }
  const shown = JSON.stringify(String(address).slice(0, 64));
  throw new ServiceError("CLIENT_ADDRESS_REFUSED", `The client address ${shown} is not an IP address.`);
}

/**
 * The header fields for a connection from `client` to `local` (the edge's listening address).
 * A header carries one family, and the client's is the one Postfix needs, so when the two ends
 * differ the local end is adapted: an IPv4 local address under an IPv6 client is written
 * IPv4-mapped (`::ffff:a.b.c.d`, nothing lost); an IPv6 local address under an IPv4 client cannot
 * be expressed and becomes `0.0.0.0`. Ports are kept.
 */
export function proxyAddresses(
  client: { address: string; port: number },
  local: { address: string; port: number },
): ProxyAddresses {
  const source = normaliseClientAddress(client.address);
  const destination = normaliseClientAddress(local.address);
  checkPort(client.port, "client");
  checkPort(local.port, "local");
  let destinationAddress = destination.address;
  if (source.family !== destination.family) {
    destinationAddress = source.family === "TCP4" ? "0.0.0.0" : `::ffff:${destination.address}`;
  }
  return {
    family: source.family,
    sourceAddress: source.address,
    sourcePort: client.port,
    destinationAddress,
    destinationPort: local.port,
  };
}

export function encodeProxyV1(a: ProxyAddresses): Buffer {
  const source = addressBytes(a.sourceAddress, a.family);
  const destination = addressBytes(a.destinationAddress, a.family);
  checkPort(a.sourcePort, "source");
  checkPort(a.destinationPort, "destination");
  const text = a.family === "TCP4" ? formatIPv4 : formatIPv6;
  return Buffer.from(
    `PROXY ${a.family} ${text(source)} ${text(destination)} ${a.sourcePort} ${a.destinationPort}\r\n`,
    "latin1",
  );
}

export function encodeProxyV2(a: ProxyAddresses): Buffer {
  const source = addressBytes(a.sourceAddress, a.family);
  const destination = addressBytes(a.destinationAddress, a.family);
  checkPort(a.sourcePort, "source");
  checkPort(a.destinationPort, "destination");
  const addressLength = source.length * 2 + 4;
  const header = Buffer.alloc(16 + addressLength);
  PROXY_V2_SIGNATURE.copy(header, 0);
  header[12] = 0x21; // version 2, command PROXY
  header[13] = a.family === "TCP4" ? 0x11 : 0x21; // AF_INET/AF_INET6 + STREAM
  header.writeUInt16BE(addressLength, 14);
  header.set(source, 16);
  header.set(destination, 16 + source.length);
  header.writeUInt16BE(a.sourcePort, 16 + source.length * 2);
  header.writeUInt16BE(a.destinationPort, 18 + source.length * 2);
  return header;
}

/**
 * Parses a v1 or v2 header at the start of `buffer`. Returns "incomplete" when the bytes so far are
 * a valid beginning of a header; throws a ProtocolError for anything else. TLVs after the v2
 * address block are skipped (counted in `length`).
 */
export function parseProxyHeader(buffer: Buffer): ParsedProxyHeader | "incomplete" {
  if (buffer.length === 0) return "incomplete";
  if (startsLike(buffer, PROXY_V2_SIGNATURE)) {
    return buffer.length < 16 ? "incomplete" : parseV2(buffer);
  }
  if (startsLike(buffer, V1_PREFIX)) {
    return buffer.length <= V1_PREFIX.length ? "incomplete" : parseV1(buffer);
  }
  throw malformed("the connection does not start with a PROXY header");
}

const privateRanges = new BlockList();
for (const [network, prefix] of [
  ["0.0.0.0", 8], // "this network", includes unspecified
  ["10.0.0.0", 8],
  ["100.64.0.0", 10], // carrier-grade NAT
  ["127.0.0.0", 8],
  ["169.254.0.0", 16],
  ["172.16.0.0", 12],
  ["192.168.0.0", 16],
] as const) {
  privateRanges.addSubnet(network, prefix, "ipv4");
}
for (const [network, prefix] of [
  ["::", 128], // unspecified
  ["::1", 128],
  ["fc00::", 7], // unique local
  ["fe80::", 10], // link-local
] as const) {
  privateRanges.addSubnet(network, prefix, "ipv6");
}

/**
 * Whether a client address is one a compromised edge could use to look like the LAN: loopback,
 * RFC 1918, CGNAT (100.64/10), link-local, unique-local, unspecified (0.0.0.0/8, ::), and the
 * IPv4-mapped forms of the IPv4 ones. Anything that is not an IP address counts as private too
 * (fail closed).
 */
export function isPrivateClientAddress(address: string): boolean {
  let normal: { address: string; family: ProxyFamily };
  try {
    normal = normaliseClientAddress(address);
  } catch {
    return true;
  }
  return privateRanges.check(normal.address, normal.family === "TCP4" ? "ipv4" : "ipv6");
}

function parseV2(buffer: Buffer): ParsedProxyHeader | "incomplete" {
  const versionCommand = buffer[12]!;
  if (versionCommand >> 4 !== 2) throw malformed(`v2 header has version ${versionCommand >> 4}, expected 2`);
  const command = versionCommand & 0x0f;
  if (command > 1) throw malformed(`v2 header has unknown command ${command}`);
  const familyByte = buffer[13]!;
  const length = 16 + buffer.readUInt16BE(14);
  if (buffer.length < length) return "incomplete";
  if (![0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32].includes(familyByte)) {
    throw malformed(`v2 header has unknown address family 0x${familyByte.toString(16).padStart(2, "0")}`);
  }
  if (command === 0 || (familyByte !== 0x11 && familyByte !== 0x21)) return { addresses: null, length };
  const size = familyByte === 0x11 ? 4 : 16;
  if (length - 16 < size * 2 + 4) throw malformed("v2 header is too short for its address family");
  const text = size === 4 ? formatIPv4 : formatIPv6;
  const at = 16 + size * 2;
  return {
    addresses: {
      family: size === 4 ? "TCP4" : "TCP6",
      sourceAddress: text(buffer.subarray(16, 16 + size)),
      destinationAddress: text(buffer.subarray(16 + size, at)),
      sourcePort: buffer.readUInt16BE(at),
      destinationPort: buffer.readUInt16BE(at + 2),
    },
    length,
  };
}

function parseV1(buffer: Buffer): ParsedProxyHeader | "incomplete" {
  const window = buffer.subarray(0, V1_MAX_LENGTH);
  const newline = window.indexOf(0x0a);
  if (newline < 0) {
    if (buffer.length >= V1_MAX_LENGTH) throw malformed(`v1 header is longer than ${V1_MAX_LENGTH} bytes`);
    return "incomplete";
  }
  if (window[newline - 1] !== 0x0d) throw malformed("v1 header does not end with CRLF");
  const line = window.subarray(0, newline - 1).toString("latin1");
  const length = newline + 1;
  const parts = line.split(" ");
  if (parts[1] === "UNKNOWN") return { addresses: null, length };
  if (parts[1] !== "TCP4" && parts[1] !== "TCP6") throw malformed("v1 header has an unknown protocol");
  if (parts.length !== 6) throw malformed("v1 header does not have 6 fields");
  const family = parts[1];
  const valid = family === "TCP4" ? isIPv4 : (text: string) => isIPv6(text) && !text.includes("%");
  const [, , source = "", destination = "", sourcePort = "", destinationPort = ""] = parts;
  if (!valid(source) || !valid(destination))
    throw malformed(`v1 header has an address that is not ${family}`);
  const canonical = (text: string) => (family === "TCP4" ? text : formatIPv6(parseIPv6(text)!));
  return {
    addresses: {
      family,
      sourceAddress: canonical(source),
      destinationAddress: canonical(destination),
      sourcePort: parseV1Port(sourcePort),
      destinationPort: parseV1Port(destinationPort),
    },
    length,
  };
}

function parseV1Port(text: string): number {
  if (!/^(0|[1-9][0-9]{0,4})$/.test(text) || Number(text) > 65535)
    throw malformed("v1 header has a bad port");
  return Number(text);
}

function malformed(detail: string): ProtocolError {
  return new ProtocolError("PROXY_HEADER_MALFORMED", `Malformed PROXY protocol header: ${detail}.`);
}

function startsLike(buffer: Buffer, prefix: Buffer): boolean {
  const n = Math.min(buffer.length, prefix.length);
  return n > 0 && buffer.subarray(0, n).equals(prefix.subarray(0, n));
}

function checkPort(port: number, what: string): void {
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new ServiceError("CLIENT_ADDRESS_REFUSED", `The ${what} port ${String(port)} is not in 0..65535.`);
  }
}

/** The 4 or 16 bytes of an address that must belong to `family` (IPv4-mapped text counts as IPv6). */
function addressBytes(address: string, family: ProxyFamily): Uint8Array {
  if (family === "TCP4") {
    if (isIPv4(address)) return Uint8Array.from(address.split(".").map(Number));
  } else {
    const bytes = isIPv6(address) && !address.includes("%") ? parseIPv6(address) : undefined;
    if (bytes) return bytes;
  }
  throw new RangeError(`${JSON.stringify(address.slice(0, 64))} is not a ${family} address`);
}

function formatIPv4(bytes: Uint8Array): string {
  return Array.from(bytes).join(".");
}

function isMappedIPv4(bytes: Uint8Array): boolean {
  return bytes.subarray(0, 10).every((b) => b === 0) && bytes[10] === 0xff && bytes[11] === 0xff;
}

/** 16 bytes of a valid IPv6 address (without zone), or undefined. */
function parseIPv6(text: string): Uint8Array | undefined {
  if (!isIPv6(text) || text.includes("%")) return undefined;
  const groups: number[] = [];
  const pushGroups = (part: string): number[] => {
    if (part === "") return [];
    const out: number[] = [];
    for (const piece of part.split(":")) {
      if (piece.includes(".")) {
        const [a = 0, b = 0, c = 0, d = 0] = piece.split(".").map(Number);
        out.push((a << 8) | b, (c << 8) | d);
      } else {
        out.push(Number.parseInt(piece, 16));
      }
    }
    return out;
  };
  const gap = text.indexOf("::");
  if (gap >= 0) {
    const head = pushGroups(text.slice(0, gap));
    const tail = pushGroups(text.slice(gap + 2));
    groups.push(...head, ...new Array<number>(8 - head.length - tail.length).fill(0), ...tail);
  } else {
    groups.push(...pushGroups(text));
  }
  if (groups.length !== 8) return undefined;
  const bytes = new Uint8Array(16);
  groups.forEach((group, i) => {
    bytes[i * 2] = group >> 8;
    bytes[i * 2 + 1] = group & 0xff;
  });
  return bytes;
}

/** RFC 5952 text: lower case, no leading zeros, the longest run of two or more zero groups as "::". */
function formatIPv6(bytes: Uint8Array): string {
  if (isMappedIPv4(bytes)) return `::ffff:${formatIPv4(bytes.subarray(12))}`;
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((bytes[i]! << 8) | bytes[i + 1]!);
  let bestStart = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; ) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLength) {
      bestStart = i;
      bestLength = j - i;
    }
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (bestStart < 0) return hex.join(":");
  return `${hex.slice(0, bestStart).join(":")}::${hex.slice(bestStart + bestLength).join(":")}`;
}
