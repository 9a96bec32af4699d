// Outbound delivery of one message to one recipient domain: route lookup (transports, MX with
// A/AAAA fallback, null MX, refusal of loopback/private/own addresses) and one SMTP connection
// (nodemailer's SMTPConnection, EHLO = the edge hostname) carrying every recipient of that domain,
// with a result per recipient. TLS follows Postfix's levels: for `requireTLS` domains "verify"
// (STARTTLS required, the certificate must chain to a trusted CA and name the MX host connected to;
// a failure defers, never falls back to plain text), for all others "may" (encrypt if offered, no
// verification, since refusing an unverifiable certificate would bounce mail plain text delivers).
import { lookup, Resolver } from "node:dns/promises";
import net from "node:net";
import os from "node:os";
import tls from "node:tls";
import { formatHostPort, type HostPort, isPrivateClientAddress, type Logger } from "@mxtunnel/shared";
import type SMTPConnection from "nodemailer/lib/smtp-connection";

export type Outcome = "delivered" | "deferred" | "failed";

export interface RecipientResult {
  address: string;
  outcome: Outcome;
  /** SMTP reply code (0 when no server answered). */
  code: number;
  /** Enhanced status, e.g. "5.1.1". */
  enhanced: string;
  /** The reply or reason, one line. */
  message: string;
  remoteMta?: string | undefined;
}

export interface DeliveryRequest {
  domain: string;
  mailFrom: string;
  /** MAIL FROM parameters as received (BODY, SMTPUTF8, RET, ENVID, SIZE). */
  params: Record<string, string>;
  recipients: { address: string; params: Record<string, string> }[];
  message: Buffer;
}

export interface NextHop {
  /** Host name (for logs, TLS SNI and Remote-MTA). */
  name: string;
  /** Addresses to try, in order. */
  addresses: string[];
  port: number;
}

export interface DelivererOptions {
  hostname: string;
  transports: Record<string, HostPort>;
  dnsServers: string[];
  requireTLS: string[];
  logger: Logger;
  connectTimeoutMs: number;
  commandTimeoutMs: number;
  /** Addresses that are this edge itself, beyond the interfaces' (e.g. the listen addresses). */
  ownAddresses?: string[];
  /** PEM certificates trusted for `requireTLS` domains besides Node's CAs (`outbound.tlsCaFile`). */
  tlsCa?: string[];
  /** Port for MX hosts (25; tests may change it). */
  mxPort?: number;
}

/** A failure that applies to every recipient of the domain. */
export class RouteError extends Error {
  constructor(
    readonly outcome: "deferred" | "failed",
    readonly code: number,
    readonly enhanced: string,
    message: string,
  ) {
    super(message);
  }
}

/** True for addresses outbound mail must never be sent to on the strength of DNS alone. */
export function isRefusedDestination(address: string, own: ReadonlySet<string>): boolean {
  const plain = address.replace(/^::ffff:/i, "").toLowerCase();
  if (own.has(plain)) return true;
  if (isPrivateClientAddress(address)) return true;
  if (net.isIPv4(plain)) {
    const first = Number(plain.split(".")[0]);
    return first >= 224; // multicast, reserved, broadcast
  }
  return /^ff/i.test(plain); // IPv6 multicast
}

function ownAddresses(extra: readonly string[]): Set<string> {
  const own = new Set<string>();
  for (const list of Object.values(os.networkInterfaces()))
    for (const a of list ?? []) own.add(a.address.toLowerCase());
  for (const a of extra) if (net.isIP(a)) own.add(a.toLowerCase());
  return own;
}

function errorCode(error: unknown): string {
  return (error as NodeJS.ErrnoException).code ?? "";
}

export class Deliverer {
  private readonly resolver = new Resolver({ timeout: 5000, tries: 2 });
  private readonly own: Set<string>;
  /** Node's CAs plus `tlsCa`, built once (a `ca` option per connection would parse them all each time). */
  private readonly verifyContext: tls.SecureContext | undefined;

  constructor(private readonly options: DelivererOptions) {
    if (options.dnsServers.length > 0) this.resolver.setServers(options.dnsServers);
    this.own = ownAddresses(options.ownAddresses ?? []);
    const extraCa = options.tlsCa ?? [];
    this.verifyContext =
      extraCa.length > 0
        ? tls.createSecureContext({ ca: [...tls.rootCertificates, ...extraCa], minVersion: MIN_TLS_VERSION })
        : undefined;
  }

  /** Where mail for `domain` goes, best first. Throws RouteError when there is nowhere to go. */
  async route(domain: string): Promise<NextHop[]> {
    const transport = this.options.transports[domain];
    if (transport) return [await this.transportHop(domain, transport)];
    const port = this.options.mxPort ?? 25;
    let mxs: { exchange: string; priority: number }[];
    try {
      mxs = await this.resolver.resolveMx(domain);
    } catch (error) {
      const code = errorCode(error);
      if (code === "ENOTFOUND")
        throw new RouteError("failed", 550, "5.1.2", `domain ${domain} does not exist`);
      if (code === "ENODATA") mxs = [];
      else
        throw new RouteError("deferred", 451, "4.4.3", `MX lookup for ${domain} failed (${code || "error"})`);
    }
    if (mxs.some((mx) => mx.exchange === "" || mx.exchange === ".")) {
      // RFC 7505: a null MX says the domain accepts no mail at all.
      throw new RouteError("failed", 556, "5.1.10", `${domain} accepts no mail (null MX)`);
    }
    // No MX: the domain itself is the implicit MX (RFC 5321 5.1).
    const hosts =
      mxs.length === 0
        ? [domain]
        : shuffleWithinPriority(mxs)
            .sort((a, b) => a.priority - b.priority)
            .map((mx) => mx.exchange.toLowerCase());
    const hops: NextHop[] = [];
    let refused = 0;
    let lookupFailed = 0;
    for (const host of hosts) {
      if (net.isIP(host)) {
        // An MX naming an address literal is a misconfiguration; treat it like its A record.
        if (isRefusedDestination(host, this.own)) refused++;
        else hops.push({ name: host, addresses: [host], port });
        continue;
      }
      const found = await this.addressesOf(host);
      if (found.length === 0) {
        lookupFailed++;
        continue;
      }
      const usable = found.filter((address) => !isRefusedDestination(address, this.own));
      if (usable.length < found.length) {
        this.options.logger.warn(
          { domain, mx: host, refused: found.filter((a) => !usable.includes(a)) },
          "MX points at loopback, private or own addresses; refused (name the domain in transports to allow it)",
        );
      }
      if (usable.length === 0) refused++;
      else hops.push({ name: host, addresses: usable, port });
    }
    if (hops.length > 0) return hops;
    if (refused > 0 && lookupFailed === 0) {
      throw new RouteError(
        "failed",
        550,
        "5.4.4",
        `every mail server of ${domain} resolves to loopback, private or this edge's own addresses`,
      );
    }
    if (mxs.length === 0) {
      throw new RouteError("failed", 550, "5.1.2", `${domain} has no MX, A or AAAA record`);
    }
    throw new RouteError("deferred", 451, "4.4.4", `no address found for the mail servers of ${domain}`);
  }

  /** A host's A and AAAA records from the edge's resolver; empty when it has none or the lookup failed. */
  private async addressesOf(host: string): Promise<string[]> {
    const [v4, v6] = await Promise.all([
      this.resolver.resolve4(host).catch((e: unknown) => e as Error),
      this.resolver.resolve6(host).catch((e: unknown) => e as Error),
    ]);
    return [...(Array.isArray(v4) ? v4 : []), ...(Array.isArray(v6) ? v6 : [])];
  }

  /**
   * The next hop `transports` names: its address, or the addresses its name has (the edge's resolver,
   * then the system's, which reads the hosts file). The name stays the hop's: TLS verifies it.
   * Transports may point anywhere, loopback and private addresses included.
   */
  private async transportHop(domain: string, transport: HostPort): Promise<NextHop> {
    const { host, port } = transport;
    if (net.isIP(host)) return { name: host, addresses: [host], port };
    let addresses = await this.addressesOf(host);
    if (addresses.length === 0) {
      const found = await lookup(host, { all: true }).catch(() => []);
      addresses = found.map((a) => a.address);
    }
    if (addresses.length === 0)
      throw new RouteError(
        "deferred",
        451,
        "4.4.4",
        `no address found for ${host}, the transport of ${domain}`,
      );
    return { name: host, addresses, port };
  }

  /** Delivers to one domain; never throws: every recipient gets a result. */
  async deliver(request: DeliveryRequest): Promise<RecipientResult[]> {
    const all = (outcome: Outcome, code: number, enhanced: string, message: string, remoteMta?: string) =>
      request.recipients.map((r) => ({ address: r.address, outcome, code, enhanced, message, remoteMta }));
    let hops: NextHop[];
    try {
      hops = await this.route(request.domain);
    } catch (error) {
      if (error instanceof RouteError) return all(error.outcome, error.code, error.enhanced, error.message);
      return all("deferred", 451, "4.4.3", `route lookup failed: ${(error as Error).message}`);
    }
    let last: RecipientResult[] = all("deferred", 451, "4.4.1", "no mail server could be reached");
    for (const hop of hops) {
      for (const address of hop.addresses) {
        const attempt = await this.attempt(request, hop, address);
        if (attempt.kind === "done") return attempt.results;
        last = attempt.results;
        // A server that refuses the whole session for good speaks for the domain.
        if (attempt.kind === "permanent") return last;
      }
    }
    return last;
  }

  private async attempt(
    request: DeliveryRequest,
    hop: NextHop,
    address: string,
  ): Promise<{ kind: "done" | "retry-next" | "permanent"; results: RecipientResult[] }> {
    const { options } = this;
    const requireTLS = options.requireTLS.includes(request.domain);
    const remoteMta = hop.name;
    const log = options.logger.child({ domain: request.domain, mx: hop.name, address });
    // SNI and the name checked against the certificate: the MX host's name, never the address dialled
    // (an address literal hop leaves servername out, and Node checks the address instead).
    const servername = net.isIP(hop.name) ? undefined : hop.name;
    const tlsOptions: tls.ConnectionOptions = requireTLS
      ? {
          servername,
          rejectUnauthorized: true,
          minVersion: MIN_TLS_VERSION,
          ...(this.verifyContext ? { secureContext: this.verifyContext } : {}),
        }
      : { servername, rejectUnauthorized: false, minVersion: MIN_TLS_VERSION };
    const connection = new (await loadSmtpConnection())({
      host: address,
      port: hop.port,
      name: options.hostname,
      requireTLS,
      opportunisticTLS: !requireTLS,
      connectionTimeout: options.connectTimeoutMs,
      greetingTimeout: options.commandTimeoutMs,
      socketTimeout: options.commandTimeoutMs,
      tls: tlsOptions,
    } as SMTPConnection.Options);
    const all = (outcome: Outcome, code: number, enhanced: string, message: string) =>
      request.recipients.map((r) => ({ address: r.address, outcome, code, enhanced, message, remoteMta }));
    connection.on("error", () => {}); // reported through the callbacks below
    try {
      await connectSmtp(connection);
    } catch (error) {
      connection.close();
      const e = error as SMTPConnection.SMTPError;
      const reply = e.response ?? "";
      const code = e.responseCode ?? 0;
      log.info({ err: e.message, code }, "connection failed");
      const certificateProblem = requireTLS ? certificateFailure(e, hop.name) : undefined;
      if (certificateProblem) {
        return {
          kind: "retry-next",
          results: all("deferred", 451, "4.7.5", `TLS required for ${request.domain}: ${certificateProblem}`),
        };
      }
      if (e.code === "ETLS" && requireTLS) {
        return {
          kind: "retry-next",
          results: all(
            "deferred",
            451,
            "4.7.10",
            `${hop.name} does not offer STARTTLS, required for ${request.domain}`,
          ),
        };
      }
      if (code >= 500)
        return { kind: "permanent", results: all("failed", code, enhancedOf(reply, code), oneLine(reply)) };
      return {
        kind: "retry-next",
        results: all(
          "deferred",
          code >= 400 ? code : 451,
          code >= 400 ? enhancedOf(reply, code) : "4.4.1",
          `${formatHostPort({ host: address, port: hop.port })}: ${oneLine(reply || e.message)}`,
        ),
      };
    }
    try {
      // One transaction per distinct set of RCPT parameters (NOTIFY/ORCPT), on this one connection.
      const groups = new Map<string, DeliveryRequest["recipients"]>();
      for (const r of request.recipients) {
        const key = JSON.stringify([r.params.NOTIFY ?? null, r.params.ORCPT ?? null]);
        groups.set(key, [...(groups.get(key) ?? []), r]);
      }
      const results: RecipientResult[] = [];
      let first = true;
      for (const group of groups.values()) {
        if (!first)
          await new Promise<void>((resolve, reject) => connection.reset((e) => (e ? reject(e) : resolve())));
        first = false;
        results.push(...(await this.transaction(connection, request, group, remoteMta)));
      }
      connection.quit();
      return { kind: "done", results };
    } catch (error) {
      connection.close();
      const e = error as SMTPConnection.SMTPError;
      return {
        kind: "retry-next",
        results: all("deferred", 451, "4.4.2", `${hop.name}: connection lost (${oneLine(e.message)})`),
      };
    }
  }

  private transaction(
    connection: SMTPConnection,
    request: DeliveryRequest,
    recipients: DeliveryRequest["recipients"],
    remoteMta: string,
  ): Promise<RecipientResult[]> {
    const first = recipients[0]!;
    const dsn: SMTPConnection.DSNOptions = {};
    if (request.params.RET) dsn.ret = request.params.RET.toUpperCase() === "FULL" ? "Full" : "HDRS";
    if (request.params.ENVID) dsn.envid = request.params.ENVID;
    if (first.params.NOTIFY) dsn.notify = first.params.NOTIFY.split(",") as SMTPConnection.DSNOption[];
    if (first.params.ORCPT) dsn.orcpt = first.params.ORCPT;
    const envelope: SMTPConnection.Envelope = {
      from: request.mailFrom,
      to: recipients.map((r) => r.address),
      size: request.message.length,
      use8BitMime: (request.params.BODY ?? "").toUpperCase() === "8BITMIME",
      ...(Object.keys(dsn).length > 0 ? { dsn } : {}),
    };
    const result = (
      r: { address: string },
      outcome: Outcome,
      code: number,
      reply: string,
    ): RecipientResult => ({
      address: r.address,
      outcome,
      code,
      enhanced: enhancedOf(reply, code),
      message: oneLine(reply),
      remoteMta,
    });
    return new Promise((resolve, reject) => {
      connection.send(envelope, request.message, (error, info) => {
        if (error) {
          const code = error.responseCode ?? 0;
          const reply = error.response ?? error.message;
          // A reply to MAIL FROM or DATA speaks for every recipient of the transaction.
          if (code >= 400) {
            const outcome = code >= 500 ? "failed" : "deferred";
            const perRecipient = (error as { rejectedErrors?: SMTPConnection.SMTPError[] }).rejectedErrors;
            const rejected = new Map(
              (perRecipient ?? []).map((e) => [String((e as { recipient?: string }).recipient ?? ""), e]),
            );
            resolve(
              recipients.map((r) => {
                const own = rejected.get(r.address);
                if (own?.responseCode) {
                  return result(
                    r,
                    own.responseCode >= 500 ? "failed" : "deferred",
                    own.responseCode,
                    own.response ?? "",
                  );
                }
                return result(r, outcome, code, reply);
              }),
            );
            return;
          }
          if (error.code === "EMESSAGE") {
            resolve(recipients.map((r) => result(r, "failed", 552, `552 5.3.4 ${error.message}`)));
            return;
          }
          reject(error);
          return;
        }
        const rejected = new Map(
          (info.rejectedErrors ?? []).map((e) => [String((e as { recipient?: string }).recipient ?? ""), e]),
        );
        resolve(
          recipients.map((r) => {
            if (info.accepted.includes(r.address)) return result(r, "delivered", 250, info.response);
            const e = rejected.get(r.address);
            const code = e?.responseCode ?? 451;
            return result(r, code >= 500 ? "failed" : "deferred", code, e?.response ?? "rejected");
          }),
        );
      });
    });
  }
}

const MIN_TLS_VERSION = "TLSv1.2";

/** OpenSSL's certificate verification results as Node reports them (docs: "X509 certificate error codes"). */
const CERTIFICATE_ERRORS = new Set([
  "UNABLE_TO_GET_ISSUER_CERT",
  "UNABLE_TO_GET_CRL",
  "UNABLE_TO_DECRYPT_CERT_SIGNATURE",
  "UNABLE_TO_DECRYPT_CRL_SIGNATURE",
  "UNABLE_TO_DECODE_ISSUER_PUBLIC_KEY",
  "CERT_SIGNATURE_FAILURE",
  "CRL_SIGNATURE_FAILURE",
  "CERT_NOT_YET_VALID",
  "CERT_HAS_EXPIRED",
  "CRL_NOT_YET_VALID",
  "CRL_HAS_EXPIRED",
  "ERROR_IN_CERT_NOT_BEFORE_FIELD",
  "ERROR_IN_CERT_NOT_AFTER_FIELD",
  "ERROR_IN_CRL_LAST_UPDATE_FIELD",
  "ERROR_IN_CRL_NEXT_UPDATE_FIELD",
  "DEPTH_ZERO_SELF_SIGNED_CERT",
  "SELF_SIGNED_CERT_IN_CHAIN",
  "UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
  "UNABLE_TO_VERIFY_LEAF_SIGNATURE",
  "CERT_CHAIN_TOO_LONG",
  "CERT_REVOKED",
  "INVALID_CA",
  "PATH_LENGTH_EXCEEDED",
  "INVALID_PURPOSE",
  "CERT_UNTRUSTED",
  "CERT_REJECTED",
  "HOSTNAME_MISMATCH",
]);

/** Why the server's certificate was refused, or undefined when `error` is not a verification failure. */
function certificateFailure(error: Error, name: string): string | undefined {
  // nodemailer files socket errors under its own code (ESOCKET) and keeps Node's as originalCode.
  const { code, originalCode } = error as { code?: string; originalCode?: string };
  const nodeCode = originalCode ?? code ?? "";
  if (nodeCode === "ERR_TLS_CERT_ALTNAME_INVALID") {
    const reason = (error as { reason?: string }).reason ?? error.message;
    return `certificate of ${name} does not match that name (${oneLine(reason)})`;
  }
  if (CERTIFICATE_ERRORS.has(nodeCode))
    return `certificate of ${name} not trusted (${oneLine(error.message)})`;
  return undefined;
}

function shuffleWithinPriority<T extends { priority: number }>(list: T[]): T[] {
  const copy = [...list];
  for (let i = copy.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy;
}

/** The enhanced status in a reply ("550 5.1.1 …"), or one derived from the code. */
export function enhancedOf(reply: string, code: number): string {
  const found = /^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b/.exec(reply.trim());
  if (found) return found[1]!;
  if (code >= 500) return "5.0.0";
  if (code >= 400) return "4.0.0";
  return "2.0.0";
}

function oneLine(text: string): string {
  return text.replace(/\s*\r?\n\s*/g, " ").slice(0, 500);
}

/** nodemailer's SMTP client, loaded the first time the edge speaks SMTP itself (delivering, or handing a
 * DSN to home) rather than at start: an edge that only relays never needs it. */
export async function loadSmtpConnection(): Promise<typeof SMTPConnection> {
  return (await import("nodemailer/lib/smtp-connection")).default;
}

/** Connects (greeting, EHLO, STARTTLS as configured); nodemailer reports failures only as "error". */
export function connectSmtp(connection: SMTPConnection): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onError = (error: Error) => reject(error);
    connection.once("error", onError);
    connection.connect(() => {
      connection.off("error", onError);
      resolve();
    });
  });
}
