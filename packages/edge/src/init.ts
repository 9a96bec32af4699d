// `mxtunnel-edge init`: a new state directory with the edge's static key and its config file.
import { access, chmod, mkdir } from "node:fs/promises";
import {
  defaultEdgeConfig,
  keyFingerprint,
  parseEdgeConfig,
  StateError,
  writeFileAtomic,
} from "@mxtunnel/shared";
import { type DkimRecordFile, generateDkimKeys } from "./dkim.js";
import { EdgeState, edgePaths } from "./state.js";
import { generateTlsCertificate } from "./tls.js";

export interface InitEdgeOptions {
  dir: string;
  hostname: string;
  domains: string[];
  smtpListen?: string | undefined;
  tunnelListen?: string | undefined;
  publicUrl?: string | undefined;
}

export async function initEdge(
  options: InitEdgeOptions,
): Promise<{ configPath: string; fingerprint: string; dkim: DkimRecordFile[] }> {
  const paths = edgePaths(options.dir);
  for (const path of [paths.config, paths.key]) {
    const exists = await access(path).then(
      () => true,
      () => false,
    );
    if (exists)
      throw new StateError(
        "STATE_LOCKED",
        `${path} already exists: ${options.dir} is initialised (nothing changed)`,
      );
  }
  const config = defaultEdgeConfig({
    hostname: options.hostname,
    domains: options.domains,
    ...(options.smtpListen ? { smtpListen: options.smtpListen } : {}),
    ...(options.tunnelListen ? { tunnelListen: options.tunnelListen } : {}),
    ...(options.publicUrl ? { publicUrl: options.publicUrl } : {}),
  });
  // Validate before touching the disk: bad input changes nothing.
  parseEdgeConfig(config);
  await mkdir(options.dir, { recursive: true, mode: 0o700 });
  await chmod(options.dir, 0o700);
  const keyPair = await EdgeState.create(options.dir);
  // The certificate STARTTLS presents while the edge spools (never smtp-server's built-in one).
  await generateTlsCertificate(options.dir, config.hostname);
  // DKIM: a 2048-bit RSA key per domain (DIR/dkim, 0600), selector unique to this edge.
  const dkim = await generateDkimKeys(options.dir, config.domains, keyPair.publicKey);
  await writeFileAtomic(paths.config, `${JSON.stringify(config, null, 2)}\n`, { mode: 0o600 });
  return { configPath: paths.config, fingerprint: keyFingerprint(keyPair.publicKey), dkim };
}
