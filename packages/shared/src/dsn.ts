// Delivery status notifications (RFC 3464, RFC 3462 multipart/report): the bounce the edge sends
// the original sender when outbound mail fails for good (and the spool when it gives up). Pure: text
// in, bytes out; the caller decides where the DSN goes (always with MAIL FROM:<>).
import { randomBytes } from "node:crypto";

export type DsnAction = "failed" | "delayed" | "delivered" | "relayed" | "expanded";

export interface DsnRecipient {
  /** The recipient as it was handed to the reporting MTA (Final-Recipient). */
  address: string;
  /** ORCPT as received, "rfc822;addr" form; included as Original-Recipient when present. */
  originalRecipient?: string | undefined;
  action: DsnAction;
  /** Enhanced status code, "5.1.1". */
  status: string;
  /** The remote server's reply, e.g. "550 5.1.1 no such user" (Diagnostic-Code: smtp; …). */
  diagnostic?: string | undefined;
  /** The host that gave the reply (Remote-MTA: dns; …). */
  remoteMta?: string | undefined;
  lastAttempt?: Date | undefined;
}

export interface DsnOptions {
  /** Host name of the MTA writing the report (Reporting-MTA, From: MAILER-DAEMON@…). */
  reportingMta: string;
  /** The envelope sender of the failed message: the DSN's To (never empty: no DSN for a DSN). */
  sender: string;
  /** The failed message as it was queued (its header block is quoted). */
  original: Uint8Array;
  recipients: DsnRecipient[];
  arrivalDate?: Date | undefined;
  /** ENVID of the original transaction. */
  envelopeId?: string | undefined;
  /** RET=FULL asks for the whole message back; by default only its headers are returned. */
  returnFull?: boolean | undefined;
  /** Lines added to the human-readable part after the recipients (e.g. why the message is not attached). */
  note?: string[] | undefined;
  /** For reproducible tests. */
  now?: Date | undefined;
  boundary?: string | undefined;
  messageId?: string | undefined;
}

/** Refuses text that would break out of a header or field line. */
function fieldText(value: string, what: string): string {
  if (/[\r\n]/.test(value)) throw new RangeError(`${what} must not contain a line break`);
  return value;
}

/** RFC 5322 date-time in UTC, e.g. "Tue, 04 Mar 2025 10:00:00 +0000". */
export function rfc5322Date(date: Date): string {
  const days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const pad = (n: number) => String(n).padStart(2, "0");
  return (
    `${days[date.getUTCDay()]}, ${pad(date.getUTCDate())} ${months[date.getUTCMonth()]} ${date.getUTCFullYear()} ` +
    `${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}:${pad(date.getUTCSeconds())} +0000`
  );
}

/** The header block of a message (up to, not including, the empty line), with CRLF line ends. */
export function headerBlock(message: Uint8Array): string {
  const text = Buffer.from(message.buffer, message.byteOffset, message.byteLength).toString("latin1");
  const end = text.search(/\r?\n\r?\n/);
  const head = end < 0 ? text : text.slice(0, end);
  return head.replace(/\r?\n/g, "\r\n");
}

const STATUS = /^[245]\.\d{1,3}\.\d{1,3}$/;

export type DsnNotifyKind = "SUCCESS" | "FAILURE" | "DELAY";

/**
 * An RCPT's NOTIFY parameter (RFC 3461 §4.1) as received, in any case: the kinds it asks for, [] for
 * NEVER. Without NOTIFY an MTA reports failures (and may report delays): ["FAILURE", "DELAY"].
 * undefined when the value is not valid NOTIFY (a file spooled before the edge offered DSN may hold
 * one, since nothing checked it then).
 */
export function parseNotify(notify: string | undefined): DsnNotifyKind[] | undefined {
  if (notify === undefined) return ["FAILURE", "DELAY"];
  const values = notify.toUpperCase().split(",");
  if (values.length === 1 && values[0] === "NEVER") return [];
  if (!values.every((v) => v === "SUCCESS" || v === "FAILURE" || v === "DELAY")) return undefined;
  return [...new Set(values as DsnNotifyKind[])];
}

/** Whether a recipient's NOTIFY asks for a failure DSN; an unreadable NOTIFY counts as absent. */
export function wantsFailureDsn(notify: string | undefined): boolean {
  return (parseNotify(notify) ?? parseNotify(undefined)!).includes("FAILURE");
}

/** Builds the DSN message (CRLF line ends), ready to send with MAIL FROM:<> to `options.sender`. */
export function buildDsn(options: DsnOptions): Buffer {
  const { reportingMta, sender, recipients } = options;
  if (!sender) throw new RangeError("a DSN needs a sender to go back to (none is sent for MAIL FROM:<>)");
  if (recipients.length === 0) throw new RangeError("a DSN needs at least one recipient to report on");
  fieldText(reportingMta, "reportingMta");
  fieldText(sender, "sender");
  for (const r of recipients) {
    if (!STATUS.test(r.status)) throw new RangeError(`status ${JSON.stringify(r.status)} is not X.Y.Z`);
    fieldText(r.address, "recipient address");
    if (r.diagnostic !== undefined) fieldText(r.diagnostic, "diagnostic");
    if (r.remoteMta !== undefined) fieldText(r.remoteMta, "remoteMta");
    if (r.originalRecipient !== undefined) fieldText(r.originalRecipient, "originalRecipient");
  }
  if (options.envelopeId !== undefined) fieldText(options.envelopeId, "envelopeId");
  const now = options.now ?? new Date();
  const boundary = options.boundary ?? `dsn-${randomBytes(12).toString("hex")}`;
  const messageId = options.messageId ?? `<${randomBytes(12).toString("hex")}@${reportingMta}>`;
  const failed = recipients.filter((r) => r.action === "failed");
  const delayed = recipients.filter((r) => r.action === "delayed");
  const subject =
    failed.length > 0
      ? "Undelivered Mail Returned to Sender"
      : delayed.length > 0
        ? "Delayed Mail (still being retried)"
        : "Delivery Status Notification";

  const human: string[] = [`This is the mail system at host ${reportingMta}.`, ""];
  if (failed.length > 0) {
    human.push(
      "I'm sorry to have to inform you that your message could not",
      "be delivered to one or more recipients. It's attached below.",
      "",
    );
    for (const r of failed) human.push(`<${r.address}>: ${r.diagnostic ?? `status ${r.status}`}`);
  }
  if (delayed.length > 0) {
    if (failed.length > 0) human.push("");
    human.push("Delivery to the following recipients is delayed; it is still being retried:", "");
    for (const r of delayed) human.push(`<${r.address}>: ${r.diagnostic ?? `status ${r.status}`}`);
  }
  for (const r of recipients.filter((x) => x.action !== "failed" && x.action !== "delayed")) {
    human.push(`<${r.address}>: ${r.action}`);
  }
  if (options.note?.length) {
    for (const line of options.note) fieldText(line, "note");
    human.push("", ...options.note);
  }

  const perMessage = [`Reporting-MTA: dns; ${reportingMta}`];
  if (options.envelopeId) perMessage.push(`Original-Envelope-Id: ${options.envelopeId}`);
  if (options.arrivalDate) perMessage.push(`Arrival-Date: ${rfc5322Date(options.arrivalDate)}`);
  const perRecipient = recipients.map((r) => {
    const lines: string[] = [];
    if (r.originalRecipient) lines.push(`Original-Recipient: ${r.originalRecipient}`);
    lines.push(`Final-Recipient: rfc822; ${r.address}`, `Action: ${r.action}`, `Status: ${r.status}`);
    if (r.remoteMta) lines.push(`Remote-MTA: dns; ${r.remoteMta}`);
    if (r.diagnostic) lines.push(`Diagnostic-Code: smtp; ${r.diagnostic}`);
    if (r.lastAttempt) lines.push(`Last-Attempt-Date: ${rfc5322Date(r.lastAttempt)}`);
    return lines.join("\r\n");
  });

  const returned = options.returnFull
    ? {
        type: "message/rfc822",
        body: Buffer.from(options.original).toString("latin1").replace(/\r?\n/g, "\r\n"),
      }
    : { type: "text/rfc822-headers", body: `${headerBlock(options.original)}\r\n` };
  const eightBit = /[\x80-\xff]/.test(returned.body);

  const parts = [
    `From: Mail Delivery System <MAILER-DAEMON@${reportingMta}>`,
    `To: <${sender}>`,
    `Subject: ${subject}`,
    `Date: ${rfc5322Date(now)}`,
    `Message-ID: ${messageId}`,
    "Auto-Submitted: auto-replied",
    "MIME-Version: 1.0",
    `Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="${boundary}"`,
    "",
    "This is a MIME-encapsulated message.",
    "",
    `--${boundary}`,
    "Content-Description: Notification",
    "Content-Type: text/plain; charset=us-ascii",
    "",
    human.join("\r\n"),
    "",
    `--${boundary}`,
    "Content-Description: Delivery report",
    "Content-Type: message/delivery-status",
    "",
    perMessage.join("\r\n"),
    "",
    perRecipient.join("\r\n\r\n"),
    "",
    `--${boundary}`,
    `Content-Description: ${options.returnFull ? "Undelivered Message" : "Undelivered Message Headers"}`,
    `Content-Type: ${returned.type}`,
    ...(eightBit ? ["Content-Transfer-Encoding: 8bit"] : []),
    "",
    returned.body.replace(/\r\n$/, ""),
    "",
    `--${boundary}--`,
    "",
  ];
  return Buffer.from(parts.join("\r\n"), "latin1");
}
