// A tiny mailbox standing in for Postfix in the demo and in tests that need no real MTA: an
// smtp-server behind a PROXY-protocol reader, so it sees the original client address exactly as
// Postfix's `smtpd_upstream_proxy_protocol=haproxy` does.
import { randomBytes } from "node:crypto";
import { EventEmitter } from "node:events";
import net from "node:net";
import { parseProxyHeader } from "@mxtunnel/shared";
import { SMTPServer } from "smtp-server";

export interface ReceivedMessage {
  clientAddress: string;
  clientPort: number;
  helo: string;
  from: string;
  to: string[];
  data: Buffer;
}

export interface Mailbox extends EventEmitter<{ message: [ReceivedMessage] }> {
  readonly port: number;
  readonly messages: ReceivedMessage[];
  close(): Promise<void>;
}

export async function startMailbox(
  options: { host?: string; port?: number; proxy?: boolean } = {},
): Promise<Mailbox> {
  const events = new EventEmitter<{ message: [ReceivedMessage] }>();
  const messages: ReceivedMessage[] = [];
  const smtp = new SMTPServer({
    banner: "demo mailbox (standing in for Postfix)",
    authOptional: true,
    disabledCommands: ["STARTTLS", "AUTH"],
    logger: false,
    size: 200 * 1024 * 1024,
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("end", () => {
        const message: ReceivedMessage = {
          clientAddress: session.remoteAddress,
          clientPort: session.remotePort,
          helo: session.hostNameAppearsAs,
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
          to: session.envelope.rcptTo.map((r) => r.address),
          data: Buffer.concat(chunks),
        };
        messages.push(message);
        events.emit("message", message);
        callback();
      });
    },
  });
  // smtp-server re-emits every session's socket error (a client that resets, as home does when the
  // tunnel is cut mid-message) on the server: without a listener that stops the process.
  smtp.on("error", () => {});
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.once("close", () => sockets.delete(socket));
    socket.on("error", () => socket.destroy());
    const id = randomBytes(8).toString("hex");
    if (options.proxy === false) return smtp.connect(socket, { id } as never);
    let buffered = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      let parsed: ReturnType<typeof parseProxyHeader>;
      try {
        parsed = parseProxyHeader(buffered);
      } catch {
        socket.end("421 4.7.0 PROXY header required\r\n");
        return;
      }
      if (parsed === "incomplete") return;
      socket.off("data", onData);
      socket.pause();
      const rest = buffered.subarray(parsed.length);
      if (rest.length) socket.unshift(rest);
      smtp.connect(socket, {
        id,
        remoteAddress: parsed.addresses?.sourceAddress ?? socket.remoteAddress,
        remotePort: parsed.addresses?.sourcePort ?? socket.remotePort,
      } as never);
      socket.resume();
    };
    socket.on("data", onData);
  });
  await new Promise<void>((resolve) =>
    server.listen(options.port ?? 0, options.host ?? "127.0.0.1", resolve),
  );
  const port = (server.address() as net.AddressInfo).port;
  return Object.assign(events, {
    port,
    messages,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  });
}
