// A lean tunnel initiator for handshake floods: a plain TCP socket that sends the WebSocket upgrade,
// Noise IK message 1 (masked binary frame) and, after message 2, a close frame, then waits for the
// edge to close. The edge sees the same bytes as from home's `ws` client, and does the same work;
// the load generator skips the HTTP client, the `ws` client and the secure channel, so that on a
// shared 2-vCPU machine the flood measures the edge rather than its own client (in the `ws` client
// a handshake cost the bench more CPU than it cost the edge).
import { randomBytes } from "node:crypto";
import net from "node:net";

const CLOSE_NORMAL = Buffer.from([0x03, 0xe8]);

/** A masked client frame (RFC 6455 §5.2): FIN set, `opcode`, payload below 64 KiB. */
function clientFrame(opcode, payload) {
  const length = payload.length;
  const header = length < 126 ? 2 : 4;
  const frame = Buffer.allocUnsafe(header + 4 + length);
  frame[0] = 0x80 | opcode;
  if (length < 126) frame[1] = 0x80 | length;
  else {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(length, 2);
  }
  const mask = randomBytes(4);
  mask.copy(frame, header);
  for (let i = 0; i < length; i++) frame[header + 4 + i] = payload[i] ^ mask[i & 3];
  return frame;
}

/** The first complete server frame in `data`, or undefined while it is incomplete. */
function serverFrame(data) {
  if (data.length < 2) return undefined;
  let length = data[1] & 0x7f;
  let offset = 2;
  if (length === 126) {
    if (data.length < 4) return undefined;
    length = data.readUInt16BE(2);
    offset = 4;
  } else if (length === 127) throw new Error("the edge sent a frame over 64 KiB during the handshake");
  if (data.length < offset + length) return undefined;
  return { opcode: data[0] & 0x0f, payload: data.subarray(offset, offset + length) };
}

/**
 * One full tunnel handshake against `host:port`: upgrade, IK message 1 (`writeMessage1()` returns it),
 * message 2 handed to `readMessage2(bytes)`, then a normal close. Resolves once the edge has closed.
 */
export function dialTunnel({
  host,
  port,
  path,
  subprotocol,
  writeMessage1,
  readMessage2,
  timeoutMs = 10_000,
}) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    let received = Buffer.alloc(0);
    let upgraded = false;
    let handshakeDone = false;
    const fail = (error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(error);
    };
    const timer = setTimeout(() => fail(new Error(`no handshake within ${timeoutMs} ms`)), timeoutMs);
    socket.setNoDelay(true);
    socket.once("connect", () => {
      socket.write(
        `GET ${path} HTTP/1.1\r\nHost: ${host}:${port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n` +
          `Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${randomBytes(16).toString("base64")}\r\n` +
          `Sec-WebSocket-Protocol: ${subprotocol}\r\n\r\n`,
      );
    });
    socket.on("data", (chunk) => {
      received = received.length === 0 ? chunk : Buffer.concat([received, chunk]);
      try {
        if (!upgraded) {
          const end = received.indexOf("\r\n\r\n");
          if (end < 0) return;
          const status = received.subarray(0, received.indexOf("\r\n")).toString("latin1");
          if (!status.startsWith("HTTP/1.1 101")) throw new Error(`the edge answered ${status}`);
          upgraded = true;
          received = received.subarray(end + 4);
          socket.write(clientFrame(0x2, writeMessage1()));
        }
        if (!handshakeDone) {
          const frame = serverFrame(received);
          if (!frame) return;
          if (frame.opcode !== 0x2)
            throw new Error(`expected message 2, got a frame with opcode ${frame.opcode}`);
          readMessage2(frame.payload);
          handshakeDone = true;
          received = Buffer.alloc(0);
          socket.write(clientFrame(0x8, CLOSE_NORMAL));
        }
      } catch (error) {
        fail(error);
      }
    });
    // The edge answers the close frame and ends the connection; then we end ours.
    socket.once("end", () => socket.end());
    socket.once("error", fail);
    socket.once("close", () => {
      clearTimeout(timer);
      if (handshakeDone) resolve();
      else reject(new Error("the edge closed the connection during the handshake"));
    });
  });
}
