// The recipient list each home syncs to the edge, so that while home is away the edge accepts mail
// only for addresses that exist (550 5.1.1 for the rest) instead of spooling, then bouncing, spam
// for random addresses. Kept durably per home; matching handles Postfix's recipient_delimiter,
// postmaster and catch-alls ("@domain").
import { createHash } from "node:crypto";
import { join } from "node:path";
import { readJsonFile, writeFileAtomic } from "@mxtunnel/shared";

export interface RecipientList {
  version: number;
  sha256: string;
  delimiter: string;
  syncedAt: string;
  addresses: string[];
}

export type RecipientVerdict = "accept" | "unknown" | "no-list" | "stale";

export class RecipientStore {
  private readonly lists = new Map<string, { list: RecipientList; set: Set<string> }>();

  constructor(
    private readonly dir: string,
    private readonly maxAgeMs: number,
  ) {}

  private path(homeKey: string): string {
    return join(this.dir, `recipients-${homeKey}.json`);
  }

  async load(homeKeys: readonly string[]): Promise<void> {
    for (const key of homeKeys) {
      const list = await readJsonFile<RecipientList>(this.path(key));
      if (list) this.lists.set(key, { list, set: new Set(list.addresses) });
    }
  }

  /** Replaces a home's list; the caller has checked the hash of what arrived. */
  async replace(homeKey: string, list: RecipientList): Promise<void> {
    await writeFileAtomic(this.path(homeKey), JSON.stringify(list), { mode: 0o600 });
    this.lists.set(homeKey, { list, set: new Set(list.addresses) });
  }

  info(homeKey: string): { version: number; count: number; syncedAt: string } | undefined {
    const entry = this.lists.get(homeKey);
    return (
      entry && {
        version: entry.list.version,
        count: entry.list.addresses.length,
        syncedAt: entry.list.syncedAt,
      }
    );
  }

  check(homeKey: string, address: string, now = Date.now()): RecipientVerdict {
    const entry = this.lists.get(homeKey);
    if (!entry) return "no-list";
    if (now - Date.parse(entry.list.syncedAt) > this.maxAgeMs) return "stale";
    return matches(entry.set, entry.list.delimiter, address) ? "accept" : "unknown";
  }
}

export function matches(set: ReadonlySet<string>, delimiter: string, address: string): boolean {
  const lower = address.toLowerCase();
  const at = lower.lastIndexOf("@");
  if (at <= 0) return false;
  let local = lower.slice(0, at);
  const domain = lower.slice(at + 1);
  if (local === "postmaster" || local === "abuse") return true;
  if (set.has(lower) || set.has(`@${domain}`)) return true;
  if (delimiter) {
    for (const d of delimiter) {
      const cut = local.indexOf(d);
      if (cut > 0) local = local.slice(0, cut);
    }
    if (set.has(`${local}@${domain}`)) return true;
  }
  return false;
}

/** Parses the body of a sync stream: one address (or "@domain") per line. */
export function parseRecipientLines(text: string): string[] {
  const out = new Set<string>();
  for (const raw of text.split("\n")) {
    const line = raw.trim().toLowerCase();
    if (!line || line.length > 320 || /\s/.test(line) || !line.includes("@")) continue;
    out.add(line);
  }
  return [...out];
}

export function sha256Hex(data: Uint8Array | string): string {
  return createHash("sha256").update(data).digest("hex");
}
