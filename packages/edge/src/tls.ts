// The certificate the edge presents on STARTTLS while it spools. Generated at init (a self-signed
// certificate: senders use opportunistic TLS and do not verify MX certificates); smtp-server's
// built-in one must never be used, since its private key is public.
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { writeFileAtomic } from "@mxtunnel/shared";

export function tlsPaths(dir: string) {
  return { key: join(dir, "tls-key.pem"), cert: join(dir, "tls-cert.pem") };
}

export async function generateTlsCertificate(dir: string, hostname: string): Promise<void> {
  // Loaded here, not at start: selfsigned (node-forge) is only needed the once a certificate is made.
  const { generate } = await import("selfsigned");
  const pems = await generate([{ name: "commonName", value: hostname }], {
    keySize: 2048,
    algorithm: "sha256",
    notAfterDate: new Date(Date.now() + 10 * 365 * 24 * 3600_000),
    extensions: [{ name: "subjectAltName", altNames: [{ type: 2, value: hostname }] }],
  });
  const paths = tlsPaths(dir);
  await writeFileAtomic(paths.key, pems.private, { mode: 0o600 });
  await writeFileAtomic(paths.cert, pems.cert, { mode: 0o644 });
}

/** Loads the certificate, generating one if an older state directory has none. */
export async function loadTlsCertificate(
  dir: string,
  hostname: string,
): Promise<{ key: Buffer; cert: Buffer }> {
  const paths = tlsPaths(dir);
  try {
    return { key: await readFile(paths.key), cert: await readFile(paths.cert) };
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
    await generateTlsCertificate(dir, hostname);
    return { key: await readFile(paths.key), cert: await readFile(paths.cert) };
  }
}
