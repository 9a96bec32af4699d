// Backup MX: when a session cannot be spliced live to home, the edge answers it itself and spools
// the message, sealed to home's spool key. All policy lives in smtp-server's hooks: RCPT only for
// paired homes' domains and synced recipients, SIZE = home's Postfix limit, SMTP smuggling refused
// (bare CR, bare LF, NUL), and `250` only after the file is durable.
import { randomBytes } from "node:crypto";
import type net from "node:net";
import {
  decodeKey,
  type EdgeConfig,
  EphemeralKeyPool,
  greetWithoutDelay,
  KeyedRateLimiter,
  LineEndingScanner,
  type Logger,
  type SpoolFileOpener,
  SpoolFileWriter,
  SpoolSealer,
} from "@mxtunnel/shared";
import { SMTPServer, type SMTPServerDataStream, type SMTPServerSession } from "smtp-server";
import type { RecipientStore } from "./recipients.js";
import { AnswerCache, type DnsResolve, resolverFor, SenderAuthCheck } from "./sender-auth.js";
import type { SpoolStore } from "./spool-store.js";
import type { EdgeState, HomeRecord } from "./state.js";

export interface SpoolServerOptions {
  config: EdgeConfig;
  state: EdgeState;
  store: SpoolStore;
  recipients: RecipientStore;
  tls: { key: Buffer; cert: Buffer };
  logger: Logger;
  /** Called after a message is committed, so the drain can start. */
  onSpooled: () => void;
  /** Fault injection for tests (ENOSPC): replaces fs/promises open for spool files. */
  openFile?: SpoolFileOpener;
}

/**
 * Deadlines of their own for a spool session, on top of the idle timeout (which any byte resets, so
 * a client trickling one byte a minute never trips it) and the session cap.
 */
export interface SpoolDeadlines {
  /** From the first byte of a command line to its line end. A line is at most 512 octets. */
  commandMs: number;
  /** From the DATA command to the final dot. */
  dataMs: number;
  /**
   * After the client's FIN the edge ends its side at once: smtp-server writes no reply to a socket
   * that is no longer open both ways, so waiting would only hold the session's memory and its
   * connection slot (a message already received in full is still committed). This is how long the
   * end may take (a client that does not read what was written before its FIN) before the
   * connection is destroyed.
   */
  halfCloseMs: number;
}

/** See SpoolDeadlines.halfCloseMs; the other two come from `spool.commandTimeout` / `spool.dataTimeout`. */
const HALF_CLOSE_MS = 5_000;

/** An SMTP reply as an error smtp-server sends verbatim. */
function reply(code: number, text: string): Error & { responseCode: number } {
  return Object.assign(new Error(text), { responseCode: code });
}

interface SessionState {
  home?: HomeRecord;
}

export class SpoolServer {
  private readonly smtp: SMTPServer;
  private readonly perIp: KeyedRateLimiter;
  private readonly sessions = new WeakMap<SMTPServerSession, SessionState>();
  private readonly sizes = new Map<string, number>();
  private readonly resolve: DnsResolve;
  private readonly unsignedOutcomes = new AnswerCache();
  private readonly spoolKeys = new Map<string, Uint8Array>();
  /** Files sealed within a second share an ephemeral key agreement (each keeps its own body key). */
  private readonly ephemeralKeys = new EphemeralKeyPool();
  readonly counters = {
    sessions: 0,
    spooled: 0,
    refusedRcpt: 0,
    smuggling: 0,
    writeErrors: 0,
    deadlines: 0,
  };
  /** From `spool.commandTimeout` / `spool.dataTimeout`; mutable so tests can shorten them further. */
  deadlines: SpoolDeadlines;
  private readonly clocks = new Map<string, SessionClock>();

  constructor(private readonly options: SpoolServerOptions) {
    const { config } = options;
    this.deadlines = {
      commandMs: config.spool.commandTimeout,
      dataMs: config.spool.dataTimeout,
      halfCloseMs: HALF_CLOSE_MS,
    };
    this.resolve = resolverFor(config.dnsServers);
    this.perIp = new KeyedRateLimiter(
      config.spool.messagesPerIpPerMinute / 60,
      config.spool.messagesPerIpPerMinute,
    );
    this.smtp = new SMTPServer({
      name: config.hostname,
      banner: "backup MX",
      key: options.tls.key,
      cert: options.tls.cert,
      disabledCommands: ["AUTH"],
      // Postfix at home resolves the client itself; a slow resolver here would only delay the banner.
      disableReverseLookup: true,
      authOptional: true,
      size: config.spool.defaultMessageSizeLimit,
      // DSN (RFC 3461), as Postfix at home offers it: smtp-server checks RET, NOTIFY and ORCPT's
      // syntax (501 otherwise), dsnParamProblem the lengths; the spool header keeps them for home's
      // Postfix and for the edge's own DSNs.
      hideDSN: false,
      socketTimeout: config.limits.idleTimeout,
      closeTimeout: 1000,
      logger: false,
      onConnect: (session, callback) => {
        this.counters.sessions++;
        callback();
        void session;
      },
      // After STARTTLS the plaintext is read from the TLS socket: the clock watches that one now.
      onSecure: (socket, session, callback) => {
        this.clocks.get(session.id)?.watch(socket);
        callback();
      },
      onMailFrom: (address, session, callback) => {
        const problem = dsnParamProblem(address.args, "ENVID", 100);
        if (problem) {
          callback(reply(501, problem));
          return;
        }
        this.sessions.set(session, {});
        if (!this.perIp.take(session.remoteAddress)) {
          callback(reply(421, "4.7.0 Too many messages from your address, try again later"));
          return;
        }
        callback();
      },
      onRcptTo: (address, session, callback) => {
        const problem = dsnParamProblem(address.args, "ORCPT", 500);
        if (problem) {
          callback(reply(501, problem));
          return;
        }
        try {
          this.checkRecipient(address.address, session);
          callback();
        } catch (error) {
          this.counters.refusedRcpt++;
          callback(error as Error);
        }
      },
      onData: (stream, session, callback) => {
        const clock = this.clocks.get(session.id);
        clock?.dataStarted();
        stream.once("end", () => clock?.dataEnded());
        this.receive(stream, session).then(
          (id) => callback(null, `2.0.0 Ok: queued as ${id} (backup MX)`),
          (error: Error) => callback(error),
        );
      },
    });
    if (!greetWithoutDelay(this.smtp)) {
      options.logger.warn("smtp-server internals changed: spool sessions greet after its 100 ms pause");
    }
    this.smtp.on("error", (error) => options.logger.debug({ err: error.message }, "spool session error"));
  }

  /** Takes over a connection the live path could not serve. */
  accept(socket: net.Socket): void {
    const id = randomBytes(8).toString("hex");
    // smtp-server's STARTTLS upgrade calls removeAllListeners() on the raw socket: the listener's own
    // 'close' bookkeeping (connection counts per IP and in total, the session timer) would go with it,
    // and every TLS session would hold a connection slot forever.
    keepListenersAcrossUpgrade(socket);
    const clock = new SessionClock(this.deadlines, this.options.config.hostname, () => {
      this.counters.deadlines++;
    });
    this.clocks.set(id, clock);
    socket.once("close", () => {
      clock.stop();
      this.clocks.delete(id);
    });
    this.smtp.connect(socket, {
      id,
      remoteAddress: socket.remoteAddress,
      remotePort: socket.remotePort,
    } as never);
    socket.resume();
    clock.watch(socket);
  }

  /** The SIZE a home's Postfix accepts (reported by home over CONTROL). */
  setMessageSizeLimit(homeKey: string, bytes: number): void {
    this.sizes.set(homeKey, bytes);
    // One edge usually serves one home; announce the smallest limit of the paired homes.
    const known = this.options.state
      .homes()
      .map((h) => this.sizes.get(h.publicKey) ?? this.options.config.spool.defaultMessageSizeLimit);
    (this.smtp.options as { size?: number }).size = Math.min(...known);
  }

  private checkRecipient(address: string, session: SMTPServerSession): void {
    const { config, state, recipients } = this.options;
    const at = address.lastIndexOf("@");
    const domain = at > 0 ? address.slice(at + 1).toLowerCase() : "";
    // A bare domain match only: no source routes, % hacks or literals reach this point as ours.
    const home = state.homes().find((h) => h.domains.includes(domain));
    if (!home || !/^[^@\s"%!]+@[a-z0-9.-]+$/i.test(address)) {
      throw reply(550, "5.7.1 Relaying denied: not a domain this server accepts mail for");
    }
    const current = this.sessions.get(session) ?? {};
    if (current.home && current.home.publicKey !== home.publicKey) {
      throw reply(452, "4.5.3 Too many recipients for one transaction: send the rest separately");
    }
    if (session.envelope.rcptTo.length >= config.spool.maxRecipients) {
      throw reply(452, "4.5.3 Too many recipients");
    }
    switch (recipients.check(home.publicKey, address)) {
      case "accept":
        break;
      case "unknown":
        throw reply(550, "5.1.1 Recipient address rejected: user unknown");
      case "no-list":
        throw reply(450, "4.3.2 Recipient list not synced yet, try again later");
      case "stale":
        throw reply(450, "4.3.2 Recipient list is out of date, try again later");
    }
    current.home = home;
    this.sessions.set(session, current);
  }

  /** A home's spool key, decoded once (its key object is then imported once too). */
  private spoolKey(encoded: string): Uint8Array {
    let key = this.spoolKeys.get(encoded);
    if (!key) {
      key = decodeKey(encoded, "spool key");
      this.spoolKeys.set(encoded, key);
    }
    return key;
  }

  private async receive(stream: SMTPServerDataStream, session: SMTPServerSession): Promise<string> {
    const { store, logger } = this.options;
    const home = this.sessions.get(session)?.home;
    if (!home) {
      stream.resume();
      await new Promise((resolve) => stream.once("end", resolve));
      throw reply(503, "5.5.1 No valid recipients");
    }
    const id = `${Date.now().toString(36)}-${randomBytes(6).toString("hex")}`;
    const mailFrom = session.envelope.mailFrom;
    const sealer = new SpoolSealer({
      spoolPublicKey: this.spoolKey(home.spoolPublicKey),
      id,
      receivedAt: new Date(),
      envelope: {
        mailFrom: mailFrom ? mailFrom.address : "",
        mailParams: stringParams(mailFrom ? mailFrom.args : undefined),
        rcptTo: session.envelope.rcptTo.map((r) => ({ address: r.address, params: stringParams(r.args) })),
      },
      client: {
        address: session.remoteAddress,
        port: session.remotePort,
        helo: session.hostNameAppearsAs ?? "",
        tls: Boolean(session.secure),
      },
      extra: { homeKey: home.publicKey },
      ephemeralKeys: this.ephemeralKeys,
    });
    const lineEndings = new LineEndingScanner();
    const auth = new SenderAuthCheck({
      ip: session.remoteAddress,
      helo: session.hostNameAppearsAs ?? "",
      sender: mailFrom ? mailFrom.address : "",
      mta: this.options.config.hostname,
      resolve: this.resolve,
      timeoutMs: 15_000,
      unsignedOutcomes: this.unsignedOutcomes,
    });
    let writer: SpoolFileWriter | undefined;
    try {
      writer = await SpoolFileWriter.create(store.dir, sealer, {
        tmpDir: store.tmpDir,
        ...(this.options.openFile ? { open: this.options.openFile } : {}),
      });
      // The data stream read directly: a pipeline through a Transform cost an AbortController and a
      // stream per message.
      for await (const chunk of stream as AsyncIterable<Buffer>) {
        lineEndings.scan(chunk);
        auth.write(chunk);
        await writer.write(chunk);
      }
      lineEndings.finish();
      auth.end();
      if (stream.sizeExceeded) throw reply(552, "5.3.4 Message size exceeds the fixed limit");
      if (lineEndings.violation) {
        this.counters.smuggling++;
        logger.warn(
          { id, client: session.remoteAddress, violation: lineEndings.violation },
          "message refused: SMTP smuggling guard",
        );
        throw reply(550, `5.6.0 Message refused: ${lineEndings.violation} in message data`);
      }
      const committed = await writer.commit();
      store.register(committed.path, sealer.header, committed.fileSize);
      // Not awaited: DNS must not hold the 250. Until the verdict is stored the message counts
      // as unauthenticated (quarantine, never a DSN), which is the safe side.
      void auth.result.then((verdict) => (verdict ? store.setAuth(id, verdict) : undefined)).catch(() => {});
      this.counters.spooled++;
      logger.info(
        {
          id,
          client: session.remoteAddress,
          rcpt: session.envelope.rcptTo.length,
          size: sealer.plaintextLength,
        },
        "spooled",
      );
      this.options.onSpooled();
      return id;
    } catch (error) {
      auth.end();
      await writer?.abort().catch(() => {});
      // Drain what the client still sends, so the reply comes after its final dot.
      stream.resume();
      if ((error as { responseCode?: number }).responseCode) throw error;
      this.counters.writeErrors++;
      logger.error({ id, err: (error as Error).message }, "could not write the spool file: answering 451");
      throw reply(451, "4.3.0 Temporary local problem storing the message, try again later");
    }
  }
}

/** Parameters as the spool header keeps them: names upper-case, RET and NOTIFY values too. */
function stringParams(args: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (args && typeof args === "object") {
    for (const [key, value] of Object.entries(args as Record<string, unknown>)) {
      const name = key.toUpperCase();
      const text = value === true ? "" : String(value);
      out[name] = name === "RET" || name === "NOTIFY" ? text.toUpperCase() : text;
    }
  }
  return out;
}

/**
 * ENVID and ORCPT (xtext, already decoded by smtp-server, which refuses control characters) must be
 * printable US-ASCII and at most 100 and 500 characters (RFC 3461 §4.4, §4.2): they go into DSNs and
 * home's MAIL/RCPT commands. Returns the reply text for a bad one.
 */
function dsnParamProblem(args: unknown, name: "ENVID" | "ORCPT", maxLength: number): string | undefined {
  const value = args && typeof args === "object" ? (args as Record<string, unknown>)[name] : undefined;
  if (typeof value !== "string") return undefined;
  if (value.length > maxLength) return `5.5.4 ${name} parameter longer than ${maxLength} characters`;
  if (!/^[\x20-\x7e]+$/.test(value)) return `5.5.4 ${name} parameter must be printable US-ASCII`;
  return undefined;
}

/**
 * Keeps the listeners a socket had when it was handed to smtp-server across its STARTTLS upgrade,
 * which strips every listener from the raw socket (including other owners' 'close' handlers).
 */
function keepListenersAcrossUpgrade(socket: net.Socket): void {
  const kept = socket
    .eventNames()
    .map((event) => ({ event, listeners: socket.rawListeners(event) as ((...args: unknown[]) => void)[] }));
  const removeAll = socket.removeAllListeners.bind(socket);
  socket.removeAllListeners = ((event?: string | symbol) => {
    removeAll(event);
    for (const entry of kept) {
      if (event !== undefined && event !== entry.event) continue;
      for (const listener of entry.listeners) (socket as NodeJS.EventEmitter).on(entry.event, listener);
    }
    return socket;
  }) as typeof socket.removeAllListeners;
}

/**
 * Watches one spool session's plaintext (the raw socket, then the TLS socket after STARTTLS): a
 * command line must end within commandMs of its first byte, DATA within dataMs. Past a deadline: 421
 * and the connection closes. The client's FIN ends the session (see SpoolDeadlines.halfCloseMs).
 */
class SessionClock {
  private socket: net.Socket | undefined;
  private partialLine = false;
  private inData = false;
  private lineTimer: NodeJS.Timeout | undefined;
  private dataTimer: NodeJS.Timeout | undefined;
  private halfCloseTimer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    private readonly deadlines: SpoolDeadlines,
    private readonly hostname: string,
    private readonly onExpired: () => void,
  ) {}

  watch(socket: net.Socket): void {
    this.socket?.off("data", this.onBytes);
    this.socket?.off("end", this.onEnd);
    this.socket = socket;
    this.partialLine = false;
    clearTimeout(this.lineTimer);
    this.lineTimer = undefined;
    socket.on("data", this.onBytes);
    socket.once("end", this.onEnd);
  }

  dataStarted(): void {
    this.inData = true;
    clearTimeout(this.lineTimer);
    this.lineTimer = undefined;
    this.partialLine = false;
    this.dataTimer = setTimeout(
      () => this.expire("message data not completed in time"),
      this.deadlines.dataMs,
    );
    this.dataTimer.unref();
  }

  dataEnded(): void {
    this.inData = false;
    clearTimeout(this.dataTimer);
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.lineTimer);
    clearTimeout(this.dataTimer);
    clearTimeout(this.halfCloseTimer);
    this.socket?.off("data", this.onBytes);
  }

  private readonly onBytes = (chunk: Buffer): void => {
    if (this.inData || this.stopped) return;
    const lf = chunk.lastIndexOf(0x0a);
    if (lf >= 0) {
      clearTimeout(this.lineTimer);
      this.lineTimer = undefined;
      this.partialLine = lf < chunk.length - 1;
    } else if (chunk.length > 0) {
      this.partialLine = true;
    }
    if (this.partialLine && !this.lineTimer) {
      this.lineTimer = setTimeout(
        () => this.expire("command line not completed in time"),
        this.deadlines.commandMs,
      );
      this.lineTimer.unref();
    }
  };

  private readonly onEnd = (): void => {
    if (this.stopped) return;
    const socket = this.socket;
    if (!socket) return;
    // What smtp-server wrote before the FIN arrived still goes out; then the connection closes.
    socket.end();
    this.halfCloseTimer = setTimeout(() => socket.destroy(), this.deadlines.halfCloseMs);
    this.halfCloseTimer.unref();
  };

  private expire(why: string): void {
    if (this.stopped) return;
    this.onExpired();
    const socket = this.socket;
    this.stop();
    if (!socket || socket.destroyed) return;
    socket.end(`421 4.4.2 ${this.hostname} ${why}, closing connection\r\n`);
    setTimeout(() => socket.destroy(), 1000).unref();
  }
}
