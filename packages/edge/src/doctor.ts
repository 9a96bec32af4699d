// `mxtunnel-edge doctor`: live checks of everything outside the code that decides whether mail flows —
// DNS (MX, A/AAAA, PTR, SPF, DKIM, DMARC) asked of the resolvers in `dnsServers`, DNS blocklists,
// outbound port 25, outbound TLS (what requireTLS verifies, tlsCaFile's certificates still valid),
// the tunnels and clocks of the paired homes (from the running agent), free space.
// Each check is one line with pass / warn / fail and the fix.
import { X509Certificate } from "node:crypto";
import { Resolver } from "node:dns/promises";
import { statfs } from "node:fs/promises";
import net from "node:net";
import {
  doctorCheck as check,
  connectedPeerChecks,
  type DoctorCheck,
  type EdgeConfig,
  formatHostPort,
  type HostPort,
  readCaFile,
} from "@mxtunnel/shared";
import type { DkimRecordFile } from "./dkim.js";
import { dmarcRecord, reverseName, spfRecord } from "./dns-records.js";
import { formatBytes } from "./status.js";

/** What the running agent reports for `doctor` (admin command "probe"). */
export interface EdgeProbe {
  version: string;
  homes: {
    name: string;
    fingerprint: string;
    connected: boolean;
    rttMs: number | null;
    clockSkewMs: number | null;
    peerVersion: string | null;
    downSince: string | null;
  }[];
}

export interface EdgeDoctorInput {
  config: EdgeConfig;
  dir: string;
  addresses: string[];
  dkim: readonly DkimRecordFile[];
  /** null: the agent is not running. */
  probe: EdgeProbe | null;
  /** Per DNS query and for the port 25 probe. */
  timeoutMs?: number;
}

type Lookup<T> =
  | { ok: true; value: T }
  | { ok: false; missing: true }
  | { ok: false; missing: false; error: string };

class Dns {
  private readonly resolver: Resolver;

  constructor(servers: readonly string[], timeoutMs: number) {
    this.resolver = new Resolver({ timeout: timeoutMs, tries: 2 });
    if (servers.length) this.resolver.setServers([...servers]);
  }

  private async ask<T>(query: () => Promise<T>): Promise<Lookup<T>> {
    try {
      return { ok: true, value: await query() };
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code ?? "";
      if (code === "ENOTFOUND" || code === "ENODATA") return { ok: false, missing: true };
      return { ok: false, missing: false, error: code || (error as Error).message };
    }
  }

  mx(name: string) {
    return this.ask(() => this.resolver.resolveMx(name));
  }
  a(name: string) {
    return this.ask(() => this.resolver.resolve4(name));
  }
  aaaa(name: string) {
    return this.ask(() => this.resolver.resolve6(name));
  }
  ptr(ip: string) {
    return this.ask(() => this.resolver.resolvePtr(reverseName(ip)));
  }
  async txt(name: string): Promise<Lookup<string[]>> {
    const found = await this.ask(() => this.resolver.resolveTxt(name));
    return found.ok ? { ok: true, value: found.value.map((chunks) => chunks.join("")) } : found;
  }
}

const lower = (name: string) => name.toLowerCase().replace(/\.$/, "");

function lookupTrouble(what: string, result: { missing: boolean; error?: string }): string {
  return result.missing ? `no ${what}` : `could not look up ${what} (${result.error})`;
}

export async function edgeDoctor(input: EdgeDoctorInput): Promise<DoctorCheck[]> {
  const { config, addresses } = input;
  const timeoutMs = input.timeoutMs ?? 5000;
  const dns = new Dns(config.dnsServers, timeoutMs);
  const host = config.hostname;
  const groups = await Promise.all([
    hostChecks(dns, host, addresses),
    ...config.domains.map((domain) => domainChecks(dns, config, domain, addresses, input.dkim)),
    dnsblChecks(dns, config.checks.dnsbls, addresses),
    port25Check(config.checks.outboundProbe, host, timeoutMs),
    Promise.resolve(outboundTlsChecks(config)),
    Promise.resolve(tunnelChecks(input.probe)),
    diskCheck(input.dir, config.checks.minFreeSpace),
  ]);
  return groups.flat();
}

async function hostChecks(dns: Dns, host: string, addresses: readonly string[]): Promise<DoctorCheck[]> {
  const out: DoctorCheck[] = [];
  if (addresses.length === 0) {
    out.push(
      check(
        "fail",
        "address",
        "this edge's public address is unknown",
        "set publicAddresses in edge.json (or pass --ip ADDRESS)",
      ),
    );
    return out;
  }
  const [a, aaaa] = await Promise.all([dns.a(host), dns.aaaa(host)]);
  const published = [...(a.ok ? a.value : []), ...(aaaa.ok ? aaaa.value : [])];
  for (const ip of addresses) {
    const type = net.isIPv4(ip) ? "A" : "AAAA";
    const result = type === "A" ? a : aaaa;
    if (!result.ok && !result.missing) {
      out.push(check("warn", "address", `${host} ${type}: ${lookupTrouble("record", result)}`));
    } else if (published.includes(ip)) {
      out.push(check("pass", "address", `${host} ${type} ${ip}`));
    } else {
      out.push(
        check(
          "fail",
          "address",
          `${host} ${type} is ${published.filter((p) => net.isIP(p) === net.isIP(ip)).join(", ") || "not published"}, not ${ip}`,
          `publish ${host}. IN ${type} ${ip}`,
        ),
      );
    }
  }
  for (const ip of addresses) {
    const ptr = await dns.ptr(ip);
    if (ptr.ok && ptr.value.map(lower).includes(host)) {
      out.push(check("pass", "ptr", `${ip} → ${host} (matches the hostname and the EHLO name)`));
    } else {
      const found = ptr.ok ? ptr.value.map(lower).join(", ") : lookupTrouble("PTR record", ptr);
      out.push(
        check(
          ptr.ok || ptr.missing ? "fail" : "warn",
          "ptr",
          `${ip} → ${found}, expected ${host}: receivers distrust mail from an address whose PTR does not name the EHLO host`,
          `ask your VPS provider to set the reverse DNS (PTR) of ${ip} to ${host}`,
        ),
      );
    }
  }
  return out;
}

async function domainChecks(
  dns: Dns,
  config: EdgeConfig,
  domain: string,
  addresses: readonly string[],
  dkim: readonly DkimRecordFile[],
): Promise<DoctorCheck[]> {
  const host = config.hostname;
  const out: DoctorCheck[] = [];
  const [mx, txt, dmarc] = await Promise.all([dns.mx(domain), dns.txt(domain), dns.txt(`_dmarc.${domain}`)]);

  // MX
  const mine = mx.ok ? mx.value.find((r) => lower(r.exchange) === host) : undefined;
  if (mine && mine.priority === config.mxPriority) {
    const others = mx.ok ? mx.value.filter((r) => r !== mine) : [];
    out.push(
      check(
        "pass",
        "mx",
        `${domain} MX ${mine.priority} ${host}${others.length ? ` (also ${others.map((r) => `${r.priority} ${lower(r.exchange)}`).join(", ")})` : ""}`,
      ),
    );
  } else if (mine) {
    out.push(
      check(
        "warn",
        "mx",
        `${domain} MX ${host} has priority ${mine.priority}, edge.json says mxPriority ${config.mxPriority}`,
        `publish ${domain}. IN MX ${config.mxPriority} ${host}. or set mxPriority to ${mine.priority}`,
      ),
    );
  } else {
    const found = mx.ok
      ? mx.value.map((r) => `${r.priority} ${lower(r.exchange)}`).join(", ")
      : lookupTrouble("MX record", mx);
    out.push(
      check(
        mx.ok || mx.missing ? "fail" : "warn",
        "mx",
        `${domain} MX does not point at this edge (${found})`,
        `publish ${domain}. IN MX ${config.mxPriority} ${host}.`,
      ),
    );
  }

  // SPF
  const spfRecords = txt.ok ? txt.value.filter((t) => /^v=spf1(\s|$)/i.test(t)) : [];
  const wanted = spfRecord(addresses);
  if (!txt.ok && !txt.missing) {
    out.push(check("warn", "spf", `${domain}: ${lookupTrouble("TXT records", txt)}`));
  } else if (spfRecords.length === 0) {
    out.push(check("fail", "spf", `${domain} has no SPF record`, `publish ${domain}. IN TXT "${wanted}"`));
  } else if (spfRecords.length > 1) {
    out.push(
      check(
        "fail",
        "spf",
        `${domain} has ${spfRecords.length} SPF records (receivers treat that as an error)`,
        `merge them into one, e.g. "${wanted}"`,
      ),
    );
  } else {
    const record = spfRecords[0]!;
    const missing: string[] = [];
    for (const ip of addresses) {
      if (!(await spfAuthorises(dns, domain, record, ip, 0))) missing.push(ip);
    }
    if (missing.length === 0)
      out.push(check("pass", "spf", `${domain} SPF authorises ${addresses.join(", ") || "-"}: ${record}`));
    else
      out.push(
        check(
          "fail",
          "spf",
          `${domain} SPF does not include ${missing.join(", ")}: ${record}`,
          `add ${missing.map((ip) => (net.isIPv4(ip) ? `ip4:${ip}` : `ip6:${ip}`)).join(" ")} before the "all" (e.g. "${wanted}")`,
        ),
      );
  }

  // DKIM
  const keys = dkim.filter((k) => k.domain === domain);
  if (keys.length === 0) {
    out.push(
      check(
        "fail",
        "dkim",
        `${domain}: no DKIM key on this edge (DIR/dkim/${domain}.json)`,
        "run `mxtunnel-edge init` for the domain",
      ),
    );
  }
  for (const key of keys) {
    const published = await dns.txt(key.name);
    const record = published.ok ? published.value.find((t) => /(^|;)\s*p=/.test(t)) : undefined;
    const p = record ? dkimTag(record, "p") : undefined;
    if (!published.ok && !published.missing) {
      out.push(check("warn", "dkim", `${key.name}: ${lookupTrouble("TXT record", published)}`));
    } else if (p === undefined) {
      out.push(
        check(
          "fail",
          "dkim",
          `${key.name} is not published: mail signed with selector ${key.selector} fails DKIM`,
          `publish ${key.name}. IN TXT "${key.record}" (see \`mxtunnel-edge dns\`)`,
        ),
      );
    } else if (p.replace(/\s+/g, "") !== key.publicKey) {
      out.push(
        check(
          "fail",
          "dkim",
          `${key.name} is stale: it publishes a different public key than the one on disk (p=${p.slice(0, 16)}…, ours p=${key.publicKey.slice(0, 16)}…)`,
          `replace it with "${key.record}" (see \`mxtunnel-edge dns\`)`,
        ),
      );
    } else {
      out.push(check("pass", "dkim", `${key.name} matches the key on disk`));
    }
  }

  // DMARC
  const dmarcRecords = dmarc.ok ? dmarc.value.filter((t) => /^v=DMARC1(\s|;|$)/i.test(t)) : [];
  if (!dmarc.ok && !dmarc.missing) {
    out.push(check("warn", "dmarc", `_dmarc.${domain}: ${lookupTrouble("TXT record", dmarc)}`));
  } else if (dmarcRecords.length === 0) {
    out.push(
      check(
        "fail",
        "dmarc",
        `_dmarc.${domain} has no DMARC record`,
        `publish _dmarc.${domain}. IN TXT "${dmarcRecord(domain)}"`,
      ),
    );
  } else {
    const policy = dkimTag(dmarcRecords[0]!, "p") ?? "?";
    out.push(
      policy === "none"
        ? check(
            "warn",
            "dmarc",
            `_dmarc.${domain} p=none: receivers are told not to act on failures`,
            "move to p=quarantine once reports look clean",
          )
        : check("pass", "dmarc", `_dmarc.${domain} p=${policy}`),
    );
  }
  return out;
}

/** A tag's value in a "k=v; k=v" record (DKIM, DMARC). */
function dkimTag(record: string, tag: string): string | undefined {
  for (const part of record.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim().toLowerCase() === tag) return part.slice(eq + 1).trim();
  }
  return undefined;
}

/**
 * Whether an SPF record authorises `ip` through a mechanism before "all": ip4/ip6 (with prefixes),
 * a, mx, include and redirect, up to the RFC's depth. exists/ptr are not evaluated.
 */
async function spfAuthorises(
  dns: Dns,
  domain: string,
  record: string,
  ip: string,
  depth: number,
): Promise<boolean> {
  if (depth > 10) return false;
  const family = net.isIPv4(ip) ? "ipv4" : "ipv6";
  const inList = (candidates: readonly string[], prefix: number | undefined) => {
    const list = new net.BlockList();
    for (const candidate of candidates) {
      const type = net.isIPv4(candidate) ? "ipv4" : "ipv6";
      if (type !== family) continue;
      list.addSubnet(candidate, prefix ?? (type === "ipv4" ? 32 : 128), type);
    }
    return list.check(ip, family);
  };
  const hostAddresses = async (name: string) => {
    const found = family === "ipv4" ? await dns.a(name) : await dns.aaaa(name);
    return found.ok ? found.value : [];
  };
  let redirect: string | undefined;
  for (const term of record.split(/\s+/).slice(1)) {
    const match = /^([-+~?]?)([a-z0-9]+)(?::([^/]*))?(?:\/(\d+))?(?:\/\/(\d+))?$/i.exec(term);
    const modifier = /^redirect=(.+)$/i.exec(term);
    if (modifier) {
      redirect = modifier[1];
      continue;
    }
    if (!match) continue;
    const qualifier = match[1] || "+";
    const mechanism = match[2]!.toLowerCase();
    const argument = match[3];
    const prefix = match[4] ? Number(match[4]) : undefined;
    const prefix6 = match[5] ? Number(match[5]) : undefined;
    const usePrefix = family === "ipv4" ? prefix : (prefix6 ?? prefix);
    let matched = false;
    if (mechanism === "all") return qualifier === "+";
    if ((mechanism === "ip4" || mechanism === "ip6") && argument) matched = inList([argument], usePrefix);
    else if (mechanism === "a") matched = inList(await hostAddresses(argument ?? domain), usePrefix);
    else if (mechanism === "mx") {
      const mx = await dns.mx(argument ?? domain);
      const hosts = mx.ok ? mx.value.map((r) => r.exchange) : [];
      for (const h of hosts) if (inList(await hostAddresses(h), usePrefix)) matched = true;
    } else if (mechanism === "include" && argument) {
      const txt = await dns.txt(argument);
      const inner = txt.ok ? txt.value.find((t) => /^v=spf1(\s|$)/i.test(t)) : undefined;
      matched = inner !== undefined && (await spfAuthorises(dns, argument, inner, ip, depth + 1));
    }
    if (matched) return qualifier === "+";
  }
  if (redirect) {
    const txt = await dns.txt(redirect);
    const inner = txt.ok ? txt.value.find((t) => /^v=spf1(\s|$)/i.test(t)) : undefined;
    return inner !== undefined && spfAuthorises(dns, redirect, inner, ip, depth + 1);
  }
  return false;
}

async function dnsblChecks(
  dns: Dns,
  zones: readonly string[],
  addresses: readonly string[],
): Promise<DoctorCheck[]> {
  const out: DoctorCheck[] = [];
  const v4 = addresses.filter((ip) => net.isIPv4(ip));
  if (zones.length === 0) return [check("skip", "dnsbl", "no blocklists configured (checks.dnsbls)")];
  if (v4.length === 0) return [check("skip", "dnsbl", "no IPv4 address to look up")];
  for (const ip of v4) {
    const listed: string[] = [];
    const unsure: string[] = [];
    await Promise.all(
      zones.map(async (zone) => {
        const name = `${ip.split(".").reverse().join(".")}.${zone}`;
        const [answer, reason] = await Promise.all([dns.a(name), dns.txt(name)]);
        if (!answer.ok) {
          if (!answer.missing) unsure.push(`${zone} (${answer.error})`);
          return;
        }
        // 127.255.255.x: the list refuses this resolver (public resolvers are blocked by Spamhaus).
        if (answer.value.every((a) => a.startsWith("127.255.255."))) {
          unsure.push(`${zone} (refused the query: use your own resolver)`);
          return;
        }
        const why = reason.ok && reason.value[0] ? `: ${reason.value[0]}` : "";
        listed.push(`${zone} (${answer.value.join(", ")}${why})`);
      }),
    );
    if (listed.length)
      out.push(
        check(
          "fail",
          "dnsbl",
          `${ip} is listed on ${listed.sort().join("; ")}`,
          "find the cause (open relay, compromised account, previous owner of the IP), then request removal on the list's website",
        ),
      );
    else if (unsure.length)
      out.push(
        check(
          "warn",
          "dnsbl",
          `${ip}: not listed where checked, but could not check ${unsure.sort().join("; ")}`,
        ),
      );
    else out.push(check("pass", "dnsbl", `${ip} is not listed on ${zones.join(", ")}`));
  }
  return out;
}

/** A TCP connection to a remote MX and its 220 greeting: many providers block outbound port 25. */
export function port25Check(target: HostPort, hostname: string, timeoutMs: number): Promise<DoctorCheck[]> {
  const where = formatHostPort(target);
  return new Promise((resolve) => {
    const socket = net.connect({ host: target.host, port: target.port });
    let greeting = "";
    let finished = false;
    const done = (result: DoctorCheck) => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      socket.removeAllListeners("data");
      socket.on("error", () => {});
      if (!socket.destroyed) socket.end("QUIT\r\n");
      setTimeout(() => socket.destroy(), 1000).unref();
      resolve([result]);
    };
    const blocked = (why: string) =>
      check(
        "fail",
        "port25",
        `outbound SMTP to ${where} failed (${why}): this edge cannot deliver outbound mail`,
        "many VPS providers block outbound port 25 by default: ask yours to open it (and check the firewall)",
      );
    const timer = setTimeout(() => done(blocked(`no greeting within ${timeoutMs} ms`)), timeoutMs);
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      greeting += chunk;
      if (!greeting.includes("\n")) return;
      done(
        greeting.startsWith("220")
          ? check(
              "pass",
              "port25",
              `outbound SMTP to ${where} works (${greeting.split("\r\n")[0]!.slice(0, 60)})`,
            )
          : check(
              "warn",
              "port25",
              `${where} answered "${greeting.trim().slice(0, 60)}" instead of 220`,
              `check that ${hostname}'s address is not blocked by the remote side`,
            ),
      );
    });
    socket.on("error", (error: NodeJS.ErrnoException) => done(blocked(error.code ?? error.message)));
    socket.on("close", () => done(blocked("connection closed before the greeting")));
  });
}

function tunnelChecks(probe: EdgeProbe | null): DoctorCheck[] {
  if (!probe) {
    return [
      check(
        "fail",
        "agent",
        "the edge agent is not running: no tunnel checks",
        "start it: `systemctl start mxtunnel-edge` (or `mxtunnel-edge run --dir …`)",
      ),
    ];
  }
  const out: DoctorCheck[] = [check("pass", "agent", `the edge agent is running (${probe.version})`)];
  if (probe.homes.length === 0) {
    out.push(
      check(
        "warn",
        "tunnel",
        "no home is paired yet",
        "`mxtunnel-edge pair --dir …`, then `mxtunnel-home pair -` on the home box",
      ),
    );
  }
  for (const home of probe.homes) {
    if (!home.connected) {
      out.push(
        check(
          "fail",
          "tunnel",
          `home ${home.name}: no tunnel${home.downSince ? ` (down since ${home.downSince})` : ""}; inbound mail is spooled`,
          "on the home box: `mxtunnel-home status` and `mxtunnel-home doctor`",
        ),
      );
      continue;
    }
    out.push(...connectedPeerChecks(`home ${home.name}`, home, "home", "agent"));
  }
  return out;
}

/** What `requireTLS` verifies, against which CAs; `outbound.tlsCaFile` readable and its certificates current. */
export function outboundTlsChecks(config: EdgeConfig, now = Date.now()): DoctorCheck[] {
  const { requireTLS } = config;
  const path = config.outbound.tlsCaFile;
  if (requireTLS.length === 0 && !path) return [];
  let extra: string[] = [];
  if (path) {
    try {
      extra = readCaFile(path);
    } catch (error) {
      return [
        check(
          "fail",
          "outbound-tls",
          `outbound.tlsCaFile: ${(error as Error).message}; the edge will not start`,
          "point outbound.tlsCaFile at a readable PEM file of CA certificates, or set it to null",
        ),
      ];
    }
  }
  const out: DoctorCheck[] = [];
  extra.forEach((pem, i) => {
    const certificate = new X509Certificate(pem);
    const subject = certificate.subject.replace(/\n/g, ", ");
    if (Date.parse(certificate.validTo) < now || Date.parse(certificate.validFrom) > now) {
      out.push(
        check(
          "warn",
          "outbound-tls",
          `certificate ${i + 1} in outbound.tlsCaFile (${subject}) is valid only from ${certificate.validFrom} to ${certificate.validTo}: no certificate verifies against it`,
          "replace it with the CA's current certificate",
        ),
      );
    }
  });
  const trust = path ? `Node's CAs and the ${extra.length} of ${path}` : "Node's CAs";
  if (requireTLS.length === 0) {
    out.push(
      check(
        "warn",
        "outbound-tls",
        "outbound.tlsCaFile is set but requireTLS lists no domain, so it is not used (other domains' TLS is not verified)",
        "list the domains whose MX certificates it should verify in requireTLS",
      ),
    );
  } else {
    out.push(
      check(
        "pass",
        "outbound-tls",
        `mail to ${requireTLS.join(", ")} only over STARTTLS with a certificate from ${trust} naming the MX host; other domains: TLS when offered, unverified`,
      ),
    );
  }
  return out;
}

async function diskCheck(dir: string, minFree: number): Promise<DoctorCheck[]> {
  try {
    const fs = await statfs(dir);
    const free = fs.bavail * fs.bsize;
    const text = `${formatBytes(free)} free for the spool and queue under ${dir}`;
    if (free < minFree / 10)
      return [check("fail", "disk", text, `free space (checks.minFreeSpace is ${formatBytes(minFree)})`)];
    if (free < minFree)
      return [check("warn", "disk", text, `free space (checks.minFreeSpace is ${formatBytes(minFree)})`)];
    return [check("pass", "disk", text)];
  } catch (error) {
    return [check("warn", "disk", `cannot read free space of ${dir}: ${(error as Error).message}`)];
  }
}
