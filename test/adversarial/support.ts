// Shared pieces of the adversarial suite: a byte-exact SMTP client from a chosen loopback address,
// an edge in backup-MX mode (home paired, recipient list synced, then gone), a raw authenticated
// home tunnel the test drives, and the tally every file prints (and may write as JSON) so that
// SECURITY.md's table comes from real runs.
import { mkdir, writeFile } from "node:fs/promises";
import net from "node:net";
import { join } from "node:path";
import type tls from "node:tls";
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
import { waitFor } from "../e2e/lab/wait.js";
import { makeEdge, makeHome, type TestEdge, tempDir } from "../helpers/agents.js";

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

// ---- SMTP client ----------------------------------------------------------------------------------

/** A byte-exact SMTP client: replies are parsed as they come, nothing is normalised. */
export interface SmtpClient {
  socket: net.Socket | tls.TLSSocket;
  /** Everything the server said so far. */
  text(): string;
  closed(): boolean;
  send(raw: string | Buffer): void;
  /** The next complete reply (multi-line replies joined), or undefined if the server closed first. */
  reply(timeoutMs?: number): Promise<string | undefined>;
  /** Sends one line (CRLF added) and returns the next reply. */
  command(line: string): Promise<string | undefined>;
  waitClosed(timeoutMs?: number): Promise<void>;
  close(): void;
}

const openClients = new Set<SmtpClient>();

export function closeAllClients(): void {
  for (const client of openClients) client.close();
  openClients.clear();
}

export function smtpOver(socket: net.Socket | tls.TLSSocket): SmtpClient {
  let all = "";
  let buffer = "";
  let closed = false;
  const replies: string[] = [];
  const waiters: (() => void)[] = [];
  const wake = () => {
    for (const waiter of waiters.splice(0)) waiter();
  };
  socket.on("data", (chunk: Buffer) => {
    const text = chunk.toString("latin1");
    all += text;
    buffer += text;
    for (;;) {
      const match = /^\d{3} [^\n]*\n/m.exec(buffer);
      if (!match) break;
      const end = match.index + match[0].length;
      replies.push(buffer.slice(0, end));
      buffer = buffer.slice(end);
    }
    wake();
  });
  socket.on("error", () => {});
  socket.on("close", () => {
    closed = true;
    wake();
  });
  const client: SmtpClient = {
    socket,
    text: () => all,
    closed: () => closed,
    send: (raw) => {
      if (!socket.destroyed) socket.write(raw);
    },
    async reply(timeoutMs = 15_000) {
      const deadline = Date.now() + timeoutMs;
      while (replies.length === 0 && !closed) {
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no SMTP reply within ${timeoutMs} ms (got ${JSON.stringify(all)})`);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, left);
          waiters.push(() => {
            clearTimeout(timer);
            resolve();
          });
        });
      }
      return replies.shift();
    },
    async command(line) {
      client.send(`${line}\r\n`);
      return client.reply();
    },
    waitClosed: (timeoutMs = 15_000) =>
      waitFor(() => closed, { timeoutMs, intervalMs: 10, what: "the server to close the connection" }).then(
        () => {},
      ),
    close: () => socket.destroy(),
  };
  openClients.add(client);
  return client;
}

/** Connects from `localAddress` (a 127/8 address) and waits for the banner. */
export async function smtpConnect(
  port: number,
  localAddress = "127.0.0.2",
): Promise<{ client: SmtpClient; banner: string | undefined }> {
  const socket = net.connect({ host: "127.0.0.1", port, localAddress });
  const client = smtpOver(socket);
  const banner = await client.reply();
  return { client, banner };
}

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
export async function spoolLab(edgeOverrides: Record<string, unknown> = {}): Promise<SpoolLab> {
  const box = await startMailbox();
  const recipientsFile = join(await tempDir("rcpt"), "recipients");
  await writeFile(recipientsFile, "alice@home.test\nbob@home.test\n");
  const edge = await makeEdge({
    overrides: { "spool.retryMin": 100, "spool.retryMax": 500, ...edgeOverrides },
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
