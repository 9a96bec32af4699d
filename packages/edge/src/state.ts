// The edge's state directory: its static key, the homes it has paired and the tokens it issued.
// One process writes it at a time: the running agent, or a CLI command holding the lock.
import { join } from "node:path";
import {
  decodeKey,
  encodeKey,
  encodePairingToken,
  FileLock,
  generateKeyPair,
  type KeyPair,
  keyFingerprint,
  loadKeyPair,
  newTokenSecret,
  pairingPsk,
  readJsonFile,
  StateError,
  saveKeyPair,
  TokenError,
  tokenId,
  writeFileAtomic,
} from "@mxtunnel/shared";

export function edgePaths(dir: string) {
  return {
    dir,
    config: join(dir, "edge.json"),
    key: join(dir, "edge.key"),
    peers: join(dir, "peers.json"),
    tokens: join(dir, "tokens.json"),
    adminSocket: join(dir, "admin.sock"),
    lock: join(dir, "edge.lock"),
  };
}
export type EdgePaths = ReturnType<typeof edgePaths>;

export interface HomeRecord {
  name: string;
  publicKey: string;
  fingerprint: string;
  spoolPublicKey: string;
  domains: string[];
  pairedAt: string;
  tokenId: string;
}

export interface TokenRecord {
  id: string;
  /** The PSK derived from the token's secret; the token itself is never stored. */
  psk: string;
  createdAt: string;
  expiresAt: string;
  domains: string[];
  usedBy?: string;
  usedAt?: string;
}

interface PeersFile {
  homes: HomeRecord[];
}
interface TokensFile {
  tokens: TokenRecord[];
}

/** Used tokens are kept this long past expiry so a home whose ENROL reply was lost can retry. */
const USED_TOKEN_GRACE_MS = 24 * 3600_000;

export class EdgeState {
  private constructor(
    readonly paths: EdgePaths,
    readonly keyPair: KeyPair,
    private peers: PeersFile,
    private tokens: TokensFile,
  ) {}

  static async create(dir: string): Promise<KeyPair> {
    const paths = edgePaths(dir);
    const keyPair = generateKeyPair();
    await saveKeyPair(paths.key, keyPair, "mxtunnel edge static key");
    await writeFileAtomic(paths.peers, json({ homes: [] }), { mode: 0o600 });
    await writeFileAtomic(paths.tokens, json({ tokens: [] }), { mode: 0o600 });
    return keyPair;
  }

  /** Opens the directory. `readOnly` skips pruning, for status and checks that hold no lock. */
  static async open(dir: string, options: { readOnly?: boolean; now?: Date } = {}): Promise<EdgeState> {
    const paths = edgePaths(dir);
    const keyPair = await loadKeyPair(paths.key).catch((error: unknown) => {
      if ((error as { code?: string }).code === "STATE_MISSING")
        throw new StateError(
          "STATE_MISSING",
          `${dir} has no edge key: run \`mxtunnel-edge init --dir ${dir}\` first`,
        );
      throw error;
    });
    const peers = (await readJsonFile<PeersFile>(paths.peers)) ?? { homes: [] };
    const tokens = (await readJsonFile<TokensFile>(paths.tokens)) ?? { tokens: [] };
    const state = new EdgeState(paths, keyPair, peers, tokens);
    if (!options.readOnly) await state.pruneTokens(options.now);
    return state;
  }

  get fingerprint(): string {
    return keyFingerprint(this.keyPair.publicKey);
  }

  homes(): readonly HomeRecord[] {
    return this.peers.homes;
  }

  /** Issued tokens no home has used yet (for status: a token about to expire unused). */
  unusedTokens(): readonly Pick<TokenRecord, "id" | "expiresAt" | "domains">[] {
    return this.tokens.tokens
      .filter((token) => !token.usedBy)
      .map(({ id, expiresAt, domains }) => ({ id, expiresAt, domains }));
  }

  /**
   * Records a home's new spool key (home rotated it and said so over its authenticated tunnel).
   * Mail spooled from now on is sealed to it; files already spooled keep the key id they name.
   */
  async setSpoolKey(homePublicKey: string, spoolPublicKey: Uint8Array): Promise<boolean> {
    const home = this.peers.homes.find((h) => h.publicKey === homePublicKey);
    const encoded = encodeKey(spoolPublicKey);
    if (!home || home.spoolPublicKey === encoded) return false;
    home.spoolPublicKey = encoded;
    await this.savePeers();
    return true;
  }

  findHome(publicKey: Uint8Array): HomeRecord | undefined {
    const encoded = encodeKey(publicKey);
    return this.peers.homes.find((home) => home.publicKey === encoded);
  }

  /** Resolves a home named on the command line by name, fingerprint or public key. */
  resolveHome(ref: string): HomeRecord {
    const matches = this.peers.homes.filter(
      (home) =>
        home.name === ref ||
        home.fingerprint === ref ||
        home.publicKey === ref ||
        home.fingerprint === `SHA256:${ref}`,
    );
    if (matches.length === 1) return matches[0]!;
    const known = this.peers.homes.map((home) => `${home.name} (${home.fingerprint})`).join(", ") || "none";
    if (matches.length === 0)
      throw new StateError("STATE_MISSING", `no paired home matches "${ref}"; paired homes: ${known}`);
    throw new StateError(
      "STATE_MISSING",
      `"${ref}" matches several homes; use the fingerprint. Paired homes: ${known}`,
    );
  }

  async issueToken(options: { ttlMs: number; domains: string[]; url: string; now?: Date }): Promise<string> {
    const now = options.now ?? new Date();
    const secret = newTokenSecret();
    const expiresAt = new Date(Math.floor((now.getTime() + options.ttlMs) / 1000) * 1000);
    const record: TokenRecord = {
      id: tokenId(secret),
      psk: encodeKey(pairingPsk(secret, this.keyPair.publicKey)),
      createdAt: now.toISOString(),
      expiresAt: expiresAt.toISOString(),
      domains: options.domains,
    };
    this.tokens.tokens.push(record);
    await this.saveTokens();
    return encodePairingToken({
      version: 1,
      expiresAt,
      edgePublicKey: this.keyPair.publicKey,
      secret,
      url: options.url,
    });
  }

  /**
   * Checks a pairing attempt named by token id from home key `homeKey`, before the edge answers
   * message 1. Same token + same key again succeeds (a lost reply); another key is refused.
   */
  tokenForPairing(
    id: string,
    homeKey: Uint8Array,
    now = new Date(),
  ): { record: TokenRecord; psk: Uint8Array } {
    const record = this.tokens.tokens.find((token) => token.id === id);
    if (!record)
      throw new TokenError("TOKEN_UNKNOWN", "this edge did not issue that token (or it was pruned)");
    const homeKeyText = encodeKey(homeKey);
    if (record.usedBy && record.usedBy !== homeKeyText) {
      throw new TokenError(
        "TOKEN_USED",
        `the token was already used by home key ${keyFingerprint(decodeKey(record.usedBy, "home key"))}; make a new one with \`mxtunnel-edge pair\``,
      );
    }
    if (!record.usedBy && Date.parse(record.expiresAt) <= now.getTime()) {
      throw new TokenError(
        "TOKEN_EXPIRED",
        `the token expired at ${record.expiresAt}; make a new one with \`mxtunnel-edge pair\``,
      );
    }
    return { record, psk: decodeKey(record.psk, "token psk") };
  }

  /**
   * Burns the token and records the home. Order matters for crash safety: the token is marked used
   * by this key first, so a crash before peers.json is written leaves a token only this key can
   * finish; never one token pairing two keys.
   */
  async enrol(options: {
    tokenId: string;
    homeKey: Uint8Array;
    spoolPublicKey: Uint8Array;
    name: string;
    now?: Date;
  }): Promise<HomeRecord> {
    const now = options.now ?? new Date();
    const { record } = this.tokenForPairing(options.tokenId, options.homeKey, now);
    const homeKeyText = encodeKey(options.homeKey);
    if (!record.usedBy) {
      record.usedBy = homeKeyText;
      record.usedAt = now.toISOString();
      await this.saveTokens();
    }
    const existing = this.peers.homes.find((home) => home.publicKey === homeKeyText);
    const home: HomeRecord = {
      name: existing?.name ?? uniqueName(options.name, this.peers.homes),
      publicKey: homeKeyText,
      fingerprint: keyFingerprint(options.homeKey),
      spoolPublicKey: encodeKey(options.spoolPublicKey),
      domains: [...new Set([...(existing?.domains ?? []), ...record.domains])],
      pairedAt: existing?.pairedAt ?? now.toISOString(),
      tokenId: record.id,
    };
    this.peers.homes = [...this.peers.homes.filter((h) => h.publicKey !== homeKeyText), home];
    await this.savePeers();
    return home;
  }

  async unpair(ref: string): Promise<HomeRecord> {
    const home = this.resolveHome(ref);
    this.peers.homes = this.peers.homes.filter((h) => h.publicKey !== home.publicKey);
    await this.savePeers();
    return home;
  }

  async pruneTokens(now = new Date()): Promise<void> {
    const keep = this.tokens.tokens.filter((token) => {
      const expires = Date.parse(token.expiresAt);
      return token.usedBy ? expires + USED_TOKEN_GRACE_MS > now.getTime() : expires > now.getTime();
    });
    if (keep.length !== this.tokens.tokens.length) {
      this.tokens.tokens = keep;
      await this.saveTokens();
    }
  }

  private saveTokens(): Promise<void> {
    return writeFileAtomic(this.paths.tokens, json(this.tokens), { mode: 0o600 });
  }

  private savePeers(): Promise<void> {
    return writeFileAtomic(this.paths.peers, json(this.peers), { mode: 0o600 });
  }
}

function uniqueName(wanted: string, homes: readonly HomeRecord[]): string {
  const base = wanted.replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 64) || "home";
  let name = base;
  for (let n = 2; homes.some((home) => home.name === name); n++) name = `${base}-${n}`;
  return name;
}

function json(value: unknown): string {
  return `${JSON.stringify(value, null, 2)}\n`;
}

export async function lockEdgeState(dir: string, purpose: string): Promise<FileLock> {
  return FileLock.acquire(edgePaths(dir).lock, purpose);
}
