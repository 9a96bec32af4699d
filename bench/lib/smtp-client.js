// A minimal SMTP client for latency measurements: connect → 220 banner, and timed transactions
// (MAIL, RCPT, DATA, body, final dot) on one session, one command at a time (no pipelining).
import net from "node:net";
import { percentile } from "./stats.js";

/** Reads SMTP replies off a socket: next() resolves with the next complete (final) reply line. */
class ReplyReader {
  constructor(socket) {
    this.buffer = "";
    this.waiters = [];
    this.replies = [];
    this.error = undefined;
    socket.setEncoding("latin1");
    socket.on("data", (chunk) => {
      this.buffer += chunk;
      let index = this.buffer.indexOf("\n");
      while (index >= 0) {
        const line = this.buffer.slice(0, index).replace(/\r$/, "");
        this.buffer = this.buffer.slice(index + 1);
        // "250-…" continues a multi-line reply; "250 …" ends it.
        if (line.length < 4 || line[3] !== "-") this.deliver(line);
        index = this.buffer.indexOf("\n");
      }
    });
    const fail = (error) => {
      this.error = error ?? new Error("connection closed");
      for (const waiter of this.waiters.splice(0)) waiter.reject(this.error);
    };
    socket.on("error", fail);
    socket.on("close", () => fail(this.error));
  }

  deliver(line) {
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(line);
    else this.replies.push(line);
  }

  next() {
    if (this.replies.length) return Promise.resolve(this.replies.shift());
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }
}

export function connect(port, host = "127.0.0.1") {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const socket = net.connect({ port, host, noDelay: true });
    const reader = new ReplyReader(socket);
    socket.once("error", reject);
    socket.once("connect", () => {
      socket.off("error", reject);
      resolve({ socket, reader, started });
    });
  });
}

/** Time from starting the TCP connect to the complete 220 line, in ms. */
export async function readBanner(port, { quit = true, host = "127.0.0.1" } = {}) {
  const { socket, reader, started } = await connect(port, host);
  try {
    const line = await reader.next();
    const ms = performance.now() - started;
    return { line, ms, socket, reader };
  } finally {
    if (quit) {
      socket.end("QUIT\r\n");
      socket.destroy();
    }
  }
}

async function command(socket, reader, text, expect) {
  socket.write(text);
  const line = await reader.next();
  if (!line.startsWith(expect)) throw new Error(`expected ${expect} to ${text.trim()}, got ${line}`);
  return line;
}

/** One session, `count` sequential transactions of a `size`-byte message; per-transaction times in ms. */
export async function timedTransactions(port, { count, size = 4096 }) {
  const { socket, reader } = await connect(port);
  const line = await reader.next();
  if (!line.startsWith("220")) throw new Error(`no banner: ${line}`);
  await command(socket, reader, "EHLO bench.client.test\r\n", "250");
  const row = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghij\r\n";
  let body = "Subject: latency\r\n\r\n";
  while (body.length < size) body += row;
  body = `${body.slice(0, size)}\r\n.\r\n`;
  const times = [];
  for (let i = 0; i < count; i++) {
    const t0 = performance.now();
    await command(socket, reader, "MAIL FROM:<bench@client.test>\r\n", "250");
    await command(socket, reader, "RCPT TO:<user@bench.test>\r\n", "250");
    await command(socket, reader, "DATA\r\n", "354");
    await command(socket, reader, body, "250");
    times.push(performance.now() - t0);
  }
  socket.end("QUIT\r\n");
  await new Promise((resolve) => socket.once("close", resolve));
  return times;
}

/** Banner times of `count` sequential new sessions (each closed after its 220): p50 and max, in ms. */
export async function probeBanners(port, count) {
  const times = [];
  for (let i = 0; i < count; i++) times.push((await readBanner(port)).ms);
  return { p50: percentile(times, 50), max: Math.max(...times), times };
}

/**
 * Opens `count` sessions, `batch` at a time, each left open and idle after its banner. Resolves with
 * the sockets, how many banners were not 220, and the time it took.
 */
export async function holdSessions(port, count, batch = 50) {
  const sockets = [];
  let refused = 0;
  const started = performance.now();
  for (let opened = 0; opened < count; opened += batch) {
    const got = await Promise.all(
      Array.from({ length: Math.min(batch, count - opened) }, () => readBanner(port, { quit: false })),
    );
    for (const b of got) {
      if (!b.line.startsWith("220")) refused++;
      sockets.push(b.socket);
    }
  }
  return { sockets, refused, openMs: performance.now() - started };
}
