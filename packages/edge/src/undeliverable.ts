// What the backup MX does with spooled mail it can never deliver (home's Postfix answered 5xx, or
// it expired): a DSN to the envelope sender when that sender was authenticated at spool time (SPF
// or aligned DKIM), quarantine otherwise. A backup MX must not send backscatter to forged senders.
import { buildDsn, type Logger } from "@mxtunnel/shared";
import type { SpoolEntry, SpoolStore } from "./spool-store.js";

export interface DsnSender {
  enqueueLocal(
    envelope: { mailFrom: string; rcptTo: string[] },
    message: Buffer,
    home: { publicKey: string; name: string },
  ): Promise<string>;
}

export async function handleUndeliverable(options: {
  entry: SpoolEntry;
  reason: string;
  store: SpoolStore;
  outbound: DsnSender;
  hostname: string;
  homeName: string;
  logger: Logger;
}): Promise<"dsn" | "quarantined"> {
  const { entry, reason, store, logger } = options;
  const { envelope } = entry.header;
  if (!envelope.mailFrom || !entry.auth?.dsnAllowed) {
    const why = !envelope.mailFrom
      ? "null sender: no DSN for a DSN"
      : entry.auth
        ? `sender not authenticated (SPF ${entry.auth.spf}, aligned DKIM ${entry.auth.dkimAligned ? "pass" : "none"}): no DSN, to avoid backscatter`
        : "sender authentication unknown: no DSN, to avoid backscatter";
    await store.quarantine(entry.id, `${reason}; ${why}`);
    return "quarantined";
  }
  const status = /\b([245]\.\d{1,3}\.\d{1,3})\b/.exec(reason)?.[1] ?? "5.0.0";
  // The edge cannot read the sealed message, so the DSN quotes what it knows in the clear: the
  // envelope. That is enough for the sender to recognise the message.
  const original = Buffer.from(
    `X-Original-Envelope-From: <${envelope.mailFrom}>\r\nX-Original-Envelope-To: ${envelope.rcptTo.map((r) => `<${r.address}>`).join(", ")}\r\nX-Spool-Id: ${entry.id}\r\n\r\n`,
  );
  const dsn = buildDsn({
    reportingMta: options.hostname,
    sender: envelope.mailFrom,
    original,
    arrivalDate: new Date(entry.receivedAt),
    envelopeId: envelope.mailParams.ENVID,
    recipients: envelope.rcptTo.map((r) => ({
      address: r.address,
      originalRecipient: r.params.ORCPT,
      action: "failed",
      status: status.startsWith("5") ? status : "5.0.0",
      diagnostic: reason,
    })),
  });
  const id = await options.outbound.enqueueLocal({ mailFrom: "", rcptTo: [envelope.mailFrom] }, dsn, {
    publicKey: entry.homeKey,
    name: options.homeName,
  });
  await store.remove(entry.id);
  logger.warn({ id: entry.id, dsn: id, reason }, "spooled message undeliverable: DSN queued to the sender");
  return "dsn";
}
