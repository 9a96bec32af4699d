// Receives spooled messages from the edge (`spool` streams), opens them with the spool key —
// every chunk verified before its bytes go on — and hands them to Postfix's tunnel-facing port as
// if the original client were connecting: PROXY header with its address, EHLO with its HELO.
// Postfix's verdict goes back as RESULT, per recipient when it took the message for only some; what
// was delivered is logged durably first (the id, or each delivered recipient), so neither a lost
// RESULT nor a retry for the recipients Postfix deferred ever delivers to anyone twice.
import net from "node:net";
import { Readable } from "node:stream";
import { domainToASCII } from "node:url";
import {
  encodeProxyV1,
  encodeProxyV2,
  type KeyPair,
  keyFingerprint,
  type Logger,
  type MuxStream,
  parseNotify,
  parseSpoolHeader,
  proxyAddresses,
  ResetCode,
  type SpoolHeader,
  SpoolOpener,
} from "@mxtunnel/shared";
import nodemailer from "nodemailer";
import { type InjectedLog, recipientKey } from "./injected-log.js";
import type { ServiceTarget } from "./service-connector.js";

export interface SpoolInjectorOptions {
  spoolKeyPair: KeyPair;
  /** Every spool key home holds, current first (after a rotation, old ones until drained). */
  spoolKeys?: () => readonly KeyPair[];
  inject: ServiceTarget;
  log: InjectedLog;
  logger: Logger;
}

export interface InjectResult {
  status: "delivered" | "deferred" | "rejected" | "corrupt";
  duplicate?: boolean;
  code?: number;
  message?: string;
  accepted?: string[];
  rejected?: string[];
  /** Postfix's reply for each recipient it refused (4xx: the edge retries them, 5xx: never). */
  refused?: RecipientRefusal[];
}

export interface RecipientRefusal {
  recipient: string;
  /** Postfix's reply code; none when the connection failed before a reply. */
  code?: number;
  message: string;
}

type Recipient = SpoolHeader["envelope"]["rcptTo"][number];

export class SpoolInjector {
  readonly counters = { delivered: 0, duplicates: 0, deferred: 0, rejected: 0, corrupt: 0 };

  constructor(private readonly options: SpoolInjectorOptions) {}

  handle(stream: MuxStream): void {
    stream.on("error", () => {});
    const headerLength = Number(stream.meta.headerLength);
    if (!Number.isSafeInteger(headerLength) || headerLength <= 0 || headerLength > MAX_HEADER) {
      this.options.logger.warn("spool stream without a valid header length refused");
      stream.reset(ResetCode.REFUSED, "bad spool header length");
      return;
    }
    stream.accept();
    // Every listener is attached here, once: the stream carries the header's bytes, then the
    // sealed chunks, then END, and all of it may arrive in one burst.
    const headerChunks: Buffer[] = [];
    let headerBytes = 0;
    let job: Injection | undefined;
    let failed: InjectResult | undefined;
    const finish = (result: InjectResult) => {
      this.counters[result.duplicate ? "duplicates" : result.status]++;
      if (!stream.destroyed) {
        stream.sendResult(result);
        stream.end();
      }
    };
    stream.on("data", (chunk: Buffer) => {
      if (failed) return;
      if (job) {
        job.cipher(chunk);
        return;
      }
      headerChunks.push(chunk);
      headerBytes += chunk.length;
      if (headerBytes < headerLength) return;
      const all = Buffer.concat(headerChunks);
      let header: SpoolHeader;
      try {
        header = parseSpoolHeader(JSON.parse(all.subarray(0, headerLength).toString("utf8")));
      } catch (error) {
        this.options.logger.warn({ err: (error as Error).message }, "spool stream with a bad header refused");
        failed = { status: "corrupt", message: (error as Error).message };
        return;
      }
      job = this.start(header, stream.meta.recipients);
      const rest = all.subarray(headerLength);
      if (rest.length) job.cipher(rest);
    });
    stream.once("end", () => {
      if (failed) return finish(failed);
      if (!job) return finish({ status: "corrupt", message: "the stream ended inside the spool header" });
      job.end();
      void job.result.then(finish);
    });
    stream.once("close", () => job?.abort());
  }

  /** Starts injecting one message; the caller feeds it the sealed bytes as they arrive. */
  private start(header: SpoolHeader, only: unknown): Injection {
    const { log, logger } = this.options;
    const slog = logger.child({ id: header.id });
    const pending = log.has(header.id)
      ? []
      : requestedRecipients(header, only).filter((r) => !log.has(recipientKey(header.id, r.address)));
    if (pending.length === 0) {
      // Delivered before; the edge never heard. Discard the bytes and say so.
      slog.info("spooled message already delivered earlier; acknowledging again");
      return {
        cipher: () => {},
        end: () => {},
        abort: () => {},
        result: Promise.resolve({ status: "delivered", duplicate: true }),
      };
    }
    let opener: SpoolOpener;
    try {
      const keys = this.options.spoolKeys?.() ?? [this.options.spoolKeyPair];
      // The file names the key it was sealed to; with none of ours matching, the opener says so.
      const key = keys.find((pair) => keyFingerprint(pair.publicKey) === header.spoolKeyId) ?? keys[0]!;
      opener = new SpoolOpener(header, key);
    } catch (error) {
      slog.error({ err: (error as Error).message }, "cannot open spooled message (wrong spool key?)");
      const result: InjectResult = { status: "corrupt", message: (error as Error).message };
      return { cipher: () => {}, end: () => {}, abort: () => {}, result: Promise.resolve(result) };
    }
    let corrupt: Error | undefined;
    const plaintext = new Readable({ read() {} });
    const fail = (error: Error) => {
      corrupt ??= error;
      plaintext.destroy(error);
    };
    return {
      cipher: (chunk) => {
        if (corrupt) return;
        try {
          const out = opener.update(chunk);
          if (out.length) plaintext.push(out);
        } catch (error) {
          fail(error as Error);
        }
      },
      end: () => {
        if (corrupt) return;
        try {
          const out = opener.final();
          if (out.length) plaintext.push(out);
          plaintext.push(null);
        } catch (error) {
          fail(error as Error);
        }
      },
      abort: () => {
        if (!plaintext.readableEnded && !corrupt) plaintext.destroy(new Error("tunnel closed mid-message"));
      },
      result: this.deliver(header, pending, plaintext, () => corrupt, slog),
    };
  }

  /**
   * Injects the message for `pending`: one transaction per distinct set of DSN parameters (nodemailer
   * gives every RCPT of a transaction the same NOTIFY and ORCPT), so each recipient keeps its own.
   * Several transactions need the message more than once: it is read whole first (and verified).
   */
  private async deliver(
    header: SpoolHeader,
    pending: Recipient[],
    plaintext: Readable,
    corruption: () => Error | undefined,
    slog: Logger,
  ): Promise<InjectResult> {
    const { envelope, client } = header;
    const groups = groupByDsnParams(pending);
    const accepted: string[] = [];
    const refused: RecipientRefusal[] = [];
    let response = "";
    try {
      const message = groups.length > 1 ? await readAll(plaintext) : plaintext;
      for (const group of groups) {
        try {
          const info = await this.send(header, group, message);
          const corrupt = corruption();
          if (corrupt) throw corrupt;
          const verdicts = verdictsByRecipient(group, info.accepted.map(String), info.rejectedErrors ?? []);
          const taken = group.filter((r) => verdicts.get(r) === null);
          // Logged before the next transaction: a crash after Postfix's 250 must not deliver again.
          const whole = taken.length === envelope.rcptTo.length;
          if (taken.length)
            await this.options.log.record(
              ...(whole ? [header.id] : taken.map((r) => recipientKey(header.id, r.address))),
            );
          for (const r of group) {
            const error = verdicts.get(r);
            if (error === null) accepted.push(r.address);
            else if (error) refused.push(refusalOf(r.address, error));
            else {
              // Not taken as far as home can tell: retried, so never lost (at worst delivered twice).
              slog.error({ recipient: r.address }, "no verdict from Postfix matched this recipient");
              refused.push({ recipient: r.address, message: "no verdict from the home mail server matched" });
            }
          }
          response = info.response;
        } catch (error) {
          if (corruption()) throw error;
          const e = error as SmtpError;
          // Every RCPT refused: nodemailer lists each reply. Otherwise (MAIL FROM, DATA, the
          // connection) one reply stands for the whole transaction.
          const verdicts = verdictsByRecipient(group, [], e.rejectedErrors ?? []);
          for (const r of group) refused.push(refusalOf(r.address, verdicts.get(r) ?? e));
        }
      }
    } catch (error) {
      const corrupt = corruption();
      if (!corrupt) return { status: "deferred", message: (error as Error).message };
      slog.error({ err: corrupt.message }, "spooled message failed verification: not delivered");
      return { status: "corrupt", message: corrupt.message };
    }
    if (accepted.length > 0) {
      slog.info(
        { accepted: accepted.length, refused: refused.length, client: client.address },
        "spooled message delivered to Postfix",
      );
      if (refused.length) slog.warn({ refused }, "Postfix refused some recipients of a spooled message");
      return {
        status: "delivered",
        accepted,
        rejected: refused.map((r) => r.recipient),
        message: response,
        ...(refused.length ? { refused } : {}),
      };
    }
    // Nothing taken: a temporary refusal makes the whole answer temporary (older edges retry the
    // message); the per-recipient replies tell a newer edge which recipients failed for good.
    const first = refused.find((r) => !r.code || r.code < 500) ?? refused[0];
    const code = first?.code;
    const message = first?.message ?? "no recipient taken";
    const status = code && code >= 500 ? "rejected" : "deferred";
    slog.warn({ code, message, refused }, `Postfix ${status} a spooled message`);
    return { status, ...(code ? { code } : {}), message, refused };
  }

  private async send(
    header: SpoolHeader,
    group: Recipient[],
    message: Readable | Buffer,
  ): Promise<{ accepted: string[]; rejectedErrors?: SmtpError[]; response: string }> {
    const { envelope, client } = header;
    const transport = nodemailer.createTransport({
      host: this.options.inject.target.host,
      port: this.options.inject.target.port,
      name: client.helo || "unknown",
      ignoreTLS: true,
      connectionTimeout: 10_000,
      socketTimeout: 10 * 60_000,
      getSocket: (
        _options: unknown,
        callback: (error: Error | null, socket?: { connection: net.Socket }) => void,
      ) => {
        const socket = net.connect({
          host: this.options.inject.target.host,
          port: this.options.inject.target.port,
        });
        socket.once("error", (error) => callback(error));
        socket.once("connect", () => {
          const header = this.proxyHeader(client.address, client.port);
          if (header) socket.write(header);
          callback(null, { connection: socket });
        });
      },
    } as never);
    try {
      return (await transport.sendMail({
        envelope: {
          from: envelope.mailFrom,
          to: group.map((r) => r.address),
          use8BitMime: envelope.mailParams.BODY?.toUpperCase() === "8BITMIME",
        } as never,
        raw: message,
        ...dsnOptions(header, group[0]!),
      })) as { accepted: string[]; rejectedErrors?: SmtpError[]; response: string };
    } finally {
      transport.close();
    }
  }

  private proxyHeader(address: string, port: number): Buffer | undefined {
    const { target, proxyProtocol } = this.options.inject;
    if (proxyProtocol === "off") return undefined;
    const addresses = proxyAddresses({ address, port }, { address: target.host, port: 25 });
    return proxyProtocol === "v1" ? encodeProxyV1(addresses) : encodeProxyV2(addresses);
  }
}

const MAX_HEADER = 64 * 1024;

interface Injection {
  cipher(chunk: Buffer): void;
  end(): void;
  abort(): void;
  readonly result: Promise<InjectResult>;
}

interface SmtpError extends Error {
  responseCode?: number;
  response?: string;
  recipient?: string;
  rejectedErrors?: SmtpError[];
}

function refusalOf(recipient: string, error: SmtpError): RecipientRefusal {
  return {
    recipient,
    ...(error.responseCode ? { code: error.responseCode } : {}),
    message: error.response ?? error.message,
  };
}

/**
 * Postfix's verdict for each spool recipient of a transaction (an error, or null for taken).
 * nodemailer reports addresses as it sent them, rewritten (domains punycoded, duplicates merged),
 * so a reported address stands for every recipient of the group it canonically equals.
 */
function verdictsByRecipient(
  group: Recipient[],
  accepted: string[],
  rejected: SmtpError[],
): Map<Recipient, SmtpError | null> {
  const verdicts = new Map<Recipient, SmtpError | null>();
  const mark = (address: string, verdict: SmtpError | null) => {
    const reported = canonicalAddress(address);
    for (const r of group) if (canonicalAddress(r.address) === reported) verdicts.set(r, verdict);
  };
  for (const address of accepted) mark(address, null);
  for (const error of rejected) if (error.recipient) mark(String(error.recipient), error);
  return verdicts;
}

function canonicalAddress(address: string): string {
  const at = address.lastIndexOf("@");
  if (at < 0) return address.toLowerCase();
  return `${address.slice(0, at).toLowerCase()}@${domainToASCII(address.slice(at + 1)) || address.slice(at + 1).toLowerCase()}`;
}

/**
 * The recipients the edge asks for: `recipients` in the stream meta lists indexes into the
 * envelope's rcptTo (a retry for those Postfix deferred); without it (or unreadable), all of them.
 */
function requestedRecipients(header: SpoolHeader, only: unknown): Recipient[] {
  const all = header.envelope.rcptTo;
  if (!Array.isArray(only) || only.length === 0) return all;
  const picked = only.map((index) => (Number.isSafeInteger(index) ? all[index as number] : undefined));
  return picked.every((r) => r !== undefined) ? [...new Set(picked as Recipient[])] : all;
}

/** Recipients with the same NOTIFY and ORCPT, in envelope order. */
function groupByDsnParams(recipients: Recipient[]): Recipient[][] {
  const groups = new Map<string, Recipient[]>();
  for (const r of recipients) {
    const key = JSON.stringify([notifyParam(r) ?? null, r.params.ORCPT ?? null]);
    const group = groups.get(key);
    if (group) group.push(r);
    else groups.set(key, [r]);
  }
  return [...groups.values()];
}

/** A recipient's NOTIFY in canonical form ("FAILURE,DELAY", "NEVER"); undefined when absent or invalid. */
function notifyParam(recipient: Recipient): string | undefined {
  if (recipient.params.NOTIFY === undefined) return undefined;
  const kinds = parseNotify(recipient.params.NOTIFY);
  if (!kinds) return undefined;
  return kinds.length ? kinds.join(",") : "NEVER";
}

async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/**
 * The sender's DSN parameters for Postfix, so its own notices (SUCCESS, DELAY, and failures after it
 * took the message) carry them. Files spooled before the edge offered DSN were not checked: a RET or
 * NOTIFY that is not valid is left out (nodemailer would refuse the whole transaction).
 */
function dsnOptions(header: SpoolHeader, recipient: Recipient): { dsn?: Record<string, string | string[]> } {
  const { mailParams } = header.envelope;
  const dsn: Record<string, string | string[]> = {};
  const ret = mailParams.RET?.toUpperCase();
  if (ret === "FULL" || ret === "HDRS") dsn.ret = ret;
  if (mailParams.ENVID) dsn.envid = mailParams.ENVID;
  const notify = notifyParam(recipient);
  if (notify) dsn.notify = notify.split(",");
  // smtp-server decoded ORCPT's xtext when the edge received it; nodemailer encodes it again.
  const orcpt = recipient.params.ORCPT;
  if (orcpt) dsn.orcpt = orcpt;
  return Object.keys(dsn).length ? { dsn } : {};
}
