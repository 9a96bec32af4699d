// The "bare one-hop Node.js TCP proxy" anchor from issue 7: net + pipe, no crypto, no framing, Node's
// defaults otherwise. Run as its own process: node tcp-proxy.js LISTEN_PORT TARGET_PORT.
import net from "node:net";

const [listenPort, targetPort] = process.argv.slice(2).map(Number);
// Half-close passes through (pipe ends the other side), as a forwarded SMTP or byte stream needs.
const server = net.createServer({ allowHalfOpen: true }, (client) => {
  const upstream = net.connect({ port: targetPort, host: "127.0.0.1", allowHalfOpen: true });
  client.pipe(upstream);
  upstream.pipe(client);
  client.on("error", () => upstream.destroy());
  upstream.on("error", () => client.destroy());
  client.on("close", () => upstream.end());
  upstream.on("close", () => client.end());
});
server.maxConnections = 100_000;
server.listen(listenPort, "127.0.0.1", () => process.stdout.write("listening\n"));
process.on("SIGTERM", () => process.exit(0));
