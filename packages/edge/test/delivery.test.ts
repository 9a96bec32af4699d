import { mkdtemp, rm, writeFile } from "node:fs/promises";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createLogger, type HostPort, readCaFile } from "@mxtunnel/shared";
import { generate } from "selfsigned";
import { SMTPServer } from "smtp-server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startDnsServer } from "../../../test/helpers/dns-server.js";
import { Deliverer, enhancedOf, isRefusedDestination, RouteError } from "../src/delivery.js";

const logger = createLogger({ name: "test", level: "silent" });

interface Received {
  ehlo: string;
  mailFrom: string;
  mailArgs: unknown;
  rcptTo: string[];
  message: string;
}

async function receiver(rcptReplies: Record<string, { code: number; text: string }>) {
  const received: Received[] = [];
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ["STARTTLS", "AUTH"],
    logger: false,
    onRcptTo(address, _session, callback) {
      const reply = rcptReplies[address.address];
      if (reply) return callback(Object.assign(new Error(reply.text), { responseCode: reply.code }));
      callback();
    },
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on("data", (c: Buffer) => chunks.push(c));
      stream.on("end", () => {
        received.push({
          ehlo: session.hostNameAppearsAs,
          mailFrom: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
          mailArgs: session.envelope.mailFrom ? session.envelope.mailFrom.args : undefined,
          rcptTo: session.envelope.rcptTo.map((r) => r.address),
          message: Buffer.concat(chunks).toString(),
        });
        callback();
      });
    },
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.server.address() as AddressInfo).port;
  return { server, port, received, stop: () => new Promise<void>((r) => server.close(() => r())) };
}

function deliverer(options: {
  transports?: Record<string, HostPort>;
  dnsServers?: string[];
  requireTLS?: string[];
  tlsCa?: string[];
}) {
  return new Deliverer({
    hostname: "mx.edge.test",
    transports: options.transports ?? {},
    dnsServers: options.dnsServers ?? [],
    requireTLS: options.requireTLS ?? [],
    logger,
    connectTimeoutMs: 5000,
    commandTimeoutMs: 10_000,
    ...(options.tlsCa ? { tlsCa: options.tlsCa } : {}),
  });
}

/** One small message from a@home.test to b@remote.test. */
const toB = {
  domain: "remote.test",
  mailFrom: "a@home.test",
  params: {},
  recipients: [{ address: "b@remote.test", params: {} }],
  message: Buffer.from("From: a@home.test\r\n\r\nx\r\n"),
};

describe("route lookup", () => {
  let dns: Awaited<ReturnType<typeof startDnsServer>>;
  beforeAll(async () => {
    dns = await startDnsServer({
      "loop.test": { mx: [{ priority: 10, exchange: "mx.loop.test" }] },
      "mx.loop.test": { a: ["127.0.0.1"] },
      "private.test": { mx: [{ priority: 10, exchange: "mx.private.test" }] },
      "mx.private.test": { a: ["192.168.1.10"], aaaa: ["fd00::25"] },
      "nullmx.test": { mx: [{ priority: 0, exchange: "" }] },
      "aonly.test": { a: ["203.0.113.5"] },
      "empty.test": {},
      "pref.test": {
        mx: [
          { priority: 20, exchange: "backup.pref.test" },
          { priority: 5, exchange: "primary.pref.test" },
        ],
      },
      "primary.pref.test": { a: ["203.0.113.10"] },
      "backup.pref.test": { a: ["198.51.100.20"], aaaa: ["2001:db8::20"] },
      "half.test": {
        mx: [
          { priority: 10, exchange: "a.half.test" },
          { priority: 20, exchange: "b.half.test" },
        ],
      },
      "a.half.test": { a: ["10.0.0.1"] },
      "b.half.test": { a: ["203.0.113.77"] },
    });
  });
  afterAll(() => dns.stop());

  const expectRouteError = async (domain: string, outcome: string, enhanced: string) => {
    const error = await deliverer({ dnsServers: [dns.address] })
      .route(domain)
      .catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RouteError);
    expect((error as RouteError).outcome).toBe(outcome);
    expect((error as RouteError).enhanced).toBe(enhanced);
  };

  it("orders MX hosts by preference and resolves A and AAAA", async () => {
    const hops = await deliverer({ dnsServers: [dns.address] }).route("pref.test");
    expect(hops.map((h) => h.name)).toEqual(["primary.pref.test", "backup.pref.test"]);
    expect(hops[1]?.addresses).toEqual(["198.51.100.20", "2001:db8::20"]);
    expect(hops[0]?.port).toBe(25);
  });

  it("falls back to the domain's own A record when it has no MX", async () => {
    const hops = await deliverer({ dnsServers: [dns.address] }).route("aonly.test");
    expect(hops).toEqual([{ name: "aonly.test", addresses: ["203.0.113.5"], port: 25 }]);
  });

  it("refuses an MX pointing at 127.0.0.1 as a permanent failure", async () => {
    await expectRouteError("loop.test", "failed", "5.4.4");
  });

  it("refuses private and unique-local answers", async () => {
    await expectRouteError("private.test", "failed", "5.4.4");
  });

  it("skips a private MX but keeps a public one", async () => {
    const hops = await deliverer({ dnsServers: [dns.address] }).route("half.test");
    expect(hops.map((h) => h.name)).toEqual(["b.half.test"]);
  });

  it("treats a null MX (RFC 7505) as a permanent failure", async () => {
    await expectRouteError("nullmx.test", "failed", "5.1.10");
  });

  it("fails a domain that does not exist, and one with no MX, A or AAAA", async () => {
    await expectRouteError("nosuch.test", "failed", "5.1.2");
    await expectRouteError("empty.test", "failed", "5.1.2");
  });

  it("defers when the resolver cannot be reached", async () => {
    const error = await new Deliverer({
      hostname: "mx.edge.test",
      transports: {},
      dnsServers: ["127.0.0.1:9"],
      requireTLS: [],
      logger,
      connectTimeoutMs: 1000,
      commandTimeoutMs: 1000,
    })
      .route("pref.test")
      .catch((e: unknown) => e);
    expect((error as RouteError).outcome).toBe("deferred");
  });

  it("lets transports name loopback hosts, and asks no DNS for them", async () => {
    const before = dns.queries.length;
    const hops = await deliverer({
      dnsServers: [dns.address],
      transports: { "loop.test": { host: "127.0.0.1", port: 2526 } },
    }).route("loop.test");
    expect(hops).toEqual([{ name: "127.0.0.1", addresses: ["127.0.0.1"], port: 2526 }]);
    expect(dns.queries.length).toBe(before);
  });

  it("resolves a transport's host name with dnsServers, loopback allowed, and keeps the name", async () => {
    const hops = await deliverer({
      dnsServers: [dns.address],
      transports: { "remote.test": { host: "mx.loop.test", port: 2526 } },
    }).route("remote.test");
    expect(hops).toEqual([{ name: "mx.loop.test", addresses: ["127.0.0.1"], port: 2526 }]);
  });

  it("classifies destinations", () => {
    const own = new Set(["203.0.113.1"]);
    expect(isRefusedDestination("127.0.0.1", own)).toBe(true);
    expect(isRefusedDestination("::ffff:10.1.2.3", own)).toBe(true);
    expect(isRefusedDestination("203.0.113.1", own)).toBe(true);
    expect(isRefusedDestination("224.0.0.1", own)).toBe(true);
    expect(isRefusedDestination("ff02::1", own)).toBe(true);
    expect(isRefusedDestination("203.0.113.2", own)).toBe(false);
    expect(isRefusedDestination("2001:db8::1", own)).toBe(false);
  });

  it("reads enhanced codes from replies", () => {
    expect(enhancedOf("550 5.1.1 no such user", 550)).toBe("5.1.1");
    expect(enhancedOf("451 try later", 451)).toBe("4.0.0");
    expect(enhancedOf("", 554)).toBe("5.0.0");
  });
});

describe("delivery over SMTP", () => {
  let rx: Awaited<ReturnType<typeof receiver>>;
  beforeAll(async () => {
    rx = await receiver({
      "gone@remote.test": { code: 550, text: "5.1.1 no such user" },
      "busy@remote.test": { code: 450, text: "4.2.1 mailbox busy" },
    });
  });
  afterAll(() => rx.stop());

  it("carries every recipient of the domain on one connection, EHLO = edge hostname, with a result each", async () => {
    const message = Buffer.from(
      "From: a@home.test\r\nTo: b@remote.test\r\nSubject: x\r\n\r\n.leading dot\r\nbody\r\n",
    );
    const results = await deliverer({
      transports: { "remote.test": { host: "127.0.0.1", port: rx.port } },
    }).deliver({
      domain: "remote.test",
      mailFrom: "a@home.test",
      params: { BODY: "8BITMIME" },
      recipients: [
        { address: "b@remote.test", params: {} },
        { address: "gone@remote.test", params: {} },
        { address: "busy@remote.test", params: {} },
      ],
      message,
    });
    expect(results.map((r) => [r.address, r.outcome, r.code, r.enhanced])).toEqual([
      ["b@remote.test", "delivered", 250, "2.0.0"],
      ["gone@remote.test", "failed", 550, "5.1.1"],
      ["busy@remote.test", "deferred", 450, "4.2.1"],
    ]);
    expect(rx.received).toHaveLength(1);
    const got = rx.received[0]!;
    expect(got.ehlo).toBe("mx.edge.test");
    expect(got.mailFrom).toBe("a@home.test");
    expect(got.rcptTo).toEqual(["b@remote.test"]);
    expect(got.message).toBe(message.toString());
    expect(got.mailArgs).toMatchObject({ BODY: "8BITMIME" });
  });

  it("defers when nothing listens, and when requireTLS meets a server without STARTTLS", async () => {
    const closed = await deliverer({ transports: { "remote.test": { host: "127.0.0.1", port: 9 } } }).deliver(
      toB,
    );
    expect(closed[0]?.outcome).toBe("deferred");
    const noTls = await deliverer({
      transports: { "remote.test": { host: "127.0.0.1", port: rx.port } },
      requireTLS: ["remote.test"],
    }).deliver(toB);
    expect(noTls[0]?.outcome).toBe("deferred");
    expect(noTls[0]?.enhanced).toBe("4.7.10");
  });
});

describe("outbound TLS", () => {
  // A throwaway CA issuing the MX's certificate, a second CA nobody trusts, and a self-signed one.
  type Pems = { key: string; cert: string };
  const caExtensions = [
    { name: "basicConstraints" as const, cA: true, critical: true },
    { name: "keyUsage" as const, keyCertSign: true, cRLSign: true, critical: true },
  ];
  const leafExtensions = (name: string) => [
    { name: "basicConstraints" as const, cA: false },
    { name: "extKeyUsage" as const, serverAuth: true },
    { name: "subjectAltName" as const, altNames: [{ type: 2 as const, value: name }] },
  ];
  const makeCa = async (cn: string): Promise<Pems> => {
    const made = await generate([{ name: "commonName", value: cn }], {
      keyType: "ec",
      algorithm: "sha256",
      extensions: caExtensions,
    });
    return { key: made.private, cert: made.cert };
  };
  const makeLeaf = async (name: string, ca?: Pems): Promise<Pems> => {
    const made = await generate([{ name: "commonName", value: name }], {
      keyType: "ec",
      algorithm: "sha256",
      extensions: leafExtensions(name),
      ...(ca ? { ca } : {}),
    });
    return { key: made.private, cert: made.cert };
  };

  let dir: string;
  let caFile: string;
  let dns: Awaited<ReturnType<typeof startDnsServer>>;
  let trusted: Awaited<ReturnType<typeof tlsReceiver>>;
  let untrusted: Awaited<ReturnType<typeof tlsReceiver>>;
  let selfSigned: Awaited<ReturnType<typeof tlsReceiver>>;
  let plain: Awaited<ReturnType<typeof receiver>>;

  async function tlsReceiver(pems: Pems) {
    const sni: string[] = [];
    const received: { secure: boolean; rcptTo: string[] }[] = [];
    const server = new SMTPServer({
      authOptional: true,
      disabledCommands: ["AUTH"],
      logger: false,
      key: pems.key,
      cert: pems.cert,
      SNICallback(servername, callback) {
        sni.push(servername);
        callback(null, undefined);
      },
      onData(stream, session, callback) {
        stream.resume();
        stream.on("end", () => {
          received.push({ secure: session.secure, rcptTo: session.envelope.rcptTo.map((r) => r.address) });
          callback();
        });
      },
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    const port = (server.server.address() as AddressInfo).port;
    return { port, sni, received, stop: () => new Promise<void>((r) => server.close(() => r())) };
  }

  beforeAll(async () => {
    const ca = await makeCa("mxtunnel test CA");
    const stranger = await makeCa("unknown test CA");
    dir = await mkdtemp(join(tmpdir(), "mxt-delivery-tls-"));
    caFile = join(dir, "ca.pem");
    await writeFile(caFile, ca.cert);
    trusted = await tlsReceiver(await makeLeaf("mx.remote.test", ca));
    untrusted = await tlsReceiver(await makeLeaf("mx.remote.test", stranger));
    selfSigned = await tlsReceiver(await makeLeaf("mx.remote.test"));
    plain = await receiver({});
    // Both names lead to the loopback MX; only the first is in its certificate.
    dns = await startDnsServer({
      "mx.remote.test": { a: ["127.0.0.1"] },
      "alias.remote.test": { a: ["127.0.0.1"] },
    });
  });
  afterAll(async () => {
    await Promise.all([trusted.stop(), untrusted.stop(), selfSigned.stop(), plain.stop(), dns.stop()]);
    await rm(dir, { recursive: true, force: true });
  });

  const send = (options: { host: string; port: number; requireTLS: boolean; tlsCa?: string[] }) =>
    deliverer({
      transports: { "remote.test": { host: options.host, port: options.port } },
      dnsServers: [dns.address],
      requireTLS: options.requireTLS ? ["remote.test"] : [],
      ...(options.tlsCa ? { tlsCa: options.tlsCa } : {}),
    }).deliver(toB);

  it("delivers to a requireTLS domain whose MX presents a certificate from the configured CA for its name", async () => {
    const results = await send({
      host: "mx.remote.test",
      port: trusted.port,
      requireTLS: true,
      tlsCa: readCaFile(caFile),
    });
    expect(results.map((r) => [r.outcome, r.remoteMta])).toEqual([["delivered", "mx.remote.test"]]);
    expect(trusted.received.at(-1)).toEqual({ secure: true, rcptTo: ["b@remote.test"] });
    // SNI names the MX host (resolved by the edge to 127.0.0.1), not the address dialled.
    expect(trusted.sni.at(-1)).toBe("mx.remote.test");
  });

  it("defers a requireTLS domain when the certificate does not name the MX host", async () => {
    const before = trusted.received.length;
    const results = await send({
      host: "alias.remote.test",
      port: trusted.port,
      requireTLS: true,
      tlsCa: readCaFile(caFile),
    });
    expect(results[0]).toMatchObject({ outcome: "deferred", code: 451, enhanced: "4.7.5" });
    expect(results[0]?.message).toContain("certificate of alias.remote.test does not match that name");
    expect(trusted.received.length).toBe(before);
  });

  it("defers a requireTLS domain when the certificate is from an unknown CA or self-signed", async () => {
    const unknownCa = await send({
      host: "mx.remote.test",
      port: untrusted.port,
      requireTLS: true,
      tlsCa: readCaFile(caFile),
    });
    expect(unknownCa[0]).toMatchObject({ outcome: "deferred", enhanced: "4.7.5" });
    expect(unknownCa[0]?.message).toContain("certificate of mx.remote.test not trusted");
    expect(untrusted.received).toHaveLength(0);
    // Without tlsCaFile, only Node's CAs are trusted: the test CA's certificate is refused too.
    const nodeCasOnly = await send({ host: "mx.remote.test", port: trusted.port, requireTLS: true });
    expect(nodeCasOnly[0]).toMatchObject({ outcome: "deferred", enhanced: "4.7.5" });
    const selfSignedResult = await send({
      host: "mx.remote.test",
      port: selfSigned.port,
      requireTLS: true,
      tlsCa: readCaFile(caFile),
    });
    expect(selfSignedResult[0]?.message).toMatch(
      /certificate of mx\.remote\.test not trusted \(self[- ]signed/,
    );
    expect(selfSigned.received).toHaveLength(0);
  });

  it("defers a requireTLS domain whose MX offers no STARTTLS, never sending in plain text", async () => {
    const results = await send({ host: "127.0.0.1", port: plain.port, requireTLS: true });
    expect(results[0]).toMatchObject({ outcome: "deferred", enhanced: "4.7.10" });
    expect(plain.received).toHaveLength(0);
  });

  it("still delivers to other domains over TLS it cannot verify (opportunistic)", async () => {
    const results = await send({ host: "mx.remote.test", port: selfSigned.port, requireTLS: false });
    expect(results[0]?.outcome).toBe("delivered");
    expect(selfSigned.received).toEqual([{ secure: true, rcptTo: ["b@remote.test"] }]);
  });
});
