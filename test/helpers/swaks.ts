// Runs swaks (the real SMTP test client) and returns its exit code and full transcript; a failed
// session is a result to assert on, not an exception.
import { execFile } from "node:child_process";
import { promisify } from "node:util";

const exec = promisify(execFile);

export interface SwaksResult {
  code: number;
  output: string;
}

export async function swaks(args: string[]): Promise<SwaksResult> {
  try {
    const { stdout, stderr } = await exec("swaks", ["--timeout", "20", ...args], {
      maxBuffer: 16 * 1024 * 1024,
    });
    return { code: 0, output: stdout + stderr };
  } catch (error) {
    const e = error as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === "number" ? e.code : 1, output: `${e.stdout ?? ""}${e.stderr ?? ""}` };
  }
}

/** swaks to `to` through the SMTP server on loopback `port`; `args` add to or override the rest. */
export function swaksTo(port: number, to: string, args: string[] = []): Promise<SwaksResult> {
  return swaks(["--server", "127.0.0.1", "--port", String(port), "--to", to, ...args]);
}
