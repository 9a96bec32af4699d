// A byte-exact SMTP client for tests: replies are parsed as they arrive (multi-line replies joined),
// nothing is normalised, and every wait has a deadline.
import net from "node:net";
import type tls from "node:tls";
import { waitFor } from "../e2e/lab/wait.js";

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
