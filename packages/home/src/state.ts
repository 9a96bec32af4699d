// The home's state directory: one static key for all its edges, a separate spool key (mail the
// edge spools is sealed to it), and edges.json, a list from the start: a home may hold several MXs.
import { chmod, mkdir } from "node:fs/promises";
import { join } from "node:path";
import {
  encodeKey,
  FileLock,
  generateKeyPair,
  type KeyPair,
  keyFingerprint,
  loadKeyPair,
  readJsonFile,
  StateError,
  saveKeyPair,
  writeFileAtomic,
} from "@mxtunnel/shared";

export function homePaths(dir: string) {
  return {
    dir,
    config: join(dir, "home.json"),
    key: join(dir, "home.key"),
    spoolKey: join(dir, "spool.key"),
    edges: join(dir, "edges.json"),
    adminSocket: join(dir, "admin.sock"),
    lock: join(dir, "home.lock"),
  };
}
export type HomePaths = ReturnType<typeof homePaths>;

export interface EdgeRecord {
  url: string;
  publicKey: string;
  fingerprint: string;
  hostname: string;
  domains: string[];
  /** The name this home carries on that edge. */
  homeName: string;
  pairedAt: string;
}

interface EdgesFile {
  edges: EdgeRecord[];
}

export class HomeState {
  private constructor(
    readonly paths: HomePaths,
    readonly keyPair: KeyPair,
    /** The current spool key; replaced by `rotate-spool-key` (see spool-keys.ts). */
    public spoolKeyPair: KeyPair,
    private file: EdgesFile,
  ) {}

  /** Opens the directory; with `create`, makes it (0700) and the keys on first use. */
  static async open(dir: string, options: { create: boolean }): Promise<HomeState> {
    const paths = homePaths(dir);
    if (options.create) {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await chmod(dir, 0o700);
    }
    const keyPair = await loadOrCreate(paths.key, "mxtunnel home static key", options.create, dir);
    const spoolKeyPair = await loadOrCreate(paths.spoolKey, "mxtunnel home spool key", options.create, dir);
    const file = (await readJsonFile<EdgesFile>(paths.edges)) ?? { edges: [] };
    return new HomeState(paths, keyPair, spoolKeyPair, file);
  }

  get fingerprint(): string {
    return keyFingerprint(this.keyPair.publicKey);
  }

  get publicKeyText(): string {
    return encodeKey(this.keyPair.publicKey);
  }

  edges(): readonly EdgeRecord[] {
    return this.file.edges;
  }

  async addEdge(record: EdgeRecord): Promise<void> {
    this.file.edges = [...this.file.edges.filter((edge) => edge.publicKey !== record.publicKey), record];
    await this.save();
  }

  resolveEdge(ref: string): EdgeRecord {
    const matches = this.file.edges.filter(
      (edge) =>
        edge.hostname === ref || edge.fingerprint === ref || edge.url === ref || edge.publicKey === ref,
    );
    if (matches.length === 1) return matches[0]!;
    const known =
      this.file.edges.map((edge) => `${edge.hostname} (${edge.fingerprint})`).join(", ") || "none";
    throw new StateError(
      "STATE_MISSING",
      matches.length === 0
        ? `no paired edge matches "${ref}"; paired edges: ${known}`
        : `"${ref}" matches several edges; use the fingerprint`,
    );
  }

  async removeEdge(ref: string): Promise<EdgeRecord> {
    const edge = this.resolveEdge(ref);
    this.file.edges = this.file.edges.filter((e) => e.publicKey !== edge.publicKey);
    await this.save();
    return edge;
  }

  private save(): Promise<void> {
    return writeFileAtomic(this.paths.edges, `${JSON.stringify(this.file, null, 2)}\n`, { mode: 0o600 });
  }
}

async function loadOrCreate(path: string, label: string, create: boolean, dir: string): Promise<KeyPair> {
  try {
    return await loadKeyPair(path);
  } catch (error) {
    if ((error as { code?: string }).code !== "STATE_MISSING") throw error;
    if (!create)
      throw new StateError(
        "STATE_MISSING",
        `${dir} has no home key yet: pair first with \`mxtunnel-home pair --dir ${dir}\``,
      );
    const keyPair = generateKeyPair();
    await saveKeyPair(path, keyPair, label);
    return keyPair;
  }
}

export async function lockHomeState(dir: string, purpose: string): Promise<FileLock> {
  return FileLock.acquire(homePaths(dir).lock, purpose);
}
