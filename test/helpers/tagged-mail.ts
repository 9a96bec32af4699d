// Mail for the fault and crash tests: each message carries a tag and the SHA-256 of its body, so a
// delivered copy can be told whole or torn, and a seeded PRNG makes the fault schedule repeatable.
import { createHash, randomBytes } from "node:crypto";

/** mulberry32: the same seed gives the same schedule. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A message tagged `tag` (its Subject) with `size` random bytes of body and the body's digest. */
export function taggedMessage(tag: string, size: number): string {
  const body = `${randomBytes(size).toString("base64").replace(/.{76}/g, "$&\r\n")}\r\n`;
  const digest = createHash("sha256").update(body).digest("hex");
  return `Subject: ${tag}\r\nX-Digest: ${digest}\r\n\r\n${body}END-${tag}\r\n`;
}

/**
 * Tag → intact copies among delivered messages (CRLF or LF, as a Maildir stores them) whose tag
 * starts with `tagPrefix`; throws on a torn copy.
 */
export function intactCopies(texts: Iterable<string>, tagPrefix: string): Map<string, number> {
  const copies = new Map<string, number>();
  for (const text of texts) {
    const tag = new RegExp(`^Subject: (${tagPrefix}\\S+)`, "m").exec(text)?.[1];
    if (!tag) continue;
    const digest = /^X-Digest: (\w+)/m.exec(text)?.[1];
    const blank = /\r?\n\r?\n/.exec(text);
    const body = blank ? text.slice(blank.index + blank[0].length).replace(/\r?\n/g, "\r\n") : "";
    const payload = body.slice(0, body.lastIndexOf(`END-${tag}`));
    if (!body.includes(`END-${tag}`) || createHash("sha256").update(payload).digest("hex") !== digest) {
      throw new Error(`message ${tag} was delivered torn`);
    }
    copies.set(tag, (copies.get(tag) ?? 0) + 1);
  }
  return copies;
}
