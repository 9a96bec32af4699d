// Extra trust anchors for outbound TLS (edge.json `outbound.tlsCaFile`): a PEM file of one or more
// certificates, each checked to parse, so a bad file is refused when the config is loaded rather than
// at the first delivery that needs it.
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g;

/** The PEM certificates in `path`; throws an Error whose message says what is wrong with the file. */
export function readCaFile(path: string): string[] {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw new Error(`${path} does not exist`);
    if (code === "EACCES") throw new Error(`${path} is not readable by this user`);
    if (code === "EISDIR") throw new Error(`${path} is a directory, expected a PEM file`);
    throw new Error(`${path} could not be read (${code ?? (error as Error).message})`);
  }
  const certificates = text.match(PEM_CERTIFICATE) ?? [];
  if (certificates.length === 0) {
    throw new Error(
      `${path} holds no PEM certificate ("-----BEGIN CERTIFICATE-----" … "-----END CERTIFICATE-----")`,
    );
  }
  certificates.forEach((pem, i) => {
    try {
      new X509Certificate(pem);
    } catch {
      throw new Error(`certificate ${i + 1} of ${certificates.length} in ${path} is not a valid certificate`);
    }
  });
  return certificates;
}
