// Joins a TCP socket and a tunnel stream both ways, with backpressure, half-close (END travels as
// FIN) and teardown: if either side fails, both are destroyed — but a side that ended cleanly is
// left to flush what it still has to write.
//
// A MuxStream nobody has read or written yet is wired to the socket by the mux itself
// (MuxStream.spliceSocket): socket reads go to the mux's send queue and DATA to socket.write(),
// without a Duplex and two pipes in between, which cost more CPU per SMTP reply than the mux's own
// work. Any other Duplex is piped.
import type net from "node:net";
import type { Duplex } from "node:stream";
import { MuxStream } from "./mux.js";

export function splice(socket: net.Socket, stream: Duplex, onDone?: (error?: Error) => void): void {
  if (stream instanceof MuxStream && stream.spliceSocket(socket, onDone)) return;
  pipeSplice(socket, stream, onDone);
}

/** The same join through pipe(), for any Duplex. */
export function pipeSplice(socket: net.Socket, stream: Duplex, onDone?: (error?: Error) => void): void {
  let finished = false;
  const done = (error?: Error) => {
    if (finished) return;
    finished = true;
    onDone?.(error);
  };
  socket.pipe(stream);
  stream.pipe(socket);
  socket.on("error", (error) => {
    stream.destroy();
    done(error);
  });
  stream.on("error", (error) => {
    socket.destroy();
    done(error);
  });
  stream.on("close", () => {
    // A clean END from the peer has already called socket.end(): let the socket flush and close.
    if (!(stream.readableEnded && socket.writableEnded)) socket.destroy();
    if (socket.destroyed) done();
    else socket.once("close", () => done());
  });
  socket.on("close", () => {
    if (!(socket.readableEnded && stream.writableEnded)) stream.destroy();
  });
}
