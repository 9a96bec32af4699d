// The outbound relay listener: Postfix's relayhost. An smtp-server that takes mail only from this
// home's domains (envelope sender and header From; <> for bounces), within the recipient, size and
// hourly limits, hands each message to a connected edge on a `relay` stream and answers 250 only
// once the edge's RESULT says it is queued durably. No edge, a lost tunnel or no RESULT in time:
// 451 4.4.1, so Postfix keeps the message and tries again.
//
// The relay id is the first 128 bits of SHA-256 over the envelope and the message: when Postfix
// resends after a lost reply it sends the same bytes, so the edge recognises the id and does not
// send the message twice.
import { createHash, timingSafeEqual } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import {
  formatHostPort,
  greetWithoutDelay,
  type HostPort,
  type Logger,
  type MuxStream,
  ResetCode,
  smugglingViolation,
  TokenBucket,
  writeFileAtomic,
} from "@mxtunnel/shared";
import addressparser from "nodemailer/lib/addressparser";
import {
  SMTPServer,
  type SMTPServerAddress,
  type SMTPServerDataStream,
  type SMTPServerSession,
} from "smtp-server";
import type { EdgeLink } from "./edge-link.js";

export interface RelayLimits {
  maxRecipients: number;
  maxMessageSize: number;
  messagesPerHour: number;
}

export interface RelayListenerOptions {
  listen: HostPort;
  auth: { users: Record<string, string> } | null;
  limits: RelayLimits;
  /** ms to wait for the edge's RESULT after the message was sent. */
  timeoutMs: number;
  links: ReadonlyMap<string, EdgeLink>;
  logger: Logger;
  /** Home state directory: where the STARTTLS certificate lives when the listener is not on loopback. */
  dir: string;
}

/** RESULT of a relay stream (docs/protocol.md "relay streams"). */
export type RelayResult =
  | { status: "queued"; id: string; duplicate?: boolean }
  | { status: "rejected" | "deferred"; code: number; enhanced: string; message: string };

interface SmtpReply extends Error {
  responseCode: number;
}

function reply(code: number, enhanced: string, text: string): SmtpReply {
  return Object.assign(new Error(`${enhanced} ${text}`), { responseCode: code });
}

export function isLoopbackHost(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}

/** Whether `domain` is one of `domains` or below one of them (Postfix bounces come from mx.example.org). */
export function domainAllowed(domain: string, domains: readonly string[]): boolean {
  const d = domain.toLowerCase();
  return domains.some((allowed) => d === allowed || d.endsWith(`.${allowed}`));
}

function domainOf(address: string): string {
  const at = address.lastIndexOf("@");
  return at < 0 ? "" : address.slice(at + 1).toLowerCase();
}

/** The addresses in the message's From field; an error reply unless there is exactly one From field. */
export function headerFrom(message: Buffer): string[] {
  const end = message.indexOf("\r\n\r\n");
  const head = message.subarray(0, end < 0 ? message.length : end).toString("latin1");
  const fields = head.split(/\r\n(?![ \t])/).filter((line) => /^from\s*:/i.test(line));
  if (fields.length !== 1) {
    throw reply(
      550,
      "5.6.0",
      fields.length === 0 ? "message has no From header" : "more than one From header",
    );
  }
  const value = fields[0]!.slice(fields[0]!.indexOf(":") + 1).replace(/\r\n/g, "");
  const addresses = addressparser(value, { flatten: true })
    .map((a) => ("address" in a ? (a.address ?? "") : ""))
    .filter(Boolean);
  if (addresses.length === 0) throw reply(550, "5.6.0", "From header holds no address");
  return addresses;
}

/** ESMTP parameters as the relay meta carries them: upper-case keywords, text values ("" for a bare flag). */
function paramsOf(args: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (typeof args !== "object" || args === null) return out;
  for (const [key, value] of Object.entries(args)) {
    const name = key.toUpperCase();
    if (!/^[A-Z0-9-]{1,20}$/.test(name)) continue;
    out[name] = value === true ? "" : String(value);
  }
  return out;
}

/** 128-bit relay id over envelope and message (stable across Postfix's retries of the same message). */
export function relayId(mailFrom: string, rcptTo: readonly string[], message: Buffer): string {
  const hash = createHash("sha256");
  hash.update(`${mailFrom}\0${rcptTo.join("\0")}\0`);
  hash.update(message);
  return hash.digest("hex").slice(0, 32);
}

export class RelayListener {
  private server: SMTPServer | undefined;
  private readonly bucket: TokenBucket;
  readonly counters = { relayed: 0, duplicates: 0, refused: 0, deferred: 0 };

  constructor(private readonly options: RelayListenerOptions) {
    this.bucket = new TokenBucket(options.limits.messagesPerHour / 3600, options.limits.messagesPerHour);
  }

  /** The domains this home may send as: those of every paired edge. */
  private domains(): string[] {
    return [...new Set([...this.options.links.values()].flatMap((link) => link.edge.domains))];
  }

  async start(): Promise<AddressInfo> {
    const { listen, auth, limits } = this.options;
    const loopback = isLoopbackHost(listen.host);
    const tls = auth && !loopback ? await loadRelayCertificate(this.options.dir, listen.host) : undefined;
    const server = new SMTPServer({
      name: "mxtunnel-home",
      banner: "mxtunnel-home relay",
      size: limits.maxMessageSize,
      // Postfix keeps NOTIFY semantics up to this hop; the edge sends the failure DSNs after it.
      hideDSN: true,
      // Replies carry our own enhanced codes (451 4.4.1 …), not smtp-server's generic ones.
      hideENHANCEDSTATUSCODES: true,
      authOptional: auth === null,
      authMethods: ["PLAIN", "LOGIN"],
      // On loopback the session never leaves this machine; beyond it AUTH needs STARTTLS first.
      allowInsecureAuth: loopback,
      disabledCommands: auth === null ? ["AUTH", "STARTTLS"] : tls ? [] : ["STARTTLS"],
      ...(tls ?? {}),
      maxClients: 100,
      // The client is Postfix on this machine: a reverse lookup only adds latency to every session.
      disableReverseLookup: true,
      logger: false,
      onAuth: (credentials, _session, callback) => {
        const expected = auth?.users[credentials.username ?? ""];
        const given = Buffer.from(credentials.password ?? "");
        const ok =
          expected !== undefined &&
          given.length === Buffer.byteLength(expected) &&
          timingSafeEqual(given, Buffer.from(expected));
        if (!ok) {
          this.options.logger.warn({ user: credentials.username }, "relay AUTH failed");
          callback(reply(535, "5.7.8", "authentication failed"));
          return;
        }
        callback(null, { user: credentials.username });
      },
      onMailFrom: (address, _session, callback) => {
        const sender = address.address;
        if (sender !== "" && !domainAllowed(domainOf(sender), this.domains())) {
          this.counters.refused++;
          this.options.logger.warn({ sender }, "relay refused: sender not in this home's domains");
          callback(reply(550, "5.7.1", `sender <${sender}> is not in this home's domains`));
          return;
        }
        callback();
      },
      onRcptTo: (_address, session, callback) => {
        if (session.envelope.rcptTo.length >= limits.maxRecipients) {
          callback(reply(452, "4.5.3", `too many recipients (at most ${limits.maxRecipients})`));
          return;
        }
        callback();
      },
      onData: (stream, session, callback) => {
        this.onData(stream, session)
          .then((text) => callback(null, text))
          .catch((error: Error) => callback(error));
      },
    });
    if (!greetWithoutDelay(server)) {
      this.options.logger.warn("smtp-server internals changed: relay sessions greet after its 100 ms pause");
    }
    server.on("error", (error) => this.options.logger.warn({ err: error.message }, "relay listener error"));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(listen.port, listen.host, () => {
        server.off("error", reject);
        resolve();
      });
    });
    this.server = server;
    const address = server.server.address() as AddressInfo;
    this.options.logger.info(
      { listen: formatHostPort(listen), auth: auth !== null, starttls: tls !== undefined },
      "relay listener ready",
    );
    return address;
  }

  async stop(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }

  private async onData(stream: SMTPServerDataStream, session: SMTPServerSession): Promise<string> {
    const chunks: Buffer[] = [];
    for await (const chunk of stream) chunks.push(chunk as Buffer);
    if (stream.sizeExceeded) throw reply(552, "5.3.4", "message too big");
    const message = Buffer.concat(chunks);
    const hazard = smugglingViolation(message);
    if (hazard) {
      this.counters.refused++;
      this.options.logger.warn({ hazard }, "relay refused: SMTP smuggling guard");
      throw reply(550, "5.6.0", `message refused: ${hazard} in message data`);
    }
    const mailFrom = session.envelope.mailFrom ? session.envelope.mailFrom.address : "";
    const rcptTo = session.envelope.rcptTo.map((r: SMTPServerAddress) => ({
      address: r.address,
      params: paramsOf(r.args),
    }));
    const domains = this.domains();
    for (const address of headerFrom(message)) {
      if (!domainAllowed(domainOf(address), domains)) {
        this.counters.refused++;
        this.options.logger.warn({ from: address }, "relay refused: header From not in this home's domains");
        throw reply(550, "5.7.1", `header From <${address}> is not in this home's domains`);
      }
    }
    if (!this.bucket.take()) {
      this.counters.deferred++;
      throw reply(
        451,
        "4.7.1",
        `rate limit: more than ${this.options.limits.messagesPerHour} messages an hour`,
      );
    }
    const id = relayId(
      mailFrom,
      rcptTo.map((r) => r.address),
      message,
    );
    const meta = {
      id,
      mailFrom,
      rcptTo,
      params: paramsOf(session.envelope.mailFrom ? session.envelope.mailFrom.args : {}),
      size: message.length,
    };
    const result = await this.relay(meta, message, domainOf(mailFrom));
    const log = this.options.logger.child({ relayId: id });
    if (result.status === "queued") {
      if (result.duplicate) this.counters.duplicates++;
      this.counters.relayed++;
      log.info(
        { rcpt: rcptTo.length, size: message.length, duplicate: result.duplicate === true },
        "relayed",
      );
      return `2.0.0 queued on the edge as ${id}`;
    }
    if (result.status === "deferred") this.counters.deferred++;
    else this.counters.refused++;
    log.info({ status: result.status, code: result.code, reason: result.message }, "edge did not queue");
    throw reply(result.code, result.enhanced, result.message);
  }

  /** Sends one message on a relay stream; resolves with the edge's RESULT (or a 451 of our own). */
  private relay(
    meta: {
      id: string;
      mailFrom: string;
      rcptTo: { address: string; params: Record<string, string> }[];
      params: Record<string, string>;
      size: number;
    },
    message: Buffer,
    senderDomain: string,
  ): Promise<RelayResult> {
    const tempFail = (why: string): RelayResult => ({
      status: "deferred",
      code: 451,
      enhanced: "4.4.1",
      message: why,
    });
    const connected = [...this.options.links.values()].filter(
      (link) => link.status().connected && link.currentMux,
    );
    // An edge bound to the sender's domain first; bounces (<>) may leave through any.
    const link =
      connected.find((l) => senderDomain !== "" && domainAllowed(senderDomain, l.edge.domains)) ??
      connected[0];
    const mux = link?.currentMux;
    if (!mux || mux.closed) return Promise.resolve(tempFail("no tunnel to the edge; try again later"));
    let stream: MuxStream;
    try {
      stream = mux.open("relay", meta);
    } catch {
      return Promise.resolve(tempFail("the tunnel to the edge closed; try again later"));
    }
    return new Promise<RelayResult>((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      let settled = false;
      const settle = (result: RelayResult, abandon = false) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        // Given up on our side: the edge learns it, and queues nothing if it had not yet.
        if (abandon && !stream.destroyed) stream.reset(ResetCode.CANCEL, "home gave up waiting");
        resolve(result);
      };
      stream.on("result", (value: unknown) =>
        settle(parseResult(value, meta.id) ?? tempFail("the edge sent a malformed RESULT")),
      );
      stream.on("reset", (_code: number, reason: string) =>
        settle(tempFail(`the edge reset the relay stream (${reason})`)),
      );
      stream.on("close", () => settle(tempFail("the tunnel closed before the edge answered")));
      stream.on("error", () => settle(tempFail("the relay stream failed")));
      stream.resume();
      stream.end(message, () => {
        // The clock runs from the last byte handed over: a slow uplink is not a dead edge.
        if (!settled)
          timer = setTimeout(
            () => settle(tempFail("the edge did not answer in time"), true),
            this.options.timeoutMs,
          );
      });
    });
  }
}

function parseResult(value: unknown, id: string): RelayResult | undefined {
  if (typeof value !== "object" || value === null) return undefined;
  const r = value as Record<string, unknown>;
  if (r.status === "queued")
    return r.id === id ? { status: "queued", id, duplicate: r.duplicate === true } : undefined;
  if (r.status !== "rejected" && r.status !== "deferred") return undefined;
  const code = Number(r.code);
  const enhanced =
    typeof r.enhanced === "string" && /^[45]\.\d{1,3}\.\d{1,3}$/.test(r.enhanced) ? r.enhanced : undefined;
  const message = typeof r.message === "string" ? r.message.replace(/[\r\n]+/g, " ").slice(0, 400) : "";
  // The class must match the status: a 2xx or a 5xx "deferred" from the edge is not believed.
  const valid = r.status === "rejected" ? code >= 500 && code <= 599 : code >= 400 && code <= 499;
  if (!valid || !enhanced || enhanced[0] !== String(code)[0]) return undefined;
  return { status: r.status, code, enhanced, message };
}

/** STARTTLS certificate for a relay listener beyond loopback (self-signed; Postfix need not verify it). */
async function loadRelayCertificate(dir: string, host: string): Promise<{ key: Buffer; cert: Buffer }> {
  const paths = { key: join(dir, "relay-tls-key.pem"), cert: join(dir, "relay-tls-cert.pem") };
  try {
    return { key: await readFile(paths.key), cert: await readFile(paths.cert) };
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
  // Loaded here, not at start: selfsigned (node-forge) is only needed the once a certificate is made.
  const { generate } = await import("selfsigned");
  const pems = await generate([{ name: "commonName", value: host }], {
    keySize: 2048,
    algorithm: "sha256",
    notAfterDate: new Date(Date.now() + 10 * 365 * 24 * 3600_000),
  });
  await writeFileAtomic(paths.key, pems.private, { mode: 0o600 });
  await writeFileAtomic(paths.cert, pems.cert, { mode: 0o644 });
  return { key: Buffer.from(pems.private), cert: Buffer.from(pems.cert) };
}

/**
 * Starts the relay listener for a running home. A listen address in use (another relay, an old
 * agent still stopping) does not take inbound mail down with it: the error is logged and binding is
 * retried with backoff until it succeeds or the agent stops. Any other error is thrown.
 */
export async function startRelayListener(options: RelayListenerOptions): Promise<{
  listener: RelayListener;
  stop(): Promise<void>;
}> {
  const listener = new RelayListener(options);
  let stopped = false;
  let timer: NodeJS.Timeout | undefined;
  let delay = 1000;
  const attempt = async (): Promise<void> => {
    try {
      await listener.start();
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EADDRINUSE") throw error;
      options.logger.error(
        { listen: formatHostPort(options.listen), retryInMs: delay },
        "relay listener address in use: outbound mail from Postfix is not accepted until it is free",
      );
      if (stopped) return;
      timer = setTimeout(() => {
        if (!stopped)
          attempt().catch((e: Error) => options.logger.error({ err: e.message }, "relay listener failed"));
      }, delay);
      timer.unref();
      delay = Math.min(30_000, delay * 2);
    }
  };
  await attempt();
  return {
    listener,
    stop: async () => {
      stopped = true;
      clearTimeout(timer);
      await listener.stop();
    },
  };
}
