// `mxtunnel-home postfix-config`: what to paste into master.cf, main.cf and Dovecot so they accept the
// tunnel with the real client address, and checks of the live Postfix read through `postconf`.
// The core (postfixAdvice) is pure: home config + the text `postconf` printed → sections and checks.
// collectPostconf and localAddressTowards are the only parts that touch the machine.
import { execFile } from "node:child_process";
import { createSocket } from "node:dgram";
import { isIP, isIPv4 } from "node:net";
import { formatHostPort, type HomeConfig, type HostPort, type ProxyProtocolMode } from "@mxtunnel/shared";

// ---------------------------------------------------------------------------------------------
// Result types

export interface AdviceLine {
  /** The text to paste. */
  text: string;
  /** One line saying why; rendered as a comment above `text`. */
  why?: string;
}

export interface AdviceSection {
  id: string;
  title: string;
  /** Where the lines go. */
  file: string;
  lines: AdviceLine[];
  /** Printed before the lines (loud warnings, alternatives). */
  notes: string[];
}

export type CheckLevel = "pass" | "warn" | "fail";

export interface PostfixCheck {
  level: CheckLevel;
  message: string;
  fix?: string;
}

export interface PostfixAdvice {
  /** mail_version, when postconf was read. */
  postfixVersion?: string;
  /** Whether the checks read a live Postfix (postconf found). */
  checked: boolean;
  sections: AdviceSection[];
  checks: PostfixCheck[];
}

/** The text of `postconf`, `postconf -M` and `postconf -P`, unexpanded, as Postfix printed it. */
export interface PostconfOutputs {
  main: string;
  master: string;
  masterParams: string;
  /** The -c directory these came from, if not the default. */
  configDirectory?: string;
}

export interface PostfixAdviceInput {
  config: HomeConfig;
  postconf?: PostconfOutputs;
  /**
   * For targets that are not loopback: the local address home connects from (target host →
   * address), as localAddressTowards finds it. Loopback targets need none.
   */
  localAddresses?: Record<string, string>;
}

/** Postfix's recommended minimum for message_size_limit here: the edge announces it as SIZE. */
export const MIN_MESSAGE_SIZE = 25 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// postconf parsing

export interface MasterService {
  /** The first master.cf field, e.g. "127.0.0.1:10025", "10025", "smtpd". */
  name: string;
  type: string;
  command: string;
}

export interface PostconfFacts {
  main: Map<string, string>;
  services: MasterService[];
  /** "name/type" → parameter → value (the -o overrides). */
  overrides: Map<string, Map<string, string>>;
}

export function parsePostconf(outputs: PostconfOutputs): PostconfFacts {
  const main = new Map<string, string>();
  for (const line of outputs.main.split("\n")) {
    const match = /^([A-Za-z0-9_]+) =(?: (.*))?$/.exec(line.trimEnd());
    if (match?.[1]) main.set(match[1], match[2] ?? "");
  }
  const services: MasterService[] = [];
  for (const line of outputs.master.split("\n")) {
    if (/^\s*(#|$)/.test(line)) continue;
    const fields = line.trim().split(/\s+/);
    const [name, type, , , , , , command] = fields;
    if (name && type && command) services.push({ name, type, command });
  }
  const overrides = new Map<string, Map<string, string>>();
  for (const line of outputs.masterParams.split("\n")) {
    const match = /^(.+)\/([a-z-]+)\/([A-Za-z0-9_]+) =(?: (.*))?$/.exec(line.trimEnd());
    if (!match?.[1] || !match[2] || !match[3]) continue;
    const key = `${match[1]}/${match[2]}`;
    const params = overrides.get(key) ?? new Map<string, string>();
    params.set(match[3], match[4] ?? "");
    overrides.set(key, params);
  }
  return { main, services, overrides };
}

/** A parameter as one master.cf service sees it: its -o override, else main.cf, with $names expanded. */
export function effectiveParam(facts: PostconfFacts, service: MasterService | undefined, name: string) {
  const own = service ? facts.overrides.get(`${service.name}/${service.type}`) : undefined;
  const lookup = (param: string): string | undefined => own?.get(param) ?? facts.main.get(param);
  const expand = (value: string, depth: number): string =>
    depth > 20
      ? value
      : value.replace(
          /\$(?:\{([A-Za-z0-9_]+)(?:([?:])([^}]*))?\}|\(([A-Za-z0-9_]+)\)|([A-Za-z0-9_]+))/g,
          (
            _all,
            braced: string | undefined,
            op: string | undefined,
            alt: string | undefined,
            paren,
            bare,
          ) => {
            const param = (braced ?? paren ?? bare) as string;
            const value = expand(lookup(param) ?? "", depth + 1);
            if (op === "?") return value.trim() ? expand(alt ?? "", depth + 1) : "";
            if (op === ":") return value.trim() ? "" : expand(alt ?? "", depth + 1);
            return value;
          },
        );
  const raw = lookup(name);
  return raw === undefined ? undefined : expand(raw, 0);
}

/** "mail_version" → [major, minor, patch]; a snapshot (3.10-20240612) counts as patch 0. */
export function parsePostfixVersion(version: string | undefined): [number, number, number] | undefined {
  const match = /^(\d+)\.(\d+)(?:\.(\d+))?/.exec(version ?? "");
  if (!match) return undefined;
  return [Number(match[1]), Number(match[2]), Number(match[3] ?? 0)];
}

function atLeast(version: [number, number, number], major: number, minor: number, patch = 0): boolean {
  const [a, b, c] = version;
  return a !== major ? a > major : b !== minor ? b > minor : c >= patch;
}

/**
 * "reject" exists from 3.9, 3.8.5, 3.7.10, 3.6.14, 3.5.24; 3.8.4, 3.7.9, 3.6.13, 3.5.23 only know
 * "yes" (which rejects there, and means "normalize" later).
 */
function bareNewlineValue(version: [number, number, number] | undefined): "reject" | "yes" {
  if (!version) return "yes";
  const [major, minor, patch] = version;
  if (major > 3 || (major === 3 && minor >= 9)) return "reject";
  const fixedAt: Record<number, number> = { 8: 5, 7: 10, 6: 14, 5: 24 };
  const first = fixedAt[minor];
  return major === 3 && first !== undefined && patch >= first ? "reject" : "yes";
}

// ---------------------------------------------------------------------------------------------
// Addresses and Postfix address lists

interface Cidr {
  v6: boolean;
  bits: bigint;
  prefix: number;
}

function ipToBits(ip: string): { v6: boolean; bits: bigint } | undefined {
  if (isIPv4(ip)) {
    const bits = ip.split(".").reduce((acc, part) => (acc << 8n) | BigInt(part), 0n);
    return { v6: false, bits };
  }
  if (isIP(ip) !== 6) return undefined;
  let text = ip.split("%")[0] ?? ip;
  const v4Tail = /(\d+\.\d+\.\d+\.\d+)$/.exec(text)?.[1];
  if (v4Tail) {
    const v4 = ipToBits(v4Tail)!.bits;
    text = text.slice(0, -v4Tail.length) + `${(v4 >> 16n).toString(16)}:${(v4 & 0xffffn).toString(16)}`;
  }
  const [head = "", tail] = text.split("::");
  const headParts = head ? head.split(":") : [];
  const tailParts = tail ? tail.split(":") : [];
  const zeros = tail === undefined ? [] : Array(8 - headParts.length - tailParts.length).fill("0");
  const groups = [...headParts, ...zeros, ...tailParts];
  return { v6: true, bits: groups.reduce((acc, g) => (acc << 16n) | BigInt(`0x${g || "0"}`), 0n) };
}

/** An IPv4-mapped IPv6 range (::ffff:a.b.c.d/len ≥ 96) is the IPv4 range Postfix would also match. */
function unmap(cidr: Cidr): Cidr {
  if (cidr.v6 && cidr.prefix >= 96 && cidr.bits >> 32n === 0xffffn)
    return { v6: false, bits: cidr.bits & 0xffffffffn, prefix: cidr.prefix - 96 };
  return cidr;
}

function parseCidr(pattern: string): Cidr | undefined {
  const match = /^\[?([0-9A-Fa-f:.]+)\]?(?:\/(\d+))?$/.exec(pattern);
  if (!match?.[1]) return undefined;
  const ip = ipToBits(match[1]);
  if (!ip) return undefined;
  const max = ip.v6 ? 128 : 32;
  const prefix = match[2] === undefined ? max : Number(match[2]);
  if (prefix > max) return undefined;
  return unmap({ ...ip, prefix });
}

function cidrContains(cidr: Cidr, address: string): boolean {
  const ip = ipToBits(address);
  if (!ip) return false;
  const host = unmap({ ...ip, prefix: ip.v6 ? 128 : 32 });
  if (host.v6 !== cidr.v6) return false;
  const width = BigInt(cidr.v6 ? 128 : 32);
  const shift = width - BigInt(cidr.prefix);
  return host.bits >> shift === cidr.bits >> shift;
}

export interface ListVerdict {
  /** Addresses the list matches (first match wins, "!pattern" excludes). */
  matched: string[];
  /** Entries this check cannot evaluate: tables, files, host or domain names. */
  unknown: string[];
}

/** Evaluates a Postfix address list (mynetworks syntax) for each address, as far as it can. */
export function matchAddressList(list: string, addresses: readonly string[]): ListVerdict {
  const entries = list.split(/[\s,]+/).filter(Boolean);
  const unknown: string[] = [];
  const patterns = entries.map((entry) => {
    const negated = entry.startsWith("!");
    const cidr = parseCidr(negated ? entry.slice(1) : entry);
    if (!cidr) unknown.push(entry);
    return { negated, cidr };
  });
  const matched = addresses.filter((address) => {
    for (const { negated, cidr } of patterns) if (cidr && cidrContains(cidr, address)) return !negated;
    return false;
  });
  return { matched, unknown };
}

function isLoopbackHost(host: string): boolean {
  return host === "localhost" || host === "::1" || (isIPv4(host) && host.startsWith("127."));
}

/** The address(es) Postfix or Dovecot see home connect from, or undefined when unknown. */
export function homeAddressesFor(target: HostPort, localAddresses: Record<string, string> = {}) {
  if (target.host === "localhost") return ["127.0.0.1", "::1"];
  if (target.host === "::1") return ["::1"];
  if (isLoopbackHost(target.host)) return ["127.0.0.1"];
  const local = localAddresses[target.host];
  return local ? [local] : undefined;
}

// ---------------------------------------------------------------------------------------------
// Advice

const HOME_ADDRESS_PLACEHOLDER = "HOME_AGENT_ADDRESS";

function proxyWhy(mode: ProxyProtocolMode, what: string, server: "Postfix" | "Dovecot" = "Postfix"): string {
  const reads = server === "Postfix" ? "Postfix >= 3.5 reads v2" : "Dovecot reads v1 and v2";
  return mode === "v2"
    ? `${what} starts with a binary PROXY v2 header carrying the real client address (${reads})`
    : `${what} starts with a PROXY v1 text line carrying the real client address`;
}

/** The smtpd overrides against SMTP smuggling on a tunnel-facing port (the knob when Postfix has it). */
function bareNewlineLines(bareNewline: "reject" | "yes" | undefined): AdviceLine[] {
  const lines: AdviceLine[] = [];
  if (bareNewline)
    lines.push({
      text: `  -o smtpd_forbid_bare_newline=${bareNewline}`,
      why: "SMTP smuggling: refuse bare <LF> line endings from Internet clients",
    });
  lines.push({
    text: "  -o smtpd_forbid_bare_newline_exclusions=",
    why: "the default ($mynetworks) must exempt nobody on this port",
  });
  return lines;
}

function smtpdLines(
  listen: string,
  mode: ProxyProtocolMode,
  bareNewline: "reject" | "yes" | undefined,
): AdviceLine[] {
  const lines: AdviceLine[] = [
    {
      text: `${listen} inet n - n - - smtpd`,
      why: "the tunnel-facing smtpd: mxtunnel-home hands inbound SMTP from the edge here (postfix.inject)",
    },
  ];
  if (mode !== "off")
    lines.push({
      text: "  -o smtpd_upstream_proxy_protocol=haproxy",
      why: proxyWhy(mode, "every session"),
    });
  lines.push({
    text: "  -o mynetworks=",
    why: "every session arrives from loopback: trusting it as local (permit_mynetworks) would make an open relay",
  });
  lines.push(...bareNewlineLines(bareNewline));
  return lines;
}

function postscreenLines(
  listen: string,
  mode: ProxyProtocolMode,
  bareNewline: "reject" | "yes" | undefined,
): AdviceLine[] {
  const lines: AdviceLine[] = [
    {
      text: `${listen} inet n - n - 1 postscreen`,
      why: "postscreen on the tunnel-facing address instead (pregreet/DNSBL tests on the real client IP)",
    },
  ];
  if (mode !== "off")
    lines.push({
      text: "  -o postscreen_upstream_proxy_protocol=haproxy",
      why: proxyWhy(mode, "every session"),
    });
  lines.push(
    {
      text: "  -o smtpd_service_name=mxtunnel-smtpd",
      why: "hand passed clients to the smtpd below, not to a `smtpd pass` you may use for port 25",
    },
    {
      text: "mxtunnel-smtpd pass - - n - - smtpd",
      why: "`smtpd pass`: receives clients from postscreen with the address postscreen decoded (no PROXY here)",
    },
    {
      text: "  -o mynetworks=",
      why: "tunnelled clients must never be trusted as local: loopback in mynetworks would make an open relay",
    },
  );
  lines.push(...bareNewlineLines(bareNewline));
  return lines;
}

function submissionLines(name: string, listen: string, mode: ProxyProtocolMode): AdviceLine[] {
  const wrapper = name === "submissions";
  const lines: AdviceLine[] = [
    {
      text: `${listen} inet n - n - - smtpd`,
      why: `${name} (port ${wrapper ? 465 : 587} on the edge) for mail clients, reached through the tunnel`,
    },
    { text: `  -o syslog_name=postfix/${name}`, why: "tell these sessions apart in the log (fail2ban)" },
  ];
  if (mode !== "off")
    lines.push({ text: "  -o smtpd_upstream_proxy_protocol=haproxy", why: proxyWhy(mode, "every session") });
  lines.push(
    wrapper
      ? { text: "  -o smtpd_tls_wrappermode=yes", why: "submissions is TLS from the first byte (RFC 8314)" }
      : {
          text: "  -o smtpd_tls_security_level=encrypt",
          why: "no AUTH or mail before STARTTLS: passwords never cross the edge in clear",
        },
    {
      text: "  -o smtpd_sasl_auth_enable=yes",
      why: "mail clients log in (smtpd_sasl_type/path as in main.cf)",
    },
    { text: "  -o smtpd_tls_auth_only=yes", why: "offer AUTH only inside TLS" },
    { text: "  -o mynetworks=", why: "nobody is trusted by address here: only a login allows relaying" },
    {
      text: "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject",
      why: "relay for logged-in users only",
    },
  );
  return lines;
}

interface DovecotListener {
  loginService: string;
  ssl: boolean;
}

/** The Dovecot login service behind a home service name, if it looks like one. */
export function dovecotListenerFor(name: string): DovecotListener | undefined {
  if (name.startsWith("imaps")) return { loginService: "imap-login", ssl: true };
  if (name.startsWith("imap")) return { loginService: "imap-login", ssl: false };
  if (name.startsWith("pop3s")) return { loginService: "pop3-login", ssl: true };
  if (name.startsWith("pop3")) return { loginService: "pop3-login", ssl: false };
  if (name.startsWith("sieve") || name.startsWith("managesieve"))
    return { loginService: "managesieve-login", ssl: false };
  return undefined;
}

function hostPortForMaster(target: HostPort): string {
  return formatHostPort(target);
}

/** relayhost for a relay listener: a wildcard listen address is reached on loopback. */
function relayhostFor(listen: HostPort): string {
  const host = listen.host === "0.0.0.0" ? "127.0.0.1" : listen.host === "::" ? "::1" : listen.host;
  return `[${host}]:${listen.port}`;
}

const PORT_NAMES: Record<string, number> = { smtp: 25, submission: 587, submissions: 465, smtps: 465 };

function serviceAddress(name: string): { host?: string; port?: number } {
  const match = /^(?:\[?([^\]]*?)\]?:)?([^:\]]+)$/.exec(name);
  if (!match?.[2]) return {};
  const port = /^\d+$/.test(match[2]) ? Number(match[2]) : PORT_NAMES[match[2]];
  const out: { host?: string; port?: number } = {};
  if (match[1]) out.host = match[1];
  if (port !== undefined) out.port = port;
  return out;
}

/** The master.cf inet service that would accept a connection to target, if any. */
export function findInetService(facts: PostconfFacts, target: HostPort): MasterService | undefined {
  const candidates = facts.services.filter((service) => {
    if (service.type !== "inet") return false;
    const { host, port } = serviceAddress(service.name);
    if (port !== target.port) return false;
    if (host === undefined || host === target.host) return true;
    return isLoopbackHost(host) && isLoopbackHost(target.host);
  });
  return candidates.find((s) => serviceAddress(s.name).host === target.host) ?? candidates[0];
}

function loopbackOnly(list: string): boolean {
  const entries = list.split(/[\s,]+/).filter(Boolean);
  return entries.length > 0 && entries.every((e) => isLoopbackHost(e.replace(/^\[|\]$/g, "")));
}

interface SmtpdCheckContext {
  facts: PostconfFacts;
  label: string;
  configKey: string;
  target: HostPort;
  mode: ProxyProtocolMode;
  homeAddresses: string[] | undefined;
  missingLevel: CheckLevel;
  missingFix: string;
  bareNewline: "reject" | "yes" | undefined;
}

function checkSmtpdService(ctx: SmtpdCheckContext): PostfixCheck[] {
  const { facts, label, target, mode } = ctx;
  const checks: PostfixCheck[] = [];
  const where = formatHostPort(target);
  const front = findInetService(facts, target);
  if (!front) {
    return [
      {
        level: ctx.missingLevel,
        message: `MISSING: no master.cf service listens on ${where} (${ctx.configKey}): ${label} cannot be delivered`,
        fix: ctx.missingFix,
      },
    ];
  }
  const frontName = `master.cf service ${front.name}/${front.type}`;
  let smtpd: MasterService | undefined = front;
  if (front.command === "postscreen") {
    const proto = effectiveParam(facts, front, "postscreen_upstream_proxy_protocol") ?? "";
    checks.push(proxyCheck(mode, proto, `${frontName} (postscreen)`, "postscreen_upstream_proxy_protocol"));
    const passName = effectiveParam(facts, front, "smtpd_service_name") || "smtpd";
    smtpd = facts.services.find((s) => s.name === passName && s.type === "pass");
    if (!smtpd) {
      checks.push({
        level: "fail",
        message: `MISSING: postscreen on ${front.name} hands clients to "${passName}", but master.cf has no \`${passName} pass … smtpd\``,
        fix: `add \`${passName} pass - - n - - smtpd\` with \`-o mynetworks=\` below it`,
      });
      return checks;
    }
  } else if (front.command === "smtpd") {
    const proto = effectiveParam(facts, front, "smtpd_upstream_proxy_protocol") ?? "";
    checks.push(proxyCheck(mode, proto, frontName, "smtpd_upstream_proxy_protocol"));
  } else {
    checks.push({
      level: "fail",
      message: `${frontName} on ${where} runs "${front.command}", not smtpd or postscreen`,
      fix: `point ${ctx.configKey} at an smtpd listener (see the master.cf lines above)`,
    });
    return checks;
  }
  const smtpdName = `${smtpd.name}/${smtpd.type}`;

  const listenHost = serviceAddress(front.name).host;
  const interfaces = effectiveParam(facts, undefined, "inet_interfaces") ?? "all";
  const exposed = listenHost === undefined ? !loopbackOnly(interfaces) : !isLoopbackHost(listenHost);
  if (exposed && mode !== "off" && isLoopbackHost(target.host)) {
    checks.push({
      level: "warn",
      message:
        `${frontName} listens beyond loopback (${listenHost ?? `inet_interfaces = ${interfaces}`}): anyone who ` +
        "reaches it can send a PROXY header and claim any client address",
      fix: `name the service by address: \`${formatHostPort(target)} inet … ${front.command}\``,
    });
  }

  const probe = [...new Set([...(ctx.homeAddresses ?? []), "127.0.0.1", "::1"])];
  const mynetworks = effectiveParam(facts, smtpd, "mynetworks") ?? "";
  const trusted = matchAddressList(mynetworks, probe);
  if (trusted.matched.length > 0) {
    checks.push({
      level: "fail",
      message:
        `UNSAFE: mynetworks of ${smtpdName} (${mynetworks}) contains ${trusted.matched.join(", ")}: ` +
        `${label} from ${trusted.matched.join("/")} would be trusted as local (open relay, no bare-newline checks)`,
      fix: `add \`-o mynetworks=\` to ${smtpdName} in master.cf, then \`postfix reload\``,
    });
  } else {
    checks.push({
      level: "pass",
      message: `mynetworks of ${smtpdName} trusts neither loopback nor home's address`,
    });
  }
  if (trusted.unknown.length > 0) {
    checks.push({
      level: "warn",
      message: `mynetworks of ${smtpdName} has entries this check cannot evaluate: ${trusted.unknown.join(" ")}`,
      fix: `make sure none matches ${probe.join(" or ")}, or use \`-o mynetworks=\``,
    });
  }

  const hasKnob = facts.main.has("smtpd_forbid_bare_newline");
  if (!hasKnob) {
    checks.push({
      level: "warn",
      message: `Postfix ${facts.main.get("mail_version") ?? "(unknown version)"} has no smtpd_forbid_bare_newline: ${label} is not protected against SMTP smuggling`,
      fix: "upgrade Postfix to 3.9 or a 3.8.5, 3.7.10, 3.6.14, 3.5.24 stable release or later",
    });
  } else {
    const value = (effectiveParam(facts, smtpd, "smtpd_forbid_bare_newline") ?? "no").trim().toLowerCase();
    const setting = ctx.bareNewline ?? "yes";
    if (value === "no" || value === "") {
      checks.push({
        level: "fail",
        message: `UNSAFE: smtpd_forbid_bare_newline is "no" for ${smtpdName}: SMTP smuggling through this port is possible`,
        fix: `add \`-o smtpd_forbid_bare_newline=${setting}\` to ${smtpdName} (or set it in main.cf)`,
      });
    } else {
      const exclusions = effectiveParam(facts, smtpd, "smtpd_forbid_bare_newline_exclusions") ?? "";
      const excluded = matchAddressList(exclusions, probe);
      checks.push(
        excluded.matched.length > 0
          ? {
              level: "fail",
              message:
                `UNSAFE: smtpd_forbid_bare_newline_exclusions of ${smtpdName} (${exclusions}) exempts ` +
                `${excluded.matched.join(", ")}, so the bare-newline check does not apply to ${label}`,
              fix: `add \`-o smtpd_forbid_bare_newline_exclusions=\` to ${smtpdName}`,
            }
          : { level: "pass", message: `smtpd_forbid_bare_newline = ${value} for ${smtpdName}` },
      );
    }
  }
  return checks;
}

function proxyCheck(mode: ProxyProtocolMode, value: string, where: string, param: string): PostfixCheck {
  const on = value.trim() === "haproxy";
  if (mode === "off")
    return on
      ? {
          level: "fail",
          message: `${where} expects a PROXY header (${param} = haproxy) but proxyProtocol is "off": every session stalls`,
          fix: `set proxyProtocol to "v2" in home.json (recommended) or remove ${param}`,
        }
      : { level: "pass", message: `${where} expects no PROXY header, matching proxyProtocol "off"` };
  return on
    ? { level: "pass", message: `${where} reads the PROXY ${mode} header (${param} = haproxy)` }
    : {
        level: "fail",
        message: `MISSING: ${where} does not expect a PROXY header (${param} = ${value || "(empty)"}): it would read home's PROXY line as an SMTP command`,
        fix: `add \`-o ${param}=haproxy\` to that service, then \`postfix reload\``,
      };
}

function renderLines(lines: AdviceLine[]): string {
  return lines.map((l) => l.text).join("\n");
}

/** The advice and checks: a pure function of the home config and what postconf printed. */
export function postfixAdvice(input: PostfixAdviceInput): PostfixAdvice {
  const { config } = input;
  const facts = input.postconf ? parsePostconf(input.postconf) : undefined;
  const versionText = facts?.main.get("mail_version");
  const version = parsePostfixVersion(versionText);
  const mode = config.postfix.proxyProtocol;
  const inject = config.postfix.inject;
  const injectListen = hostPortForMaster(inject);
  const hasBareNewlineKnob = facts ? facts.main.has("smtpd_forbid_bare_newline") : true;
  const bareNewline = hasBareNewlineKnob ? (facts ? bareNewlineValue(version) : "reject") : undefined;

  const sections: AdviceSection[] = [];
  const checks: PostfixCheck[] = [];
  const offWarning =
    'WARNING: proxyProtocol is "off": Postfix sees every client as this machine, so SPF, RBL checks, ' +
    "postscreen and fail2ban stop working and mynetworks decides relaying. Only for benchmarks against a sink.";

  const smtpdNotes: string[] = [];
  if (mode === "off") smtpdNotes.push(offWarning);
  if (!bareNewline)
    smtpdNotes.push(
      `Postfix ${versionText ?? ""} has no smtpd_forbid_bare_newline: upgrade (3.9, 3.8.5, 3.7.10, 3.6.14, 3.5.24 or later).`,
    );
  else if (!facts)
    smtpdNotes.push(
      "smtpd_forbid_bare_newline=reject needs Postfix 3.9, 3.8.5, 3.7.10, 3.6.14 or 3.5.24 or later " +
        "(3.8.4, 3.7.9, 3.6.13, 3.5.23: use =yes; older: drop the line and upgrade).",
    );
  sections.push({
    id: "master-smtpd",
    title: "master.cf: the tunnel-facing smtpd",
    file: "master.cf",
    notes: smtpdNotes,
    lines: smtpdLines(injectListen, mode, bareNewline),
  });
  sections.push({
    id: "master-postscreen",
    title: "master.cf: or, instead of the block above, postscreen in front",
    file: "master.cf",
    notes: mode === "off" ? [offWarning] : [],
    lines: postscreenLines(injectListen, mode, bareNewline),
  });

  const relayhost = relayhostFor(config.relayListen);
  const mainLines: AdviceLine[] = [
    {
      text: `relayhost = ${relayhost}`,
      why: "outbound mail goes to mxtunnel-home's relay listener (relayListen); [ ] skips the MX lookup",
    },
  ];
  const users = Object.keys(config.relayAuth?.users ?? {});
  if (users.length > 0) {
    mainLines.push(
      { text: "smtp_sasl_auth_enable = yes", why: "the relay listener requires AUTH (relayAuth is set)" },
      {
        text: "smtp_sasl_password_maps = hash:/etc/postfix/sasl_passwd",
        why: `holds \`${relayhost} ${users[0]}:PASSWORD\` (then \`postmap /etc/postfix/sasl_passwd\`)`,
      },
      {
        text: "smtp_sasl_security_options = noanonymous",
        why: "never fall back to an unauthenticated relay",
      },
    );
  }
  const size = facts
    ? Number(effectiveParam(facts, undefined, "message_size_limit") ?? "10240000")
    : undefined;
  mainLines.push({
    text: `message_size_limit = ${size !== undefined && size >= MIN_MESSAGE_SIZE ? size : 52428800}`,
    why: "the edge announces this limit (SIZE) while it spools for you; keep it at 25 MB or more",
  });
  const utf8 = facts ? effectiveParam(facts, undefined, "smtputf8_enable") : undefined;
  if (utf8 !== undefined && utf8.trim() === "no")
    mainLines.push({
      text: "smtputf8_enable = yes",
      why: "the edge keeps SMTPUTF8 on spooled mail: with it off, Postfix refuses such mail when home drains the spool",
    });
  sections.push({ id: "main", title: "main.cf", file: "main.cf", notes: [], lines: mainLines });

  // Submission services (Postfix).
  for (const name of ["submission", "submissions"]) {
    const service = config.services[name];
    if (!service) continue;
    sections.push({
      id: `master-${name}`,
      title: `master.cf: ${name} for mail clients`,
      file: "master.cf",
      notes:
        service.proxyProtocol === "off"
          ? [offWarning.replace("proxyProtocol", `services.${name}.proxyProtocol`)]
          : [],
      lines: submissionLines(name, hostPortForMaster(service.target), service.proxyProtocol),
    });
  }

  // Dovecot.
  const dovecot = Object.entries(config.services)
    .map(([name, service]) => ({ name, service, listener: dovecotListenerFor(name) }))
    .filter((d) => d.listener !== undefined && d.service.proxyProtocol !== "off");
  if (dovecot.length > 0) {
    const addresses = new Set<string>();
    let unknownAddress = false;
    for (const d of dovecot) {
      const found = homeAddressesFor(d.service.target, input.localAddresses);
      if (found) for (const a of found) addresses.add(a);
      else unknownAddress = true;
    }
    if (unknownAddress) addresses.add(HOME_ADDRESS_PLACEHOLDER);
    const lines: AdviceLine[] = [
      {
        text: `haproxy_trusted_networks = ${[...addresses].join(" ")}`,
        why: "only mxtunnel-home may send PROXY headers; anyone else claiming a client address is refused",
      },
    ];
    const byLogin = new Map<string, typeof dovecot>();
    for (const d of dovecot) {
      const login = d.listener!.loginService;
      byLogin.set(login, [...(byLogin.get(login) ?? []), d]);
    }
    for (const [login, entries] of byLogin) {
      lines.push({ text: `service ${login} {` });
      for (const { name, service, listener } of entries) {
        lines.push(
          {
            text: `  inet_listener mxtunnel-${name} {`,
            why: `services.${name}: its own listener, so LAN clients on the usual port need not speak PROXY`,
          },
          {
            text: `    address = ${service.target.host === "localhost" ? "127.0.0.1" : service.target.host}`,
            why: "only the tunnel reaches it",
          },
          { text: `    port = ${service.target.port}`, why: `services.${name}.target` },
        );
        if (listener!.ssl)
          lines.push({ text: "    ssl = yes", why: "TLS ends here, at home: the edge never sees passwords" });
        lines.push(
          { text: "    haproxy = yes", why: proxyWhy(service.proxyProtocol, "each connection", "Dovecot") },
          { text: "  }" },
        );
      }
      lines.push({ text: "}" });
    }
    const notes = unknownAddress
      ? [
          `${HOME_ADDRESS_PLACEHOLDER}: the address of this machine as Dovecot sees it (its LAN address towards the Dovecot host).`,
        ]
      : [];
    sections.push({
      id: "dovecot",
      title: "Dovecot (e.g. conf.d/99-mxtunnel.conf)",
      file: "dovecot.conf",
      notes,
      lines,
    });
  }
  const offDovecot = Object.entries(config.services).filter(
    ([name, s]) => dovecotListenerFor(name) && s.proxyProtocol === "off",
  );
  for (const [name] of offDovecot)
    checks.push({
      level: "warn",
      message: `services.${name}.proxyProtocol is "off": Dovecot sees every client as this machine (fail2ban cannot tell them apart)`,
      fix: `set services.${name}.proxyProtocol to "v2" and \`haproxy = yes\` on that listener`,
    });

  if (mode === "off")
    checks.push({
      level: "warn",
      message: `postfix.proxyProtocol is "off": Postfix sees every client as ${inject.host}. Only for benchmarks against a sink.`,
      fix: 'set postfix.proxyProtocol to "v2" in home.json and use the master.cf lines above',
    });

  if (!facts) return { checked: false, sections, checks };

  if (version && mode === "v2" && !atLeast(version, 3, 5)) {
    checks.push({
      level: "fail",
      message: `Postfix ${versionText} reads only PROXY v1 (v2 needs 3.5 or later)`,
      fix: 'set postfix.proxyProtocol to "v1" in home.json, or upgrade Postfix',
    });
  }

  const smtpBlock = renderLines(smtpdLines(injectListen, mode, bareNewline));
  checks.push(
    ...checkSmtpdService({
      facts,
      label: "inbound mail",
      configKey: "postfix.inject",
      target: inject,
      mode,
      homeAddresses: homeAddressesFor(inject, input.localAddresses),
      missingLevel: "fail",
      missingFix: `add to master.cf, then \`postfix reload\`:\n${smtpBlock}`,
      bareNewline,
    }),
  );
  for (const name of ["submission", "submissions"]) {
    const service = config.services[name];
    if (!service) continue;
    checks.push(
      ...checkSmtpdService({
        facts,
        label: `${name} from mail clients`,
        configKey: `services.${name}.target`,
        target: service.target,
        mode: service.proxyProtocol,
        homeAddresses: homeAddressesFor(service.target, input.localAddresses),
        missingLevel: "warn",
        missingFix: `add the ${name} lines above to master.cf (unless Dovecot's submission service listens there)`,
        bareNewline,
      }),
    );
  }

  const protocols = (effectiveParam(facts, undefined, "inet_protocols") ?? "all").trim();
  if (protocols === "ipv4" || protocols === "ipv6") {
    checks.push({
      level: "warn",
      message:
        `inet_protocols = ${protocols}: a PROXY header for an ${protocols === "ipv4" ? "IPv6 (TCP6)" : "IPv4 (TCP4)"} ` +
        "client cannot be accepted, so those clients of a dual-stack edge cannot deliver",
      fix: "postconf -e inet_protocols=all, then `postfix stop; postfix start` (reload is not enough)",
    });
  } else {
    checks.push({ level: "pass", message: `inet_protocols = ${protocols}` });
  }

  if (size === 0) {
    checks.push({
      level: "warn",
      message: "message_size_limit = 0 (unlimited): the edge cannot announce a limit and will spool any size",
      fix: "postconf -e message_size_limit=52428800 (50 MB), then `postfix reload`",
    });
  } else if (size !== undefined && Number.isFinite(size) && size < MIN_MESSAGE_SIZE) {
    checks.push({
      level: "warn",
      message: `message_size_limit = ${size} (${(size / 1048576).toFixed(1)} MB) is below 25 MB: common attachments are refused`,
      fix: "postconf -e message_size_limit=52428800 (50 MB), then `postfix reload`",
    });
  } else if (size !== undefined) {
    checks.push({ level: "pass", message: `message_size_limit = ${size}` });
  }

  const currentRelay = (effectiveParam(facts, undefined, "relayhost") ?? "").trim();
  checks.push(
    currentRelay === relayhost
      ? { level: "pass", message: `relayhost = ${relayhost}` }
      : {
          level: "warn",
          message: `relayhost is "${currentRelay}", not ${relayhost}: outbound mail does not leave through the edge`,
          fix: `postconf -e 'relayhost = ${relayhost}', then \`postfix reload\``,
        },
  );
  if (utf8 !== undefined && utf8.trim() === "no")
    checks.push({
      level: "warn",
      message: "smtputf8_enable = no: SMTPUTF8 mail the edge spooled is refused when home drains it",
      fix: "postconf -e smtputf8_enable=yes",
    });

  const advice: PostfixAdvice = { checked: true, sections, checks };
  if (versionText) advice.postfixVersion = versionText;
  return advice;
}

/** True when a check failed (the command then exits 1). */
export function hasFailures(advice: PostfixAdvice): boolean {
  return advice.checks.some((c) => c.level === "fail");
}

export function renderPostfixAdvice(
  advice: PostfixAdvice,
  options: { configDirectory?: string } = {},
): string {
  const out: string[] = [];
  for (const section of advice.sections) {
    out.push(`### ${section.title}`);
    for (const note of section.notes) out.push(`# ${note}`);
    for (const line of section.lines) {
      if (line.why) out.push(`${line.text.match(/^\s*/)?.[0] ?? ""}# ${line.why}`);
      out.push(line.text);
    }
    out.push("");
  }
  const instance = options.configDirectory ? `postconf -c ${options.configDirectory}` : "postconf";
  if (!advice.checked) {
    out.push(`checks: postconf not found, nothing checked against a live Postfix`);
  } else {
    out.push(`checks against Postfix ${advice.postfixVersion ?? "(unknown version)"} (${instance}):`);
  }
  const tag = { pass: "PASS", warn: "WARN", fail: "FAIL" } as const;
  for (const check of advice.checks) {
    out.push(`  ${tag[check.level]}  ${check.message}`);
    if (check.fix)
      for (const [i, line] of check.fix.split("\n").entries())
        out.push(`        ${i === 0 ? "fix: " : "     "}${line}`);
  }
  const failed = advice.checks.filter((c) => c.level === "fail").length;
  const warned = advice.checks.filter((c) => c.level === "warn").length;
  if (advice.checks.length > 0) out.push(`${failed} failed, ${warned} warning(s)`);
  return `${out.join("\n")}\n`;
}

// ---------------------------------------------------------------------------------------------
// Runner: the only part that touches the machine

function run(file: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(file, args, { maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      if (error) {
        const code = (error as NodeJS.ErrnoException).code;
        reject(
          code === "ENOENT"
            ? error
            : new Error(`${file} ${args.join(" ")}: ${stderr.trim() || error.message}`),
        );
      } else resolve(stdout);
    });
  });
}

/**
 * Runs `postconf`, `postconf -M` and `postconf -P` (with -c DIR when given). Undefined when postconf
 * is not installed (PATH, then /usr/sbin, where Debian puts it); other failures throw.
 */
export async function collectPostconf(
  options: { configDirectory?: string; postconf?: string } = {},
): Promise<PostconfOutputs | undefined> {
  const dirArgs = options.configDirectory ? ["-c", options.configDirectory] : [];
  const candidates = options.postconf ? [options.postconf] : ["postconf", "/usr/sbin/postconf"];
  for (const file of candidates) {
    let main: string;
    try {
      main = await run(file, dirArgs);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") continue;
      throw error;
    }
    const [master, masterParams] = await Promise.all([
      run(file, [...dirArgs, "-M"]),
      run(file, [...dirArgs, "-P"]),
    ]);
    const outputs: PostconfOutputs = { main, master, masterParams };
    if (options.configDirectory) outputs.configDirectory = options.configDirectory;
    return outputs;
  }
  return undefined;
}

/** The local address the kernel would use towards host (a UDP connect sends nothing). */
export function localAddressTowards(host: string, port: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const socket = createSocket(isIP(host) === 6 ? "udp6" : "udp4");
    const done = (address: string | undefined) => {
      socket.close();
      resolve(address);
    };
    socket.on("error", () => done(undefined));
    socket.connect(port, host, () => {
      try {
        done(socket.address().address);
      } catch {
        done(undefined);
      }
    });
  });
}

/** Collects everything the advice needs from this machine, then builds it. */
export async function postfixConfigReport(
  config: HomeConfig,
  options: { configDirectory?: string; postconf?: string } = {},
): Promise<PostfixAdvice> {
  const postconf = await collectPostconf(options);
  const localAddresses: Record<string, string> = {};
  for (const service of Object.values(config.services)) {
    const host = service.target.host;
    if (isLoopbackHost(host) || host in localAddresses) continue;
    const address = await localAddressTowards(host, service.target.port);
    if (address) localAddresses[host] = address;
  }
  const input: PostfixAdviceInput = { config, localAddresses };
  if (postconf) input.postconf = postconf;
  return postfixAdvice(input);
}
