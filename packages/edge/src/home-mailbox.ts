// Mail the edge itself must hand to a home (the DSNs of outbound mail): the HomeMailbox seam, and
// the live implementation that speaks SMTP to the home's Postfix over a `forward` stream of service
// "smtp" on the home's tunnel. The backup MX spool can replace it (same interface) so a DSN also
// waits on the edge while home is down; until then a DSN waits in the outbound queue and is retried.
import { randomBytes } from "node:crypto";
import { type Logger, type MuxStream, ResetCode } from "@mxtunnel/shared";
import type SMTPConnection from "nodemailer/lib/smtp-connection";
import { connectSmtp, loadSmtpConnection } from "./delivery.js";
import type { TunnelServer } from "./tunnel-server.js";

export interface HomeMailbox {
  /** Resolves once the home accepted the message for every recipient; rejects otherwise. */
  submit(envelope: { mailFrom: string; rcptTo: string[] }, message: Buffer): Promise<void>;
}

/** Why a submission failed; `permanent` when the home's Postfix answered 5xx. */
export class HomeMailboxError extends Error {
  constructor(
    message: string,
    readonly permanent: boolean,
  ) {
    super(message);
  }
}

export interface TunnelHomeMailboxOptions {
  tunnels: TunnelServer;
  /** The home's static public key (base64url), as in HomeRecord.publicKey. */
  homePublicKey: string;
  /** EHLO name: the edge's hostname. */
  hostname: string;
  /** The client address the home's Postfix sees (PROXY header): the edge's public address. */
  clientAddress: string;
  logger: Logger;
  /** Whole submission, default 60 s. */
  timeoutMs?: number;
}

/** Makes a MuxStream look enough like a net.Socket for nodemailer (idle timeout, no keepalive). */
function socketLike(stream: MuxStream): MuxStream {
  let timer: NodeJS.Timeout | undefined;
  let idleMs = 0;
  const arm = () => {
    clearTimeout(timer);
    if (idleMs > 0) timer = setTimeout(() => stream.emit("timeout"), idleMs).unref();
  };
  stream.on("data", arm);
  stream.on("close", () => clearTimeout(timer));
  Object.assign(stream, {
    setTimeout(ms: number) {
      idleMs = ms;
      arm();
      return stream;
    },
  });
  return stream;
}

export class TunnelHomeMailbox implements HomeMailbox {
  constructor(private readonly options: TunnelHomeMailboxOptions) {}

  async submit(envelope: { mailFrom: string; rcptTo: string[] }, message: Buffer): Promise<void> {
    const { options } = this;
    const SmtpClient = await loadSmtpConnection();
    const tunnel = options.tunnels.tunnelOf(options.homePublicKey);
    if (!tunnel || tunnel.mux.closed) throw new HomeMailboxError("the home has no live tunnel", false);
    const session = `d${randomBytes(4).toString("hex")}`;
    const stream = tunnel.mux.open("forward", {
      service: "smtp",
      session,
      client: { address: options.clientAddress, port: 25 },
      local: { address: options.clientAddress, port: 25 },
    });
    const timeoutMs = options.timeoutMs ?? 60_000;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        cleanup();
        stream.reset(ResetCode.TIMEOUT, "timeout");
        reject(new HomeMailboxError("the home did not accept the stream in time", false));
      }, timeoutMs);
      const onAccept = () => {
        cleanup();
        resolve();
      };
      const onReset = (_code: number, reason: string) => {
        cleanup();
        reject(new HomeMailboxError(`the home refused the stream (${reason})`, false));
      };
      const onClose = () => {
        cleanup();
        reject(new HomeMailboxError("the tunnel closed", false));
      };
      const cleanup = () => {
        clearTimeout(timer);
        stream.off("accept", onAccept);
        stream.off("reset", onReset);
        stream.off("close", onClose);
      };
      stream.once("accept", onAccept);
      stream.once("reset", onReset);
      stream.once("close", onClose);
    });
    const connection = new SmtpClient({
      connection: socketLike(stream) as unknown as SMTPConnection.Options["connection"],
      name: options.hostname,
      // The tunnel is already end-to-end encrypted and authenticated.
      ignoreTLS: true,
      socketTimeout: timeoutMs,
      greetingTimeout: timeoutMs,
    });
    connection.on("error", () => {});
    try {
      await connectSmtp(connection);
      const info = await new Promise<SMTPConnection.SentMessageInfo>((resolve, reject) =>
        connection.send({ from: envelope.mailFrom, to: envelope.rcptTo }, message, (error, result) =>
          error ? reject(error) : resolve(result),
        ),
      );
      if (info.rejected.length > 0) {
        const first = info.rejectedErrors?.[0];
        throw Object.assign(new Error(first?.response ?? "recipient rejected"), {
          responseCode: first?.responseCode,
        });
      }
      connection.quit();
      options.logger.info({ session, rcpt: envelope.rcptTo.length }, "handed to home");
    } catch (error) {
      connection.close();
      const e = error as SMTPConnection.SMTPError;
      throw new HomeMailboxError(
        `home's Postfix: ${(e.response ?? e.message).replace(/\s+/g, " ")}`,
        (e.responseCode ?? 0) >= 500,
      );
    }
  }
}
