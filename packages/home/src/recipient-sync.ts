// Keeps each edge's copy of our recipient list current, and tells the edge our Postfix's size
// limit: on every tunnel up, and whenever the list file changes. The file holds one address (or
// "@domain" for a catch-all) per line; `postmap -s` output ("key<TAB>value") works as is.
import { createHash } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import type { Logger, Mux } from "@mxtunnel/shared";
import type { EdgeLink } from "./edge-link.js";

export interface RecipientSyncOptions {
  file: string | null;
  delimiter: string;
  refreshMs: number;
  messageSizeLimit: number;
  logger: Logger;
}

export function parseRecipientFile(text: string): string[] {
  const out = new Set<string>();
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*/, "").trim();
    if (!line) continue;
    const key = line.split(/\s+/)[0]!.toLowerCase();
    if (key.includes("@") && key.length <= 320) out.add(key);
  }
  return [...out].sort();
}

export class RecipientSync {
  private readonly links = new Set<EdgeLink>();
  private lastMtime = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly options: RecipientSyncOptions) {
    if (options.file) {
      this.timer = setInterval(() => void this.checkForChange(), options.refreshMs);
      this.timer.unref();
    }
  }

  attach(link: EdgeLink): void {
    this.links.add(link);
    link.on("up", (mux) => void this.sendAll(mux));
    const mux = link.currentMux;
    if (mux && !mux.closed) void this.sendAll(mux);
  }

  detach(link: EdgeLink): void {
    this.links.delete(link);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
  }

  private async checkForChange(): Promise<void> {
    const { file } = this.options;
    if (!file) return;
    const mtime = await stat(file).then(
      (s) => s.mtimeMs,
      () => 0,
    );
    if (mtime === this.lastMtime) return;
    for (const link of this.links) {
      const mux = link.currentMux;
      if (mux && !mux.closed) await this.sendList(mux);
    }
  }

  private async sendAll(mux: Mux): Promise<void> {
    mux.sendControl({ type: "limits", messageSizeLimit: this.options.messageSizeLimit });
    await this.sendList(mux);
  }

  /** Opens a sync stream with the whole list; resolves once the edge confirms. */
  async sendList(mux: Mux): Promise<void> {
    const { file, logger } = this.options;
    if (!file) return;
    let text: string;
    try {
      const info = await stat(file);
      text = await readFile(file, "utf8");
      this.lastMtime = info.mtimeMs;
    } catch (error) {
      logger.error(
        { file, err: (error as Error).message },
        "cannot read the recipient list; the edge keeps its last copy",
      );
      return;
    }
    const addresses = parseRecipientFile(text);
    const body = addresses.join("\n");
    const sha256 = createHash("sha256").update(body).digest("hex");
    try {
      const stream = mux.open("sync", {
        version: Date.now(),
        sha256,
        count: addresses.length,
        delimiter: this.options.delimiter,
      });
      stream.on("error", () => {});
      const result = await new Promise<unknown>((resolve, reject) => {
        stream.once("result", resolve);
        stream.once("reset", (_code: number, reason: string) => reject(new Error(reason)));
        stream.once("close", () => reject(new Error("tunnel closed")));
        stream.resume();
        stream.end(body);
      });
      logger.info({ count: addresses.length, result }, "recipient list synced to the edge");
    } catch (error) {
      logger.warn(
        { err: (error as Error).message },
        "recipient list sync failed; retried on the next change or reconnect",
      );
    }
  }
}
