// `mxtunnel-edge dns`: the DNS records an operator publishes for this edge, built from the config
// and the DKIM keys on disk, rendered as zone-file lines ready to paste (and as JSON for scripts).
import net from "node:net";
import os from "node:os";
import { type EdgeConfig, isPrivateClientAddress } from "@mxtunnel/shared";
import type { DkimRecordFile } from "./dkim.js";

export interface DnsRecord {
  /** Which part of the setup the record belongs to: "host", a domain, or "ptr". */
  section: string;
  name: string;
  type: "A" | "AAAA" | "MX" | "TXT" | "PTR";
  value: string;
  /** false: a suggestion (MTA-STS, TLS-RPT) or a record only the VPS provider can set (PTR). */
  required: boolean;
  note?: string;
}

export interface DnsPlan {
  hostname: string;
  addresses: string[];
  /** Where the addresses came from: --ip, config publicAddresses, or the network interfaces. */
  addressSource: "flag" | "config" | "interfaces" | "none";
  records: DnsRecord[];
  hints: string[];
}

/** The edge's public addresses: flags, then config, then the machine's non-private interfaces. */
export function edgePublicAddresses(
  config: EdgeConfig,
  flags: readonly string[] = [],
): { addresses: string[]; source: DnsPlan["addressSource"] } {
  for (const ip of flags) {
    if (!net.isIP(ip)) throw new Error(`--ip ${ip} is not an IPv4 or IPv6 address`);
  }
  if (flags.length) return { addresses: [...flags], source: "flag" };
  if (config.publicAddresses.length) return { addresses: [...config.publicAddresses], source: "config" };
  const found: string[] = [];
  const listen = config.smtpListen.host;
  if (net.isIP(listen) && listen !== "0.0.0.0" && listen !== "::" && !isPrivateClientAddress(listen))
    found.push(listen);
  for (const list of Object.values(os.networkInterfaces())) {
    for (const a of list ?? []) {
      if (a.internal || isPrivateClientAddress(a.address) || a.address.startsWith("fe80:")) continue;
      if (!found.includes(a.address)) found.push(a.address);
    }
  }
  return { addresses: found, source: found.length ? "interfaces" : "none" };
}

/** The name of the PTR record of an address (in-addr.arpa / ip6.arpa). */
export function reverseName(ip: string): string {
  if (net.isIPv4(ip)) return `${ip.split(".").reverse().join(".")}.in-addr.arpa`;
  return `${expandIPv6(ip).replaceAll(":", "").split("").reverse().join(".")}.ip6.arpa`;
}

/** 2001:db8::1 → 2001:0db8:0000:0000:0000:0000:0000:0001 */
export function expandIPv6(ip: string): string {
  const [head, tail] = ip.split("::") as [string, string | undefined];
  const h = head ? head.split(":") : [];
  const t = tail !== undefined ? (tail ? tail.split(":") : []) : [];
  const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
  return groups.map((g) => g.padStart(4, "0")).join(":");
}

export function spfRecord(addresses: readonly string[]): string {
  const mechanisms = addresses.map((ip) => (net.isIPv4(ip) ? `ip4:${ip}` : `ip6:${ip}`));
  return ["v=spf1", ...mechanisms, "-all"].join(" ");
}

export function dmarcRecord(domain: string): string {
  return `v=DMARC1; p=quarantine; rua=mailto:postmaster@${domain}`;
}

export function dnsPlan(input: {
  config: EdgeConfig;
  dkim: readonly DkimRecordFile[];
  addresses: string[];
  addressSource: DnsPlan["addressSource"];
  now?: Date;
}): DnsPlan {
  const { config, dkim, addresses } = input;
  const host = config.hostname;
  const records: DnsRecord[] = [];
  for (const ip of addresses) {
    records.push({
      section: "host",
      name: host,
      type: net.isIPv4(ip) ? "A" : "AAAA",
      value: ip,
      required: true,
    });
  }
  for (const domain of config.domains) {
    records.push({
      section: domain,
      name: domain,
      type: "MX",
      value: `${config.mxPriority} ${host}.`,
      required: true,
    });
    records.push({
      section: domain,
      name: domain,
      type: "TXT",
      value: spfRecord(addresses),
      required: true,
      note: "SPF: with several edges, one record listing every edge's address",
    });
    for (const key of dkim.filter((k) => k.domain === domain)) {
      records.push({
        section: domain,
        name: key.name,
        type: "TXT",
        value: key.record,
        required: true,
        note: "DKIM",
      });
    }
    records.push({
      section: domain,
      name: `_dmarc.${domain}`,
      type: "TXT",
      value: dmarcRecord(domain),
      required: true,
      note: "DMARC: start with quarantine; p=reject once reports look clean",
    });
    const stamp = (input.now ?? new Date()).toISOString().slice(0, 10).replaceAll("-", "");
    records.push({
      section: domain,
      name: `_mta-sts.${domain}`,
      type: "TXT",
      value: `v=STSv1; id=${stamp}01`,
      required: false,
      note: "MTA-STS (optional): also needs the policy file, see below",
    });
    records.push({
      section: domain,
      name: `_smtp._tls.${domain}`,
      type: "TXT",
      value: `v=TLSRPTv1; rua=mailto:postmaster@${domain}`,
      required: false,
      note: "TLS-RPT (optional): where senders report TLS trouble",
    });
  }
  for (const ip of addresses) {
    records.push({
      section: "ptr",
      name: reverseName(ip),
      type: "PTR",
      value: `${host}.`,
      required: true,
      note: "set by your VPS provider (their panel or a support ticket), not in your zone",
    });
  }
  const hints: string[] = [];
  if (addresses.length === 0)
    hints.push("no public address found: pass --ip ADDRESS (repeatable) or set publicAddresses in edge.json");
  const missing = config.domains.filter((domain) => !dkim.some((k) => k.domain === domain));
  if (missing.length)
    hints.push(`no DKIM key for ${missing.join(", ")} in DIR/dkim: outbound mail from it is not signed`);
  hints.push(
    `MTA-STS: serve https://mta-sts.DOMAIN/.well-known/mta-sts.txt with "version: STSv1", "mode: testing", "mx: ${host}", "max_age: 86400"; ` +
      `the live path's STARTTLS ends at your Postfix, so its certificate must be valid for ${host}, and so must the edge's tls-cert.pem (used while it spools) before you switch to "mode: enforce".`,
  );
  return { hostname: host, addresses, addressSource: input.addressSource, records, hints };
}

/** A TXT value as zone-file character-strings of at most 255 bytes each. */
export function quoteTxt(value: string): string {
  const parts: string[] = [];
  for (let i = 0; i < value.length; i += 255)
    parts.push(`"${value.slice(i, i + 255).replace(/(["\\])/g, "\\$1")}"`);
  return parts.length > 1 ? `( ${parts.join("\n      ")} )` : (parts[0] ?? '""');
}

export function renderDnsPlan(plan: DnsPlan): string {
  const out = [
    `; DNS records for the edge ${plan.hostname}` +
      (plan.addresses.length ? ` (${plan.addresses.join(", ")}, from ${plan.addressSource})` : ""),
    "; zone-file lines: paste them into your DNS provider's zone, or copy name, type and value into its form.",
  ];
  const line = (r: DnsRecord) => {
    const value = r.type === "TXT" ? quoteTxt(r.value) : r.value;
    return `${`${r.name}.`.padEnd(40)} 3600 IN ${r.type.padEnd(5)} ${value}`;
  };
  const sections = [...new Set(plan.records.map((r) => r.section))];
  for (const section of sections) {
    const records = plan.records.filter((r) => r.section === section);
    out.push("");
    if (section === "host") out.push(`; the MX host (A/AAAA)`);
    else if (section === "ptr")
      out.push(
        `; reverse DNS (PTR): ask your VPS provider to set it; receivers check that it names ${plan.hostname}`,
      );
    else out.push(`; ${section}`);
    for (const r of records) {
      if (r.note && section !== "ptr") out.push(`; ${r.note}`);
      out.push(r.required ? line(r) : `; ${line(r).replaceAll("\n", "\n; ")}`);
    }
  }
  if (plan.hints.length) out.push("", ...plan.hints.map((hint) => `; ${hint}`));
  return out.join("\n");
}
