// The edge's end of a `sync` stream: a home's whole recipient list, checked against the hash it
// announced and limited to that home's domains, replaces the edge's copy atomically.
import type { Logger, MuxStream } from "@mxtunnel/shared";
import { ResetCode } from "@mxtunnel/shared";
import { parseRecipientLines, type RecipientStore, sha256Hex } from "./recipients.js";
import type { Tunnel } from "./tunnel-server.js";

const MAX_LIST_BYTES = 32 * 1024 * 1024;

export async function receiveRecipientList(
  stream: MuxStream,
  tunnel: Tunnel,
  store: RecipientStore,
  logger: Logger,
): Promise<void> {
  const { home } = tunnel;
  const meta = stream.meta as { version?: unknown; sha256?: unknown; delimiter?: unknown };
  stream.on("error", () => {});
  // Read with events, not `for await`: leaving an async iterator destroys the stream, and the
  // RESULT below must still go out on it.
  const body = await new Promise<Buffer | undefined>((resolve) => {
    const chunks: Buffer[] = [];
    let size = 0;
    stream.on("data", (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_LIST_BYTES) {
        stream.reset(ResetCode.REFUSED, "recipient list too large");
        resolve(undefined);
        return;
      }
      chunks.push(chunk);
    });
    stream.once("end", () => resolve(Buffer.concat(chunks)));
    stream.once("close", () => resolve(undefined));
  });
  if (!body) return;
  if (typeof meta.sha256 !== "string" || sha256Hex(body) !== meta.sha256) {
    stream.sendResult({ status: "error", message: "hash mismatch" });
    stream.end();
    return;
  }
  const domains = new Set(home.domains);
  const all = parseRecipientLines(body.toString("utf8"));
  const addresses = all.filter((address) => domains.has(address.slice(address.lastIndexOf("@") + 1)));
  const delimiter = typeof meta.delimiter === "string" ? meta.delimiter.slice(0, 4) : "+";
  const version = Number.isSafeInteger(meta.version) ? Number(meta.version) : Date.now();
  await store.replace(home.publicKey, {
    version,
    sha256: meta.sha256,
    delimiter,
    syncedAt: new Date().toISOString(),
    addresses,
  });
  logger.info(
    { home: home.name, count: addresses.length, ignored: all.length - addresses.length },
    "recipient list synced",
  );
  stream.sendResult({
    status: "ok",
    version,
    count: addresses.length,
    ignored: all.length - addresses.length,
  });
  stream.end();
}
