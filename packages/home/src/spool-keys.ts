// The home's spool keys: the current one (spool.key), which the edges seal new spooled mail to, and
// the keys it replaced (spool.<id>.old.key), kept until no edge holds mail sealed to them.
//
// Rotation: a new key pair becomes spool.key, the old one moves aside. Each edge learns the new
// public key over CONTROL (`spool-key`, sent on every tunnel up and while old keys remain) and
// answers `spool-key-ack` with the key ids of the files it still holds for this home. An old key is
// deleted once every paired edge has acknowledged the current key and none holds files sealed to it.
// See docs/protocol.md, "Spool key rotation".
import { readdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import {
  encodeKey,
  fsyncDirectory,
  generateKeyPair,
  type KeyPair,
  keyFingerprint,
  type Logger,
  loadKeyPair,
  saveKeyPair,
} from "@mxtunnel/shared";

const OLD_KEY = /^spool\.([A-Za-z0-9_-]{16})\.old\.key$/;

function idOf(pair: KeyPair): string {
  return keyFingerprint(pair.publicKey);
}

function oldKeyPath(dir: string, pair: KeyPair): string {
  return join(dir, `spool.${idOf(pair).slice("SHA256:".length)}.old.key`);
}

export interface SpoolKeyStatus {
  current: string;
  /** Edges (host names) that confirmed they seal new mail to the current key. */
  acknowledgedBy: string[];
  /** Old keys still kept, with the edges that may still hold mail sealed to them. */
  retiring: { id: string; waitingFor: string[] }[];
}

export class SpoolKeyRing {
  private old: KeyPair[];
  /** Per edge public key: whether it acknowledged the current key, and the key ids it still holds. */
  private readonly acks = new Map<string, { current: boolean; inUse: Set<string> }>();

  private constructor(
    private readonly dir: string,
    private current: KeyPair,
    old: KeyPair[],
  ) {
    this.old = old.filter((pair) => idOf(pair) !== idOf(current));
  }

  /** Loads spool.key and every old key beside it. */
  static async open(dir: string): Promise<SpoolKeyRing> {
    const current = await loadKeyPair(join(dir, "spool.key"));
    const old: KeyPair[] = [];
    for (const name of (await readdir(dir)).sort()) {
      if (OLD_KEY.test(name)) old.push(await loadKeyPair(join(dir, name)));
    }
    return new SpoolKeyRing(dir, current, old);
  }

  get currentKey(): KeyPair {
    return this.current;
  }

  get currentPublicKeyText(): string {
    return encodeKey(this.current.publicKey);
  }

  /** Every key that may open spooled mail, the current one first. */
  all(): readonly KeyPair[] {
    return [this.current, ...this.old];
  }

  oldKeyIds(): string[] {
    return this.old.map(idOf);
  }

  /**
   * Makes a new current key. Order for crash safety: the new key is written beside spool.key, the
   * old one copied aside, and only then does the rename make the new one current: a crash at any
   * point leaves every key that mail may be sealed to on disk.
   */
  async rotate(): Promise<{ current: string; retiring: string[] }> {
    const fresh = generateKeyPair();
    const next = join(this.dir, "spool.key.new");
    await rm(next, { force: true });
    await saveKeyPair(next, fresh, "mxtunnel home spool key");
    try {
      await saveKeyPair(
        oldKeyPath(this.dir, this.current),
        this.current,
        "mxtunnel home spool key (retired, kept until drained)",
      );
    } catch (error) {
      if ((error as { code?: string }).code !== "STATE_EXISTS") throw error;
    }
    await rename(next, join(this.dir, "spool.key"));
    await fsyncDirectory(this.dir);
    this.old = [this.current, ...this.old];
    this.current = fresh;
    this.acks.clear();
    return { current: idOf(fresh), retiring: this.oldKeyIds() };
  }

  /** Records an edge's `spool-key-ack`; false when it acknowledged a key that is no longer current. */
  acknowledge(edgePublicKey: string, publicKeyText: unknown, keyIdsInUse: unknown): boolean {
    if (publicKeyText !== this.currentPublicKeyText) return false;
    const inUse = new Set(
      Array.isArray(keyIdsInUse) ? keyIdsInUse.filter((k): k is string => typeof k === "string") : [],
    );
    this.acks.set(edgePublicKey, { current: true, inUse });
    return true;
  }

  /** Deletes the old keys no paired edge may still need; returns their ids. */
  async retire(edgePublicKeys: readonly string[], logger?: Logger): Promise<string[]> {
    const retired: string[] = [];
    for (const pair of [...this.old]) {
      const id = idOf(pair);
      if (this.waitingFor(id, edgePublicKeys).length) continue;
      await rm(oldKeyPath(this.dir, pair), { force: true });
      this.old = this.old.filter((p) => p !== pair);
      retired.push(id);
      logger?.info({ spoolKey: id }, "old spool key deleted: no edge holds mail sealed to it any more");
    }
    if (retired.length) await fsyncDirectory(this.dir);
    return retired;
  }

  status(edges: readonly { publicKey: string; hostname: string }[]): SpoolKeyStatus {
    const keys = edges.map((e) => e.publicKey);
    return {
      current: idOf(this.current),
      acknowledgedBy: edges.filter((e) => this.acks.get(e.publicKey)?.current).map((e) => e.hostname),
      retiring: this.oldKeyIds().map((id) => ({
        id,
        waitingFor: this.waitingFor(id, keys).map((k) => edges.find((e) => e.publicKey === k)?.hostname ?? k),
      })),
    };
  }

  private waitingFor(id: string, edgePublicKeys: readonly string[]): string[] {
    return edgePublicKeys.filter((edge) => {
      const ack = this.acks.get(edge);
      return !ack?.current || ack.inUse.has(id);
    });
  }
}

/** The key pair among `keys` that a spool file sealed to `spoolKeyId` needs (undefined: none). */
export function spoolKeyFor(keys: readonly KeyPair[], spoolKeyId: string): KeyPair | undefined {
  return keys.find((pair) => idOf(pair) === spoolKeyId);
}
