// Shared pieces of the adversarial suite: a byte-exact SMTP client from a chosen loopback address,
// an edge in backup-MX mode (home paired, recipient list synced, then gone), in live mode (home
// connected, a real Postfix behind it) and with a home's outbound relay listener, a raw
// authenticated home tunnel the test drives, and the tally every file prints (and may write as
// JSON) so that SECURITY.md's table comes from real runs.
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import type { EdgeAgentOptions } from "@mxtunnel/edge";
import { connectToEdge, type HomeState } from "@mxtunnel/home";
import {
  AGENT_VERSION,
  decodeKey,
  initiateHandshake,
  PROTOCOL_VERSION,
  type SecureChannel,
  TUNNEL_PATH,
  TUNNEL_PROLOGUE,
  type WebSocketTransport,
} from "@mxtunnel/shared";
import { type Mailbox, startMailbox } from "../../demo/src/mailbox.js";
import { freePort } from "../e2e/lab/ports.js";
import { type PostfixLab, startPostfix } from "../e2e/lab/postfix.js";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupLater, makeEdge, makeHome, type TestEdge, tempDir } from "../helpers/agents.js";

// ---- tally ----------------------------------------------------------------------------------------

export interface TallyRow {
  tried: number;
  accepted: number;
  faults: number;
  lost: number;
  duplicates: number;
}

/** Counts per attack class; printed after the file's tests and written to $MXTUNNEL_ADVERSARIAL_OUT. */
export class Tally {
  private readonly rows = new Map<string, TallyRow>();

  constructor(private readonly file: string) {}

  add(attackClass: string, row: Partial<TallyRow>): void {
    const current = this.rows.get(attackClass) ?? {
      tried: 0,
      accepted: 0,
      faults: 0,
      lost: 0,
      duplicates: 0,
    };
    for (const key of ["tried", "accepted", "faults", "lost", "duplicates"] as const) {
      current[key] += row[key] ?? 0;
    }
    this.rows.set(attackClass, current);
  }

  async flush(): Promise<void> {
    if (this.rows.size === 0) return;
    for (const [name, r] of this.rows) {
      console.info(
        `ADVERSARIAL ${name}: tried ${r.tried}, accepted ${r.accepted}, faults ${r.faults}, lost ${r.lost}, duplicates ${r.duplicates}`,
      );
    }
    const out = process.env.MXTUNNEL_ADVERSARIAL_OUT;
    if (out) {
      await mkdir(out, { recursive: true });
      await writeFile(
        join(out, `${this.file}.json`),
        `${JSON.stringify(Object.fromEntries(this.rows), null, 2)}\n`,
      );
    }
  }
}

// ---- SMTP client: test/helpers/smtp-client.ts -------------------------------------------------

export { closeAllClients, type SmtpClient, smtpConnect, smtpOver } from "../helpers/smtp-client.js";

// ---- an edge in backup-MX mode -------------------------------------------------------------------

export interface SpoolLab {
  edge: TestEdge;
  homeDir: string;
  box: Mailbox;
  recipientsFile: string;
  homeOverrides: Record<string, unknown>;
}

/**
 * An edge whose only home has synced alice@home.test and bob@home.test and then gone away: every
 * session on port 25 is answered by the edge's own smtp-server. The demo mailbox stands in for Postfix.
 */
export async function spoolLab(
  edgeOverrides: Record<string, unknown> = {},
  options: { spoolOpenFile?: EdgeAgentOptions["spoolOpenFile"] } = {},
): Promise<SpoolLab> {
  const box = await startMailbox();
  const recipientsFile = join(await tempDir("rcpt"), "recipients");
  await writeFile(recipientsFile, "alice@home.test\nbob@home.test\n");
  const edge = await makeEdge({
    overrides: { "spool.retryMin": 100, "spool.retryMax": 500, ...edgeOverrides },
    ...(options.spoolOpenFile ? { spoolOpenFile: options.spoolOpenFile } : {}),
  });
  const homeOverrides = { "postfix.inject": `127.0.0.1:${box.port}`, "recipients.file": recipientsFile };
  const home = await makeHome(await edge.token(), homeOverrides, "spool-home");
  await waitFor(() => edge.agent.spool.recipients.info(edge.agent.state.homes()[0]!.publicKey), {
    what: "recipient sync",
  });
  await home.stop();
  await waitFor(() => !edge.agent.status().homes[0]!.connected, { what: "the edge to see home gone" });
  return { edge, homeDir: home.dir, box, recipientsFile, homeOverrides };
}

// ---- an edge in live mode, and a home's outbound relay listener -----------------------------------

/**
 * An edge whose home is connected and injects into a real Postfix: port 25 sessions are spliced
 * live. Postfix stops at cleanupAgents, after the agents.
 */
export async function liveLab(): Promise<{ postfix: PostfixLab; edge: TestEdge }> {
  const postfix = await startPostfix();
  cleanupLater(() => postfix.stop());
  const edge = await makeEdge();
  await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${postfix.injectPort}` }, "live-home");
  return { postfix, edge };
}

/** An edge with a connected home whose outbound relay listener (Postfix's relayhost) is on relayPort. */
export async function relayLab(
  edgeOverrides: Record<string, unknown> = {},
): Promise<{ edge: TestEdge; relayPort: number }> {
  const relayPort = await freePort();
  const edge = await makeEdge({ overrides: edgeOverrides });
  await makeHome(await edge.token(), { relayListen: `127.0.0.1:${relayPort}` }, "relay-home");
  return { edge, relayPort };
}

// ---- raw tunnel ----------------------------------------------------------------------------------

/** An authenticated home tunnel the test drives byte by byte (to misbehave on purpose). */
export interface RawTunnel {
  channel: SecureChannel;
  transport: WebSocketTransport;
  /** Every WebSocket message sent so far, as it went on the wire (message 1, then ciphertexts). */
  sent: Uint8Array[];
}

export async function rawTunnel(url: string, state: HomeState): Promise<RawTunnel> {
  const transport = await connectToEdge(url, TUNNEL_PATH, 5000);
  const sent: Uint8Array[] = [];
  const send = transport.send.bind(transport);
  transport.send = (message: Uint8Array) => {
    sent.push(Uint8Array.from(message));
    send(message);
  };
  const channel = await initiateHandshake(
    transport,
    {
      pattern: "IK",
      prologue: TUNNEL_PROLOGUE,
      staticKeyPair: state.keyPair,
      remoteStaticPublicKey: decodeKey(state.edges()[0]!.publicKey, "edge key"),
      payload: { version: AGENT_VERSION, protocol: PROTOCOL_VERSION },
      timeoutMs: 5000,
    },
    (secure) => secure,
  );
  return { channel, transport, sent };
}

/** True while the edge counts the named home as connected. */
export function homeConnected(edge: TestEdge, name: string): boolean {
  return edge.agent.status().homes.find((h) => h.name === name)?.connected ?? false;
}
