import { describe, expect, it } from "vitest";
import { ProtocolError, ServiceError } from "../src/errors.js";
import {
  encodeProxyV1,
  encodeProxyV2,
  isPrivateClientAddress,
  normaliseClientAddress,
  type ProxyAddresses,
  parseProxyHeader,
  proxyAddresses,
} from "../src/proxy-header.js";

const SIG = "0d0a0d0a000d0a515549540a";
const tcp4: ProxyAddresses = {
  family: "TCP4",
  sourceAddress: "203.0.113.9",
  sourcePort: 51234,
  destinationAddress: "192.0.2.1",
  destinationPort: 25,
};
const tcp6: ProxyAddresses = {
  family: "TCP6",
  sourceAddress: "2001:db8::9",
  sourcePort: 51234,
  destinationAddress: "2001:db8::1",
  destinationPort: 993,
};
const TCP4_V2 = `${SIG}2111000c` + "cb007109" + "c0000201" + "c822" + "0019";
const TCP6_V2 =
  `${SIG}21210024` +
  "20010db8000000000000000000000009" +
  "20010db8000000000000000000000001" +
  "c822" +
  "03e1";

describe("PROXY v2", () => {
  it("encodes TCP4 byte for byte", () => {
    expect(encodeProxyV2(tcp4).toString("hex")).toBe(TCP4_V2);
  });

  it("encodes TCP6 byte for byte", () => {
    expect(encodeProxyV2(tcp6).toString("hex")).toBe(TCP6_V2);
  });

  it("parses its own output and reports the header length", () => {
    for (const a of [tcp4, tcp6]) {
      const header = encodeProxyV2(a);
      const withData = Buffer.concat([header, Buffer.from("EHLO x\r\n")]);
      expect(parseProxyHeader(withData)).toEqual({ addresses: a, length: header.length });
    }
  });

  it("skips TLVs and treats LOCAL and UNSPEC as no addresses", () => {
    const withTlv = Buffer.from(
      `${SIG}21110013cb007109c0000201c8220019` + "04000401020304" /* type 4 len 4 */,
      "hex",
    );
    expect(parseProxyHeader(withTlv)).toEqual({ addresses: tcp4, length: 16 + 19 });
    expect(parseProxyHeader(Buffer.from(`${SIG}20000000`, "hex"))).toEqual({ addresses: null, length: 16 });
    expect(parseProxyHeader(Buffer.from(`${SIG}21000000`, "hex"))).toEqual({ addresses: null, length: 16 });
    // LOCAL with an address block still skips it
    expect(parseProxyHeader(Buffer.from(TCP4_V2.replace(`${SIG}21`, `${SIG}20`), "hex"))).toEqual({
      addresses: null,
      length: 28,
    });
  });

  it("says incomplete for every proper prefix", () => {
    const full = Buffer.from(TCP6_V2, "hex");
    for (let n = 0; n < full.length; n++) expect(parseProxyHeader(full.subarray(0, n))).toBe("incomplete");
  });

  it("throws on malformed headers", () => {
    const bad = [
      `${SIG}1111000c`, // version 1 in a v2 signature
      `${SIG}2211000c`, // command 2
      `${SIG}21410000`, // family 4
      `${SIG}21110004cb007109`, // too short for TCP4
      "0d0a0d0a000d0a51554954ff",
      "474554202f20485454502f312e310d0a", // GET / HTTP/1.1
    ];
    for (const hex of bad) {
      expect(() => parseProxyHeader(Buffer.from(hex, "hex")), hex).toThrow(ProtocolError);
    }
  });
});

describe("PROXY v1", () => {
  it("encodes the text form", () => {
    expect(encodeProxyV1(tcp4).toString()).toBe("PROXY TCP4 203.0.113.9 192.0.2.1 51234 25\r\n");
    expect(encodeProxyV1(tcp6).toString()).toBe("PROXY TCP6 2001:db8::9 2001:db8::1 51234 993\r\n");
  });

  it("round-trips and canonicalises IPv6 text", () => {
    for (const a of [tcp4, tcp6]) {
      const header = encodeProxyV1(a);
      expect(parseProxyHeader(Buffer.concat([header, Buffer.from("a")]))).toEqual({
        addresses: a,
        length: header.length,
      });
    }
    const loose = Buffer.from("PROXY TCP6 2001:DB8:0:0:0:0:0:9 2001:db8::0001 1 2\r\n");
    expect(parseProxyHeader(loose)).toEqual({
      addresses: { ...tcp6, sourcePort: 1, destinationPort: 2 },
      length: loose.length,
    });
  });

  it("accepts UNKNOWN", () => {
    expect(parseProxyHeader(Buffer.from("PROXY UNKNOWN\r\nEHLO"))).toEqual({ addresses: null, length: 15 });
    const long = Buffer.from("PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n");
    expect(parseProxyHeader(long)).toEqual({ addresses: null, length: long.length });
  });

  it("says incomplete for every proper prefix", () => {
    const full = encodeProxyV1(tcp6);
    for (let n = 0; n < full.length; n++) expect(parseProxyHeader(full.subarray(0, n))).toBe("incomplete");
  });

  it("throws on malformed lines", () => {
    const bad = [
      "PROXY TCP4 203.0.113.9 192.0.2.1 51234 25\n",
      "PROXY TCP4 203.0.113.9 192.0.2.1 51234\r\n",
      "PROXY TCP4 2001:db8::9 192.0.2.1 51234 25\r\n",
      "PROXY TCP6 203.0.113.9 2001:db8::1 51234 25\r\n",
      "PROXY TCP4 203.0.113.9 192.0.2.1 65536 25\r\n",
      "PROXY TCP4 203.0.113.9 192.0.2.1 025 25\r\n",
      "PROXY TCP4 203.0.113.9  192.0.2.1 1 25\r\n",
      "PROXY UDP4 203.0.113.9 192.0.2.1 1 25\r\n",
      `PROXY UNKNOWN ${"x".repeat(120)}`,
      "proxy TCP4 203.0.113.9 192.0.2.1 1 25\r\n",
      "EHLO example.com\r\n",
    ];
    for (const text of bad) expect(() => parseProxyHeader(Buffer.from(text)), text).toThrow(ProtocolError);
  });
});

describe("client addresses", () => {
  it("maps IPv4-mapped IPv6 back to TCP4 and canonicalises IPv6", () => {
    expect(normaliseClientAddress("::ffff:203.0.113.9")).toEqual({ address: "203.0.113.9", family: "TCP4" });
    expect(normaliseClientAddress("::FFFF:cb00:7109")).toEqual({ address: "203.0.113.9", family: "TCP4" });
    expect(normaliseClientAddress("203.0.113.9")).toEqual({ address: "203.0.113.9", family: "TCP4" });
    expect(normaliseClientAddress("2001:0DB8:0000:0000:0000:0000:0000:0009")).toEqual({
      address: "2001:db8::9",
      family: "TCP6",
    });
    expect(normaliseClientAddress("2001:db8:0:0:1:0:0:1").address).toBe("2001:db8::1:0:0:1");
    expect(normaliseClientAddress("2001:db8:0:1:1:1:1:1").address).toBe("2001:db8:0:1:1:1:1:1");
    expect(normaliseClientAddress("fe80::1%eth0")).toEqual({ address: "fe80::1", family: "TCP6" });
    expect(normaliseClientAddress("::")).toEqual({ address: "::", family: "TCP6" });
  });

  it("refuses garbage", () => {
    for (const bad of ["", "localhost", "1.2.3", "01.2.3.4", "::g", "1.2.3.4:25", " 1.2.3.4", "[::1]"]) {
      expect(() => normaliseClientAddress(bad), bad).toThrow(ServiceError);
    }
    expect(() => normaliseClientAddress("nonsense")).toThrow(
      expect.objectContaining({ code: "CLIENT_ADDRESS_REFUSED" }),
    );
  });

  it("builds header fields from a connection's two ends", () => {
    expect(
      proxyAddresses(
        { address: "::ffff:203.0.113.9", port: 51234 },
        { address: "::ffff:192.0.2.1", port: 25 },
      ),
    ).toEqual(tcp4);
    expect(
      proxyAddresses({ address: "2001:db8::9", port: 51234 }, { address: "2001:db8::1", port: 993 }),
    ).toEqual(tcp6);
    // IPv4 client reaching an IPv6 local address: the local end cannot be expressed
    expect(
      proxyAddresses({ address: "203.0.113.9", port: 51234 }, { address: "2001:db8::1", port: 25 }),
    ).toEqual({
      ...tcp4,
      destinationAddress: "0.0.0.0",
    });
    // IPv6 client, IPv4 local: written IPv4-mapped
    const mixed = proxyAddresses(
      { address: "2001:db8::9", port: 51234 },
      { address: "192.0.2.1", port: 993 },
    );
    expect(mixed).toEqual({ ...tcp6, destinationAddress: "::ffff:192.0.2.1" });
    expect(encodeProxyV2(mixed).subarray(32, 48).toString("hex")).toBe("00000000000000000000ffffc0000201");
    expect(encodeProxyV1(mixed).toString()).toBe("PROXY TCP6 2001:db8::9 ::ffff:192.0.2.1 51234 993\r\n");
    expect(() =>
      proxyAddresses({ address: "203.0.113.9", port: 70000 }, { address: "192.0.2.1", port: 25 }),
    ).toThrow(ServiceError);
  });

  it("refuses to encode an address of the wrong family", () => {
    expect(() => encodeProxyV2({ ...tcp4, sourceAddress: "2001:db8::9" })).toThrow(RangeError);
    expect(() => encodeProxyV1({ ...tcp6, destinationAddress: "192.0.2.1" })).toThrow(RangeError);
  });

  it.each([
    ["127.0.0.1", true],
    ["127.255.255.254", true],
    ["10.1.2.3", true],
    ["172.16.0.1", true],
    ["172.31.255.255", true],
    ["172.32.0.1", false],
    ["172.15.255.255", false],
    ["192.168.1.1", true],
    ["192.169.1.1", false],
    ["169.254.10.10", true],
    ["100.64.0.1", true],
    ["100.127.255.255", true],
    ["100.128.0.1", false],
    ["0.0.0.0", true],
    ["0.1.2.3", true],
    ["8.8.8.8", false],
    ["203.0.113.9", false],
    ["::1", true],
    ["::", true],
    ["fe80::1", true],
    ["febf::1", true],
    ["fec0::1", false],
    ["fc00::1", true],
    ["fd12:3456::1", true],
    ["2001:db8::1", false],
    ["2a00:1450:4001::1", false],
    ["::ffff:127.0.0.1", true],
    ["::ffff:10.0.0.1", true],
    ["::ffff:c0a8:101", true],
    ["::ffff:8.8.8.8", false],
    ["fe80::1%eth0", true],
    ["not an address", true],
  ])("isPrivateClientAddress(%s) is %s", (address, expected) => {
    expect(isPrivateClientAddress(address)).toBe(expected);
  });
});
