// A hostile edge: a peer holding a valid edge key, here a real edge agent whose tunnel Mux the test
// drives directly. It names services home does not list, passes private and loopback client
// addresses (allowPrivateClientIPs is false), floods spool streams and sends spool files with corrupt
// chunks. Home refuses each, opens no connection it should not (counting listeners in front of every
// target it has), and delivers nothing corrupt.
import { once } from "node:events";
import { readFile } from "node:fs/promises";
import net from "node:net";
import { type MuxStream, ResetCode, readSpoolMeta } from "@mxtunnel/shared";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Mailbox } from "../../demo/src/mailbox.js";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents, startTestHome, type TestEdge, type TestHome } from "../helpers/agents.js";
import { type SpoolLab, smtpConnect, spoolLab, Tally } from "./support.js";

const tally = new Tally("hostile-edge");
afterAll(() => tally.flush());

/** A TCP relay that counts every connection made to it before passing it on. */
async function countingProxy(targetPort: number) {
  let connections = 0;
  const server = net.createServer((socket) => {
    connections++;
    const upstream = net.connect({ host: "127.0.0.1", port: targetPort });
    socket.pipe(upstream).pipe(socket);
    socket.on("error", () => upstream.destroy());
    upstream.on("error", () => socket.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    connections: () => connections,
    stop: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** Opens a stream from the edge's side and resolves with how it ended: ACCEPT, RESET, or RESULT. */
function outcome(
  stream: MuxStream,
): Promise<{ kind: "accept" | "reset" | "result"; code?: number; result?: unknown }> {
  return new Promise((resolve) => {
    stream.on("error", () => {});
    stream.once("accept", () => resolve({ kind: "accept" }));
    stream.once("reset", (code: number) => resolve({ kind: "reset", code }));
    stream.once("result", (result: unknown) => resolve({ kind: "result", result }));
  });
}

describe("a hostile edge against a real home", () => {
  let lab: SpoolLab;
  let edge: TestEdge;
  let home: TestHome;
  let box: Mailbox;
  let inject: Awaited<ReturnType<typeof countingProxy>>;
  let imap: Awaited<ReturnType<typeof countingProxy>>;
  let spoolFile: { meta: Record<string, unknown>; body: Buffer };

  const edgeMux = () => edge.agent.tunnels.liveTunnels()[0]!.mux;
  const forwardMeta = (service: string, address: string) => ({
    service,
    session: "hostile",
    client: { address, port: 40000 },
    local: { address: "198.51.100.1", port: 25 },
  });

  beforeAll(async () => {
    lab = await spoolLab({ "spool.messagesPerIpPerMinute": 100_000 });
    edge = lab.edge;
    box = lab.box;
    // One message spooled while home is away: the corrupt-chunk tests tamper with a copy of it.
    const { client } = await smtpConnect(edge.smtpPort);
    await client.command("EHLO sender.example");
    await client.command("MAIL FROM:<sender@example.net>");
    await client.command("RCPT TO:<alice@home.test>");
    await client.command("DATA");
    client.send(`Subject: sealed\r\n\r\n${"line of the sealed message\r\n".repeat(6000)}.\r\n`);
    expect(await client.reply()).toMatch(/^250 /);
    await client.command("QUIT");
    const [entry] = edge.agent.spool.store.list();
    const meta = await readSpoolMeta(entry!.path);
    const bytes = await readFile(entry!.path);
    const headerOffset = 12;
    spoolFile = {
      meta: {
        id: entry!.id,
        headerLength: meta.cipherOffset - headerOffset,
        cipherLength: meta.cipherLength,
        cipherSha256: meta.cipherSha256,
      },
      body: bytes.subarray(headerOffset, meta.cipherOffset + meta.cipherLength),
    };
    // The hostile edge sends spool streams itself: its own drain stays out of the way.
    edge.agent.spool.drain.stop();
    await edge.agent.spool.store.remove(entry!.id);
    inject = await countingProxy(box.port);
    imap = await countingProxy(box.port);
    home = await startTestHome(lab.homeDir, {
      ...lab.homeOverrides,
      "postfix.inject": `127.0.0.1:${inject.port}`,
      services: { imap: { target: `127.0.0.1:${imap.port}` } },
      allowPrivateClientIPs: false,
    });
    await home.agent.waitConnected(10_000);
    await waitFor(() => edge.agent.tunnels.liveTunnels()[0], { what: "the tunnel on the edge's side" });
  }, 90_000);

  afterAll(async () => {
    await cleanupAgents();
    await inject?.stop();
    await imap?.stop();
    await box?.close();
  });

  it("unknown services are refused before any connection is made", async () => {
    const names = [
      "imaps",
      "__proto__",
      "constructor",
      "toString",
      "hasOwnProperty",
      "",
      "SMTP",
      "smtp ",
      " smtp",
      "../smtp",
      "smtp\0",
      "imap/../smtp",
      "x".repeat(4000),
    ];
    let accepted = 0;
    for (const name of names) {
      const result = await outcome(edgeMux().open("forward", forwardMeta(name, "203.0.113.9")));
      if (result.kind !== "reset") accepted++;
      expect(result, JSON.stringify(name.slice(0, 20))).toEqual({ kind: "reset", code: ResetCode.REFUSED });
    }
    // Malformed metadata: refused the same way.
    for (const meta of [
      {},
      { service: "smtp" },
      { service: "smtp", client: { address: 1, port: 1 }, local: {} },
    ]) {
      const result = await outcome(edgeMux().open("forward", meta));
      if (result.kind !== "reset") accepted++;
    }
    tally.add("hostile edge: unknown services / malformed meta", { tried: names.length + 3, accepted });
    expect(accepted).toBe(0);
    expect(inject.connections() + imap.connections()).toBe(0);
  });

  it("private, loopback and malformed client addresses are refused; a public one is served (control)", async () => {
    const addresses = [
      "127.0.0.1",
      "127.1.2.3",
      "10.0.0.1",
      "172.16.5.4",
      "172.31.255.255",
      "192.168.1.1",
      "169.254.1.1",
      "100.64.0.1",
      "0.0.0.0",
      "::1",
      "::",
      "fc00::1",
      "fd12:3456::1",
      "fe80::1",
      "::ffff:127.0.0.1",
      "::ffff:10.1.1.1",
      "::ffff:192.168.0.1",
      "localhost",
      "not-an-ip",
      "",
      "127.0.0.1\r\nPROXY TCP4 1.2.3.4",
      "10.0.0.1 203.0.113.9",
    ];
    let accepted = 0;
    for (const service of ["smtp", "imap"]) {
      for (const address of addresses) {
        const result = await outcome(edgeMux().open("forward", forwardMeta(service, address)));
        if (result.kind !== "reset") accepted++;
        expect(result, `${service} ${address}`).toEqual({ kind: "reset", code: ResetCode.ADDRESS_REFUSED });
      }
    }
    expect(inject.connections() + imap.connections()).toBe(0);
    const control = edgeMux().open("forward", forwardMeta("smtp", "203.0.113.9"));
    expect((await outcome(control)).kind).toBe("accept");
    await waitFor(() => inject.connections() === 1, { what: "the control connection" });
    control.destroy();
    tally.add("hostile edge: private / loopback client addresses", { tried: addresses.length * 2, accepted });
    expect(accepted).toBe(0);
  });

  it("a flood of bogus spool streams: each refused or answered corrupt, no connection to Postfix", async () => {
    const before = inject.connections();
    const streams: Promise<{ kind: string; result?: unknown }>[] = [];
    const n = 300;
    for (let i = 0; i < n; i++) {
      const bad = i % 3;
      const stream = edgeMux().open("spool", { id: `flood-${i}`, headerLength: bad === 0 ? -1 : 40 });
      const done = outcome(stream).then(async (first) => {
        if (first.kind !== "accept") return first;
        return new Promise<{ kind: string; result?: unknown }>((resolve) => {
          stream.once("result", (result: unknown) => resolve({ kind: "result", result }));
          stream.once("reset", () => resolve({ kind: "reset" }));
        });
      });
      if (bad === 1) stream.end(Buffer.from(`{"not":"a spool header"}${" ".repeat(20)}`));
      else if (bad === 2) stream.end(Buffer.from("short"));
      streams.push(done);
    }
    const results = await Promise.all(streams);
    const delivered = results.filter(
      (r) => (r.result as { status?: string } | undefined)?.status === "delivered",
    );
    expect(
      results.every((r) => r.kind === "reset" || (r.result as { status: string }).status === "corrupt"),
    ).toBe(true);
    expect(delivered).toEqual([]);
    expect(inject.connections()).toBe(before);
    expect(home.agent.status().edges[0]?.connected).toBe(true);
    tally.add("hostile edge: spool stream flood", { tried: n, accepted: delivered.length });
  }, 30_000);

  it("corrupt chunks are never delivered; the intact file is, once, and a replay is a duplicate", async () => {
    const positions = [
      spoolFile.body.length - 1, // last byte of the final chunk (tag)
      spoolFile.body.length - 20_000, // inside the last chunk
      (spoolFile.meta.headerLength as number) + 100, // first chunk
      (spoolFile.meta.headerLength as number) + 70_000, // second chunk
      10, // the clear header
    ];
    const messagesBefore = box.messages.length;
    let delivered = 0;
    const send = async (body: Buffer) => {
      const stream = edgeMux().open("spool", spoolFile.meta);
      const first = await outcome(stream);
      if (first.kind !== "accept") return first;
      const result = once(stream, "result").then(([r]) => r as { status: string; duplicate?: boolean });
      stream.end(body);
      return { kind: "result", result: await result };
    };
    for (const at of positions) {
      const body = Buffer.from(spoolFile.body);
      body[at] = body[at]! ^ 0x40;
      const r = await send(body);
      const status = (r.result as { status?: string } | undefined)?.status;
      if (status === "delivered") delivered++;
      expect(r.kind === "reset" || status === "corrupt", `flip at ${at}`).toBe(true);
    }
    // Truncated: the final chunk missing, and data after the final chunk.
    for (const body of [
      spoolFile.body.subarray(0, spoolFile.body.length - 100),
      Buffer.concat([spoolFile.body, Buffer.from("tail")]),
    ]) {
      const r = await send(body);
      const status = (r.result as { status?: string } | undefined)?.status;
      if (status === "delivered") delivered++;
      expect(r.kind === "reset" || status === "corrupt").toBe(true);
    }
    expect(box.messages.length).toBe(messagesBefore);
    tally.add("hostile edge: corrupt / truncated spool chunks", {
      tried: positions.length + 2,
      accepted: delivered,
    });
    expect(delivered).toBe(0);
    // Control: the intact file is delivered once; sent again, it is acknowledged as a duplicate.
    const good = await send(spoolFile.body);
    expect(good.result).toMatchObject({ status: "delivered" });
    const again = await send(spoolFile.body);
    expect(again.result).toMatchObject({ status: "delivered", duplicate: true });
    await waitFor(() => box.messages.length === messagesBefore + 1, { what: "one delivery" });
    expect(box.messages.at(-1)?.data.toString()).toContain("line of the sealed message");
  }, 30_000);
});
