// The durable record of spooled messages home has handed to Postfix. Written (and fsynced) after
// Postfix's 250 and before home reports success to the edge, so a lost acknowledgement makes the
// edge send again and home answer "already delivered" instead of delivering twice.
import { type FileHandle, open, readFile } from "node:fs/promises";

export class InjectedLog {
  private constructor(
    private readonly handle: FileHandle,
    private readonly ids: Set<string>,
  ) {}

  static async open(path: string): Promise<InjectedLog> {
    let text = "";
    try {
      text = await readFile(path, "utf8");
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
    }
    const ids = new Set<string>();
    for (const line of text.split("\n")) {
      const id = line.split(" ")[0];
      // A torn last line (crash mid-append) has no newline: it was never acknowledged.
      if (id && line.length > id.length) ids.add(id);
    }
    return new InjectedLog(await open(path, "a", 0o600), ids);
  }

  has(id: string): boolean {
    return this.ids.has(id);
  }

  get size(): number {
    return this.ids.size;
  }

  async record(id: string): Promise<void> {
    await this.handle.appendFile(`${id} ${new Date().toISOString()}\n`);
    await this.handle.datasync();
    this.ids.add(id);
  }

  close(): Promise<void> {
    return this.handle.close();
  }
}
