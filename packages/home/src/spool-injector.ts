// Receives spooled messages from the edge (`spool` streams), opens them with the spool key —
// every chunk verified before its bytes go on — and hands them to Postfix's tunnel-facing port as
// if the original client were connecting: PROXY header with its address, EHLO with its HELO.
// Postfix's verdict goes back as RESULT; the id is logged durably first, so a lost RESULT never
// delivers twice.
import net from "node:net";
import { Readable } from "node:stream";
import {
  encodeProxyV1,
  encodeProxyV2,
  type KeyPair,
  keyFingerprint,
  type Logger,
  type MuxStream,
  parseSpoolHeader,
  proxyAddresses,
  ResetCode,
  type SpoolHeader,
  SpoolOpener,
} from "@mxtunnel/shared";
import nodemailer from "nodemailer";
import type { InjectedLog } from "./injected-log.js";
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
}

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
      job = this.start(header);
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
  private start(header: SpoolHeader): Injection {
    const { log, logger } = this.options;
    const slog = logger.child({ id: header.id });
    if (log.has(header.id)) {
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
      result: this.deliver(header, plaintext, () => corrupt, slog),
    };
  }

  private async deliver(
    header: SpoolHeader,
    plaintext: Readable,
    corruption: () => Error | undefined,
    slog: Logger,
  ): Promise<InjectResult> {
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
      const info = (await transport.sendMail({
        envelope: {
          from: envelope.mailFrom,
          to: envelope.rcptTo.map((r: { address: string }) => r.address),
          use8BitMime: envelope.mailParams.BODY?.toUpperCase() === "8BITMIME",
        } as never,
        raw: plaintext,
        ...dsnOptions(header),
      })) as { accepted: string[]; rejected: string[]; response: string };
      const corrupt = corruption();
      if (corrupt) throw corrupt;
      await this.options.log.record(header.id);
      slog.info(
        { accepted: info.accepted.length, rejected: info.rejected.length, client: client.address },
        "spooled message delivered to Postfix",
      );
      return {
        status: "delivered",
        accepted: info.accepted.map(String),
        rejected: info.rejected.map(String),
        message: info.response,
      };
    } catch (error) {
      const e = error as Error & { responseCode?: number; response?: string };
      const corrupt = corruption();
      if (corrupt) {
        slog.error({ err: corrupt.message }, "spooled message failed verification: not delivered");
        return { status: "corrupt", message: corrupt.message };
      }
      const code = e.responseCode;
      const message = e.response ?? e.message;
      if (code && code >= 500) {
        slog.warn({ code, message }, "Postfix rejected a spooled message");
        return { status: "rejected", code, message };
      }
      slog.warn({ code, message }, "Postfix deferred a spooled message");
      return { status: "deferred", ...(code ? { code } : {}), message };
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

function dsnOptions(header: SpoolHeader): { dsn?: Record<string, string | string[]> } {
  const { mailParams, rcptTo } = header.envelope;
  const dsn: Record<string, string | string[]> = {};
  if (mailParams.RET) dsn.ret = mailParams.RET;
  if (mailParams.ENVID) dsn.envid = mailParams.ENVID;
  const notify = rcptTo[0]?.params.NOTIFY;
  if (notify) dsn.notify = notify.split(",");
  const orcpt = rcptTo[0]?.params.ORCPT;
  if (orcpt) dsn.orcpt = orcpt;
  return Object.keys(dsn).length ? { dsn } : {};
}
