// `npm start`: both agents on loopback in temporary folders, paired automatically, a mail sent
// to the edge's SMTP port arriving in an embedded mailbox with the original client IP.
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { initEdge, issuePairingToken, loadEdgeConfigFrom, startEdge } from "@mxtunnel/edge";
import { ensureHomeConfig, HomeState, loadHomeConfigFrom, pairWithEdge, startHome } from "@mxtunnel/home";
import { createLogger } from "@mxtunnel/shared";
import nodemailer from "nodemailer";
import { startMailbox } from "./mailbox.js";

const keep = process.argv.includes("--keep");
const say = (line = "") => process.stdout.write(`${line}\n`);

async function freePort(host = "127.0.0.1"): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, host, resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

async function main(): Promise<void> {
  const root = await mkdtemp(join(tmpdir(), "mxtunnel-demo-"));
  const edgeDir = join(root, "edge");
  const homeDir = join(root, "home");
  const logger = createLogger({ name: "demo", level: process.env.MXTUNNEL_DEMO_LOG ?? "warn" });
  const mailbox = await startMailbox();
  const [smtpPort, tunnelPort] = [await freePort(), await freePort()];

  say("mxtunnel loopback demo");
  say(`  state in ${root}`);
  await initEdge({
    dir: edgeDir,
    hostname: "mx.demo.test",
    domains: ["demo.test"],
    smtpListen: `127.0.0.1:${smtpPort}`,
    tunnelListen: `127.0.0.1:${tunnelPort}`,
    publicUrl: `ws://127.0.0.1:${tunnelPort}`,
  });
  const edgeConfig = await loadEdgeConfigFrom(edgeDir, { stableAfter: 0 });
  const edge = await startEdge({ dir: edgeDir, config: edgeConfig, logger: logger.child({ agent: "edge" }) });
  say(`  edge   SMTP on 127.0.0.1:${smtpPort}, tunnel on ws://127.0.0.1:${tunnelPort}/tunnel`);

  const { token } = await issuePairingToken(edge.state, edgeConfig, { ttlMs: 600_000 });
  const homeState = await HomeState.open(homeDir, { create: true });
  await ensureHomeConfig(homeDir);
  let started = performance.now();
  const paired = await pairWithEdge({ token, state: homeState, name: "demo-home" });
  say(
    `  paired home "${paired.homeName}" with ${paired.hostname} (${paired.fingerprint}) in ${(performance.now() - started).toFixed(1)} ms`,
  );

  const homeConfig = await loadHomeConfigFrom(homeDir, {
    "postfix.inject": `127.0.0.1:${mailbox.port}`,
    relayListen: `127.0.0.1:${await freePort()}`,
    allowPrivateClientIPs: true,
  });
  started = performance.now();
  const home = await startHome({ dir: homeDir, config: homeConfig, logger: logger.child({ agent: "home" }) });
  await home.waitConnected(10_000);
  say(`  tunnel up in ${(performance.now() - started).toFixed(1)} ms (Noise IK over WebSocket)`);
  const mux = [...home.links.values()][0]?.currentMux;
  if (mux) {
    const rtts: number[] = [];
    for (let i = 0; i < 5; i++) rtts.push(await mux.ping());
    rtts.sort((a, b) => a - b);
    say(`  tunnel round trip (PING/PONG, 5 tries): median ${rtts[2]?.toFixed(2)} ms`);
  }

  const transport = nodemailer.createTransport({
    host: "127.0.0.1",
    port: smtpPort,
    secure: false,
    ignoreTLS: true,
    localAddress: "127.0.0.2",
    name: "client.demo.test",
  });
  started = performance.now();
  const arrived = new Promise((resolve) => mailbox.once("message", resolve));
  const info = await transport.sendMail({
    from: "someone@example.net",
    to: "alice@demo.test",
    subject: "Hello through the tunnel",
    text: "This message entered the edge on port 25 and reached the home mailbox through the tunnel.\n",
  });
  await arrived;
  const message = mailbox.messages[0];
  say(
    `  mail from 127.0.0.2 → edge → tunnel → home → mailbox: ${info.response} in ${(performance.now() - started).toFixed(1)} ms`,
  );
  say(
    `  the mailbox saw client ${message?.clientAddress} (HELO ${message?.helo}): the real client IP, via the PROXY v2 header`,
  );
  transport.close();

  say("");
  say("What to try next:");
  if (keep) {
    say(`  swaks --server 127.0.0.1:${smtpPort} --to alice@demo.test --local-interface 127.0.0.3`);
    say(`  npx mxtunnel-edge status --dir ${edgeDir}`);
  } else {
    say("  npm start -- --keep      keeps both agents running, to try swaks and `mxtunnel-edge status`");
  }
  say("  README.md: pairing real machines, Postfix configuration, the threat model");

  if (keep) {
    say("\nrunning; Ctrl-C stops the demo");
    mailbox.on("message", (m) =>
      say(`  mailbox: ${m.from} → ${m.to.join(", ")} from ${m.clientAddress}, ${m.data.length} bytes`),
    );
    await new Promise<void>((resolve) => {
      process.once("SIGINT", resolve);
      process.once("SIGTERM", resolve);
    });
  }
  await home.stop();
  await edge.stop();
  await mailbox.close();
  await rm(root, { recursive: true, force: true });
}

main().catch((error: unknown) => {
  process.stderr.write(`demo failed: ${error instanceof Error ? error.message : String(error)}\n`);
  process.exitCode = 1;
});
