// DKIM for outbound mail (RFC 6376): one 2048-bit RSA key per domain, made by `init` under
// DIR/dkim/, with a selector unique to this edge (mxt-<edge key hash>-<yyyymm>), and the signer:
// rsa-sha256, relaxed/relaxed, over From (twice: no second From can be added unseen), To, Subject,
// Date, Message-ID and the other headers a recipient reads, and the whole body.
import { createHash, createPrivateKey, generateKeyPairSync, type KeyObject, sign } from "node:crypto";
import { mkdir, readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { StateError, writeFileAtomic } from "@mxtunnel/shared";

export interface DkimKey {
  domain: string;
  selector: string;
  privateKey: KeyObject;
  /** base64 of the SubjectPublicKeyInfo DER: the p= of the DNS record. */
  publicKey: string;
}

export interface DkimRecordFile {
  domain: string;
  selector: string;
  publicKey: string;
  /** Publish as TXT at `${selector}._domainkey.${domain}`. */
  name: string;
  record: string;
  createdAt: string;
}

export function dkimDir(edgeDir: string): string {
  return join(edgeDir, "dkim");
}

/** "mxt-" + 8 hex of SHA-256 over the edge's static public key + "-" + yyyymm. */
export function dkimSelector(edgePublicKey: Uint8Array, date = new Date()): string {
  const hash = createHash("sha256").update(edgePublicKey).digest("hex").slice(0, 8);
  const month = `${date.getUTCFullYear()}${String(date.getUTCMonth() + 1).padStart(2, "0")}`;
  return `mxt-${hash}-${month}`;
}

export function dkimTxtRecord(publicKey: string): string {
  return `v=DKIM1; k=rsa; p=${publicKey}`;
}

/**
 * Writes a new key for each domain that has none yet (DIR/dkim/<domain>.key, PEM, 0600, and
 * <domain>.json with the selector and DNS record). Existing keys are kept: rotating one means a new
 * DNS record first. Returns the records of the keys it made.
 */
export async function generateDkimKeys(
  edgeDir: string,
  domains: readonly string[],
  edgePublicKey: Uint8Array,
  now = new Date(),
): Promise<DkimRecordFile[]> {
  const dir = dkimDir(edgeDir);
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const existing = new Set(await readdir(dir));
  const made: DkimRecordFile[] = [];
  for (const domain of domains) {
    if (existing.has(`${domain}.json`)) continue;
    // Encoded by the generator itself: on Node 20, exporting a freshly generated KeyObject can
    // deadlock against the key-generation job's clean-up during GC (seen while benchmarking Noise).
    const { privateKey: pem, publicKey: spki } = generateKeyPairSync("rsa", {
      modulusLength: 2048,
      publicKeyEncoding: { type: "spki", format: "der" },
      privateKeyEncoding: { type: "pkcs8", format: "pem" },
    });
    const p = spki.toString("base64");
    const selector = dkimSelector(edgePublicKey, now);
    await writeFileAtomic(join(dir, `${domain}.key`), pem, { mode: 0o600 });
    const record: DkimRecordFile = {
      domain,
      selector,
      publicKey: p,
      name: `${selector}._domainkey.${domain}`,
      record: dkimTxtRecord(p),
      createdAt: now.toISOString(),
    };
    await writeFileAtomic(join(dir, `${domain}.json`), `${JSON.stringify(record, null, 2)}\n`, {
      mode: 0o600,
    });
    made.push(record);
  }
  return made;
}

/** The DNS records of every key in DIR/dkim (for `mxtunnel-edge dns`). */
export async function dkimRecords(edgeDir: string): Promise<DkimRecordFile[]> {
  const dir = dkimDir(edgeDir);
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw error;
  }
  const records: DkimRecordFile[] = [];
  for (const name of names.filter((n) => n.endsWith(".json")).sort()) {
    const text = await readFile(join(dir, name), "utf8");
    try {
      records.push(JSON.parse(text) as DkimRecordFile);
    } catch {
      throw new StateError("STATE_CORRUPT", `${join(dir, name)} is not valid JSON`);
    }
  }
  return records;
}

/** Loads the signing keys, by domain. A domain without a key is simply not signed (logged by the caller). */
export async function loadDkimKeys(edgeDir: string): Promise<Map<string, DkimKey>> {
  const keys = new Map<string, DkimKey>();
  for (const record of await dkimRecords(edgeDir)) {
    const path = join(dkimDir(edgeDir), `${record.domain}.key`);
    const pem = await readFile(path, "utf8").catch((error: unknown) => {
      throw new StateError("STATE_CORRUPT", `${path}: ${(error as Error).message}`);
    });
    keys.set(record.domain, {
      domain: record.domain,
      selector: record.selector,
      privateKey: createPrivateKey(pem),
      publicKey: record.publicKey,
    });
  }
  return keys;
}

// ---- signing -------------------------------------------------------------------------------------

/** Signed when present, in this order; From is listed twice (over-signing). */
export const DKIM_SIGNED_HEADERS = [
  "from",
  "to",
  "cc",
  "subject",
  "date",
  "message-id",
  "reply-to",
  "in-reply-to",
  "references",
  "mime-version",
  "content-type",
  "content-transfer-encoding",
] as const;

export interface ParsedHeader {
  /** Lower-case field name. */
  name: string;
  /** The whole field as it appears, folding included, without the final CRLF. */
  raw: string;
}

/** Splits a CRLF message into its header fields and body (the bytes after the empty line). */
export function splitMessage(message: Buffer): { headers: ParsedHeader[]; body: Buffer } {
  const end = message.indexOf("\r\n\r\n");
  const headEnd = end < 0 ? message.length : end;
  const head = message.subarray(0, headEnd).toString("latin1");
  const body = end < 0 ? Buffer.alloc(0) : message.subarray(end + 4);
  const headers: ParsedHeader[] = [];
  for (const line of head.split("\r\n")) {
    if (line === "") continue;
    if ((line.startsWith(" ") || line.startsWith("\t")) && headers.length > 0) {
      headers[headers.length - 1]!.raw += `\r\n${line}`;
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0) continue; // not a field; DKIM ignores what it cannot name
    headers.push({ name: line.slice(0, colon).trim().toLowerCase(), raw: line });
  }
  return { headers, body };
}

/** RFC 6376 3.4.2 relaxed header canonicalization, CRLF included. */
export function relaxedHeader(raw: string): string {
  const colon = raw.indexOf(":");
  const name = raw.slice(0, colon).trim().toLowerCase();
  const value = raw
    .slice(colon + 1)
    .replace(/\r\n/g, "")
    .replace(/[ \t]+/g, " ")
    .trim();
  return `${name}:${value}\r\n`;
}

/** RFC 6376 3.4.4 relaxed body canonicalization. */
export function relaxedBody(body: Buffer): Buffer {
  const lines = body.toString("latin1").split("\r\n");
  // A body ending in CRLF splits into a last empty element: that is not a line of its own.
  if (lines.length > 0 && lines[lines.length - 1] === "") lines.pop();
  const out = lines.map((line) => line.replace(/[ \t]+/g, " ").replace(/ $/, ""));
  while (out.length > 0 && out[out.length - 1] === "") out.pop();
  return Buffer.from(out.length === 0 ? "" : `${out.join("\r\n")}\r\n`, "latin1");
}

/**
 * Returns the DKIM-Signature field (folded, ending in CRLF) to put in front of `message`.
 * Throws when the message has no From (DKIM requires it).
 */
export function dkimSignature(
  message: Buffer,
  key: Pick<DkimKey, "domain" | "selector" | "privateKey">,
  now = new Date(),
): string {
  const { headers, body } = splitMessage(message);
  if (!headers.some((h) => h.name === "from"))
    throw new RangeError("a message without From cannot be signed");
  const bodyHash = createHash("sha256").update(relaxedBody(body)).digest("base64");
  const names: string[] = [];
  for (const name of DKIM_SIGNED_HEADERS) {
    const count = headers.filter((h) => h.name === name).length;
    for (let i = 0; i < count; i++) names.push(name);
  }
  names.push("from");
  // Each listed name takes the next instance from the bottom (RFC 6376 5.4.2).
  const used = new Map<string, number>();
  let canonical = "";
  for (const name of names) {
    const instances = headers.filter((h) => h.name === name);
    const taken = used.get(name) ?? 0;
    used.set(name, taken + 1);
    const header = instances[instances.length - 1 - taken];
    if (header) canonical += relaxedHeader(header.raw);
  }
  const fields = [
    "v=1",
    "a=rsa-sha256",
    "c=relaxed/relaxed",
    `d=${key.domain}`,
    `s=${key.selector}`,
    `t=${Math.floor(now.getTime() / 1000)}`,
    `h=${names.join(":")}`,
    `bh=${bodyHash}`,
  ];
  // The verifier canonicalizes the field as it appears, folded, with b= emptied: sign exactly that.
  const unsigned = fold(`DKIM-Signature: ${fields.join("; ")}; b=`);
  canonical += relaxedHeader(unsigned).replace(/\r\n$/, "");
  const signature = sign("sha256", Buffer.from(canonical, "latin1"), key.privateKey).toString("base64");
  return `${appendFolded(unsigned, signature)}\r\n`;
}

const LINE = 76;

/** Folds at "; " between tags; base64 values (bh=) may also break inside, where FWS is allowed. */
function fold(field: string): string {
  const out: string[] = [];
  let line = "";
  for (const token of field.split(/(?<=; )/)) {
    if (line.length + token.length <= LINE || line.trim() === "") {
      line += token;
    } else {
      out.push(line.trimEnd());
      line = `\t${token}`;
    }
    if (line.length > LINE && /^\t?bh=/.test(line)) {
      while (line.length > LINE) {
        out.push(line.slice(0, LINE));
        line = `\t${line.slice(LINE)}`;
      }
    }
  }
  out.push(line.trimEnd());
  return out.join("\r\n");
}

/** Appends base64 text to a folded field, continuing on new lines as needed. */
function appendFolded(field: string, value: string): string {
  let lastLine = field.slice(field.lastIndexOf("\n") + 1);
  let out = field;
  let rest = value;
  while (rest.length > 0) {
    const room = Math.max(0, LINE - lastLine.length);
    if (room === 0) {
      out += "\r\n\t";
      lastLine = "\t";
      continue;
    }
    out += rest.slice(0, room);
    lastLine += rest.slice(0, room);
    rest = rest.slice(room);
  }
  return out;
}

/** The domain part of an address, lower-cased ("" for none). */
export function domainOf(address: string): string {
  const at = address.lastIndexOf("@");
  return at < 0 ? "" : address.slice(at + 1).toLowerCase();
}
