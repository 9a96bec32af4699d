// A TCP sink for stream-throughput runs: counts what a connection sends and, at its end, answers with
// the count as one line. Run as its own process: node byte-sink.js PORT.
import net from "node:net";

const port = Number(process.argv[2]);
const server = net.createServer({ allowHalfOpen: true }, (socket) => {
  let bytes = 0;
  socket.on("data", (chunk) => {
    bytes += chunk.length;
  });
  socket.on("end", () => socket.end(`${bytes}\n`));
  socket.on("error", () => {});
});
server.listen(port, "127.0.0.1", () => process.stdout.write("listening\n"));
process.on("SIGTERM", () => process.exit(0));
