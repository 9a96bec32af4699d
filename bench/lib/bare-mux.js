// The "throwaway two-hop WebSocket multiplexer" as an anchor for scenario 1: two Node processes
// joined by one `ws` connection, every socket read sent at once as its own WebSocket message (no
// batching, no flow control, no accept step, no PROXY header, no limits). With `chacha`, each message is
// sealed with ChaCha20-Poly1305 (node:crypto, a fresh cipher per message, counter nonces) as a Noise
// transport message is, so the pair shows what encryption alone costs such a design.
//   node bare-mux.js front LISTEN_PORT WS_PORT [chacha]   (accepts clients, like the edge)
//   node bare-mux.js back WS_PORT TARGET_PORT [chacha]    (dials the front, connects out, like home)
import { createCipheriv, createDecipheriv } from "node:crypto";
import net from "node:net";
import { WebSocket, WebSocketServer } from "ws";

const [role, portA, portB, mode] = process.argv.slice(2);
const OPEN = 1;
const DATA = 2;
const END = 3;
const CLOSE = 4;
const TAG = 16;

// A fixed key is fine for an anchor on loopback: what is measured is the work, not the secrecy.
function sealer(label) {
  const key = Buffer.alloc(32, label);
  const iv = Buffer.alloc(12);
  let nonce = 0n;
  const next = () => iv.writeBigUInt64LE(nonce++, 4);
  return {
    seal(head, body) {
      next();
      const cipher = createCipheriv("chacha20-poly1305", key, iv, { authTagLength: TAG });
      const parts = [cipher.update(head)];
      if (body) parts.push(cipher.update(body));
      cipher.final();
      parts.push(cipher.getAuthTag());
      return Buffer.concat(parts);
    },
    open(message) {
      next();
      const end = message.length - TAG;
      const decipher = createDecipheriv("chacha20-poly1305", key, iv, { authTagLength: TAG });
      decipher.setAuthTag(message.subarray(end));
      const plain = decipher.update(message.subarray(0, end));
      decipher.final();
      return plain;
    },
  };
}

function link(ws, onOpen) {
  const sockets = new Map();
  const crypto = mode === "chacha";
  const out = crypto ? sealer(role === "front" ? 1 : 2) : undefined;
  const inn = crypto ? sealer(role === "front" ? 2 : 1) : undefined;
  const send = (type, id, body) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    const head = Buffer.allocUnsafe(5);
    head[0] = type;
    head.writeUInt32BE(id, 1);
    ws.send(out ? out.seal(head, body) : body ? Buffer.concat([head, body]) : head);
  };
  const attach = (id, socket) => {
    sockets.set(id, socket);
    socket.on("data", (chunk) => send(DATA, id, chunk));
    socket.on("end", () => send(END, id));
    socket.on("error", () => {});
    socket.on("close", () => {
      if (sockets.delete(id)) send(CLOSE, id);
    });
  };
  ws.on("message", (raw) => {
    const message = inn ? inn.open(raw) : raw;
    const type = message[0];
    const id = message.readUInt32BE(1);
    if (type === OPEN) {
      attach(id, onOpen());
      return;
    }
    const socket = sockets.get(id);
    if (!socket) return;
    if (type === DATA) socket.write(message.subarray(5));
    else if (type === END) socket.end();
    else if (type === CLOSE) {
      sockets.delete(id);
      socket.destroy();
    }
  });
  return { attach, send };
}

if (role === "front") {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: Number(portB), perMessageDeflate: false });
  wss.once("connection", (ws) => {
    const tunnel = link(ws, () => {
      throw new Error("the front opens no streams on request");
    });
    let nextId = 0;
    const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (client) => {
      const id = ++nextId;
      tunnel.send(OPEN, id);
      tunnel.attach(id, client);
    });
    server.maxConnections = 100_000;
    server.listen(Number(portA), "127.0.0.1", () => process.stdout.write("listening\n"));
  });
} else if (role === "back") {
  const ws = new WebSocket(`ws://127.0.0.1:${portA}`, { perMessageDeflate: false });
  ws.on("open", () => {
    ws._socket.setNoDelay(true);
    link(ws, () =>
      net.connect({ port: Number(portB), host: "127.0.0.1", allowHalfOpen: true, noDelay: true }),
    );
    process.stdout.write("connected\n");
  });
  ws.on("close", () => process.exit(0));
} else {
  process.stderr.write("usage: bare-mux.js front LISTEN WS [chacha] | back WS TARGET [chacha]\n");
  process.exit(2);
}
process.on("SIGTERM", () => process.exit(0));
