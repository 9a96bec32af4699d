import { parseEdgeConfig } from "@mxtunnel/shared";
import { describe, expect, it } from "vitest";
import { dnsPlan, edgePublicAddresses, quoteTxt, renderDnsPlan, reverseName } from "../src/dns-records.js";

const config = parseEdgeConfig({
  hostname: "mx.example.net",
  domains: ["example.org", "example.com"],
  mxPriority: 20,
  publicAddresses: ["192.0.2.10", "2001:db8::10"],
});
const dkim = [
  {
    domain: "example.org",
    selector: "mxt-00000000-202601",
    publicKey: "A".repeat(392),
    name: "mxt-00000000-202601._domainkey.example.org",
    record: `v=DKIM1; k=rsa; p=${"A".repeat(392)}`,
    createdAt: "2026-01-01T00:00:00.000Z",
  },
];

describe("dns records", () => {
  it("reverse names for IPv4 and IPv6", () => {
    expect(reverseName("192.0.2.10")).toBe("10.2.0.192.in-addr.arpa");
    expect(reverseName("2001:db8::10")).toBe(
      "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
    );
  });

  it("splits long TXT values into 255-byte strings", () => {
    const text = quoteTxt("x".repeat(300));
    expect(text).toBe(`( "${"x".repeat(255)}"\n      "${"x".repeat(45)}" )`);
    expect(quoteTxt('say "hi"')).toBe('"say \\"hi\\""');
  });

  it("plans A/AAAA, MX with the edge's priority, SPF, DKIM, DMARC and PTR per domain; says what is missing", () => {
    const { addresses, source } = edgePublicAddresses(config);
    expect(source).toBe("config");
    const plan = dnsPlan({
      config,
      dkim,
      addresses,
      addressSource: source,
      now: new Date("2026-02-03T00:00:00Z"),
    });
    const required = plan.records.filter((r) => r.required).map((r) => `${r.name} ${r.type} ${r.value}`);
    expect(required).toEqual([
      "mx.example.net A 192.0.2.10",
      "mx.example.net AAAA 2001:db8::10",
      "example.org MX 20 mx.example.net.",
      "example.org TXT v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 -all",
      `mxt-00000000-202601._domainkey.example.org TXT v=DKIM1; k=rsa; p=${"A".repeat(392)}`,
      "_dmarc.example.org TXT v=DMARC1; p=quarantine; rua=mailto:postmaster@example.org",
      "example.com MX 20 mx.example.net.",
      "example.com TXT v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 -all",
      "_dmarc.example.com TXT v=DMARC1; p=quarantine; rua=mailto:postmaster@example.com",
      "10.2.0.192.in-addr.arpa PTR mx.example.net.",
      `${reverseName("2001:db8::10")} PTR mx.example.net.`,
    ]);
    expect(plan.records.find((r) => r.name === "_mta-sts.example.org")?.value).toBe("v=STSv1; id=2026020301");
    expect(plan.hints.join("\n")).toContain("no DKIM key for example.com");
    const text = renderDnsPlan(plan);
    expect(text).toMatch(/^example\.org\.\s+3600 IN MX\s+20 mx\.example\.net\.$/m);
    expect(text).toMatch(/^; _mta-sts\.example\.org\.\s+3600 IN TXT\s+"v=STSv1; id=2026020301"$/m);
  });

  it("--ip wins over the config and is checked", () => {
    expect(edgePublicAddresses(config, ["198.51.100.1"])).toEqual({
      addresses: ["198.51.100.1"],
      source: "flag",
    });
    expect(() => edgePublicAddresses(config, ["mx.example.net"])).toThrow(
      "--ip mx.example.net is not an IPv4 or IPv6 address",
    );
  });
});
