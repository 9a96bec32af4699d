// What the backup MX does with spooled mail it can never deliver (home's Postfix answered 5xx, or
// it expired): a DSN to the envelope sender when that sender was authenticated at spool time (SPF
// or aligned DKIM), quarantine otherwise. A backup MX must not send backscatter to forged senders.
// The same rule holds for some recipients of a message Postfix took for the others.
// The sender's DSN parameters (RFC 3461, kept in the spool header) are honoured: a recipient whose
// NOTIFY is NEVER or leaves out FAILURE gets no DSN; ORCPT and ENVID are quoted. RET=HDRS/FULL cannot
// be: the message is sealed to home's key, so the DSN quotes the envelope and says so.
import { copyFile, readFile } from "node:fs/promises";
import { join } from "node:path";
import { buildDsn, fsyncDirectory, type Logger, wantsFailureDsn, writeFileAtomic } from "@mxtunnel/shared";
import type { SpoolEntry, SpoolStore } from "./spool-store.js";

/** A recipient that failed for good, with the reply that says why. */
export interface RecipientFailure {
  address: string;
  diagnostic: string;
}

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
  /** Who failed, each with its own reply; by default every recipient not yet delivered, with `reason`. */
  failed?: RecipientFailure[];
  /**
   * Postfix took the message for other recipients, or still may: the spool file stays for them, the
   * DSN names only `failed`, and a quarantine keeps a copy (`<id>.partial.spool`).
   */
  partial?: boolean;
  store: SpoolStore;
  outbound: DsnSender;
  hostname: string;
  homeName: string;
  logger: Logger;
}): Promise<"dsn" | "quarantined" | "not-requested"> {
  const { entry, reason, store, logger } = options;
  const { envelope } = entry.header;
  const failed =
    options.failed ??
    (entry.remaining ?? envelope.rcptTo.map((r) => r.address)).map((address) => ({
      address,
      diagnostic: reason,
    }));
  if (!envelope.mailFrom || !entry.auth?.dsnAllowed) {
    const why = !envelope.mailFrom
      ? "null sender: no DSN for a DSN"
      : entry.auth
        ? `sender not authenticated (SPF ${entry.auth.spf}, aligned DKIM ${entry.auth.dkimAligned ? "pass" : "none"}): no DSN, to avoid backscatter`
        : "sender authentication unknown: no DSN, to avoid backscatter";
    if (options.partial) await quarantineCopy(entry, store, failed, why, logger);
    else await store.quarantine(entry.id, `${reason}; ${why}`);
    return "quarantined";
  }
  const paramsOf = (address: string) => envelope.rcptTo.find((r) => r.address === address)?.params ?? {};
  const unwanted = failed.filter((f) => !wantsFailureDsn(paramsOf(f.address).NOTIFY));
  if (unwanted.length > 0) {
    logger.warn(
      {
        id: entry.id,
        recipients: unwanted.map((f) => ({ address: f.address, notify: paramsOf(f.address).NOTIFY })),
        reason,
      },
      "spooled message undeliverable: the sender's NOTIFY asks for no failure DSN for these recipients",
    );
  }
  const reported = failed.filter((f) => !unwanted.includes(f));
  if (reported.length === 0) {
    if (!options.partial) await store.remove(entry.id);
    return "not-requested";
  }
  // The edge cannot read the sealed message, so the DSN quotes what it knows in the clear: the
  // envelope. That is enough for the sender to recognise the message.
  const ret = envelope.mailParams.RET?.toUpperCase();
  const original = Buffer.from(
    `X-Original-Envelope-From: <${envelope.mailFrom}>\r\nX-Original-Envelope-To: ${envelope.rcptTo.map((r) => `<${r.address}>`).join(", ")}\r\nX-Spool-Id: ${entry.id}\r\n\r\n`,
  );
  const dsn = buildDsn({
    reportingMta: options.hostname,
    sender: envelope.mailFrom,
    original,
    arrivalDate: new Date(entry.receivedAt),
    envelopeId: envelope.mailParams.ENVID,
    note: [
      "The message was held by this backup MX sealed to the recipient's server, which alone can",
      `read it: ${ret === "FULL" ? "it cannot be returned (RET=FULL)" : ret === "HDRS" ? "its headers cannot be returned (RET=HDRS)" : "its content and headers cannot be returned"}. Its envelope is quoted below.`,
    ],
    recipients: reported.map(({ address, diagnostic }) => {
      const status = /\b([245]\.\d{1,3}\.\d{1,3})\b/.exec(diagnostic)?.[1] ?? "5.0.0";
      return {
        address,
        originalRecipient: paramsOf(address).ORCPT,
        action: "failed" as const,
        status: status.startsWith("5") ? status : "5.0.0",
        diagnostic,
      };
    }),
  });
  const id = await options.outbound.enqueueLocal({ mailFrom: "", rcptTo: [envelope.mailFrom] }, dsn, {
    publicKey: entry.homeKey,
    name: options.homeName,
  });
  if (!options.partial) await store.remove(entry.id);
  logger.warn(
    { id: entry.id, dsn: id, reason, recipients: reported.length, partial: Boolean(options.partial) },
    "spooled message undeliverable: DSN queued to the sender",
  );
  return "dsn";
}

/**
 * Keeps a copy of a message some of whose recipients failed (the file itself stays for the others),
 * with the reasons appended to `<id>.partial.reason`, so the operator can still release it to them.
 */
async function quarantineCopy(
  entry: SpoolEntry,
  store: SpoolStore,
  failed: RecipientFailure[],
  why: string,
  logger: Logger,
): Promise<void> {
  const base = join(store.quarantineDir, `${entry.id}.partial`);
  const before = await readFile(`${base}.reason`, "utf8").catch(() => "");
  const lines = failed.map((f) => `<${f.address}>: ${f.diagnostic.replace(/[\r\n]+/g, " ")}; ${why}\n`);
  await copyFile(entry.path, `${base}.spool`);
  await writeFileAtomic(`${base}.reason`, before + lines.join(""), { mode: 0o600 });
  await fsyncDirectory(store.quarantineDir);
  logger.error(
    { id: entry.id, recipients: failed.map((f) => f.address), why },
    "recipients of a spooled message refused for good: a copy is quarantined, no DSN",
  );
}
