// `doctor` against a local test DNS server: a correct zone passes, each broken record fails with a
// precise line. No internet: the resolver is the loopback test server, port 25 a loopback listener.
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type DoctorCheck, type EdgeConfig, generateKeyPair, parseEdgeConfig } from "@mxtunnel/shared";
import { generate } from "selfsigned";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import {
  reverseName,
  startDnsServer,
  type TestDnsServer,
  type Zone,
} from "../../../test/helpers/dns-server.js";
import { type DkimRecordFile, generateDkimKeys } from "../src/dkim.js";
import { type EdgeProbe, edgeDoctor, outboundTlsChecks } from "../src/doctor.js";

const IP = "192.0.2.10";
const HOST = "mx.example.test";
const DOMAIN = "example.test";

let dir: string;
let dns: TestDnsServer;
let dkim: DkimRecordFile[];
let smtp: net.Server;
let smtpPort: number;
let config: EdgeConfig;

function goodZone(): Record<string, Zone> {
  const key = dkim[0]!;
  return {
    [DOMAIN]: {
      mx: [{ priority: 10, exchange: HOST }],
      txt: [`v=spf1 ip4:${IP} -all`, "google-site-verification=x"],
    },
    [HOST]: { a: [IP] },
    [reverseName(IP)]: { ptr: [HOST] },
    [key.name]: { txt: [key.record] },
    [`_dmarc.${DOMAIN}`]: { txt: ["v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"] },
  };
}

const probe: EdgeProbe = {
  version: "0.1.0",
  homes: [
    {
      name: "home",
      fingerprint: "SHA256:x",
      connected: true,
      rttMs: 1.5,
      clockSkewMs: 12,
      peerVersion: "0.1.0",
      downSince: null,
    },
  ],
};

async function doctor(
  overrides: Partial<EdgeConfig> = {},
  p: EdgeProbe | null = probe,
): Promise<DoctorCheck[]> {
  return edgeDoctor({
    config: { ...config, ...overrides },
    dir,
    addresses: [IP],
    dkim,
    probe: p,
    timeoutMs: 2000,
  });
}

const failures = (checks: DoctorCheck[]) => checks.filter((c) => c.level === "fail");

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "mxt-doctor-"));
  dkim = await generateDkimKeys(dir, [DOMAIN], generateKeyPair().publicKey);
  dns = await startDnsServer({});
  smtp = net.createServer((socket) => {
    socket.on("error", () => {});
    socket.resume();
    socket.end("220 probe.test ESMTP\r\n");
  });
  await new Promise<void>((resolve) => smtp.listen(0, "127.0.0.1", resolve));
  smtpPort = (smtp.address() as net.AddressInfo).port;
  config = parseEdgeConfig({
    hostname: HOST,
    domains: [DOMAIN],
    dnsServers: [dns.address],
    publicAddresses: [IP],
    checks: { dnsbls: ["bl.test", "zen.test"], outboundProbe: `127.0.0.1:${smtpPort}`, minFreeSpace: 0 },
  });
});

afterAll(async () => {
  await dns.stop();
  await new Promise((resolve) => smtp.close(resolve));
  await rm(dir, { recursive: true, force: true });
});

beforeEach(() => {
  dns.zones = goodZone();
});

describe("edge doctor", () => {
  it("passes every check for a correct zone", async () => {
    const checks = await doctor();
    expect(checks.filter((c) => c.level !== "pass")).toEqual([]);
    const names = checks.map((c) => c.check);
    for (const name of [
      "address",
      "ptr",
      "mx",
      "spf",
      "dkim",
      "dmarc",
      "dnsbl",
      "port25",
      "agent",
      "tunnel",
      "clock",
      "disk",
    ])
      expect(names, name).toContain(name);
    expect(checks.find((c) => c.check === "ptr")?.message).toBe(
      `${IP} → ${HOST} (matches the hostname and the EHLO name)`,
    );
    // every DNS answer came from the test server
    expect(dns.queries).toContain(`${reverseName(IP)}/12`);
  });

  it("a wrong PTR is one precise failure", async () => {
    dns.zones[reverseName(IP)] = { ptr: ["host-192-0-2-10.provider.test"] };
    const failed = failures(await doctor());
    expect(failed).toHaveLength(1);
    expect(failed[0]).toMatchObject({
      check: "ptr",
      message: expect.stringContaining(`${IP} → host-192-0-2-10.provider.test, expected ${HOST}`),
      fix: `ask your VPS provider to set the reverse DNS (PTR) of ${IP} to ${HOST}`,
    });
  });

  it("a missing SPF record is one precise failure", async () => {
    dns.zones[DOMAIN] = { ...dns.zones[DOMAIN], txt: ["google-site-verification=x"] };
    const failed = failures(await doctor());
    expect(failed).toEqual([
      {
        level: "fail",
        check: "spf",
        message: `${DOMAIN} has no SPF record`,
        fix: `publish ${DOMAIN}. IN TXT "v=spf1 ip4:${IP} -all"`,
      },
    ]);
  });

  it("an SPF record without the edge fails; one that reaches it through include or a prefix passes", async () => {
    dns.zones[DOMAIN] = { ...dns.zones[DOMAIN], txt: ["v=spf1 ip4:198.51.100.1 ~all"] };
    let failed = failures(await doctor());
    expect(failed).toHaveLength(1);
    expect(failed[0]?.message).toContain(`${DOMAIN} SPF does not include ${IP}`);
    expect(failed[0]?.fix).toContain(`add ip4:${IP}`);

    dns.zones[DOMAIN] = { ...dns.zones[DOMAIN], txt: ["v=spf1 include:_spf.example.test -all"] };
    dns.zones["_spf.example.test"] = { txt: ["v=spf1 ip4:192.0.2.0/24 -all"] };
    failed = failures(await doctor());
    expect(failed).toEqual([]);

    dns.zones[DOMAIN] = { ...dns.zones[DOMAIN], txt: ["v=spf1 -ip4:192.0.2.10 mx -all"] };
    failed = failures(await doctor());
    expect(failed.map((c) => c.check)).toEqual(["spf"]);
  });

  it("a stale DKIM record (another key) and a missing one fail precisely", async () => {
    const key = dkim[0]!;
    const other = (await generateDkimKeys(join(dir, "other"), [DOMAIN], generateKeyPair().publicKey))[0]!;
    dns.zones[key.name] = { txt: [other.record] };
    let failed = failures(await doctor());
    expect(failed).toHaveLength(1);
    expect(failed[0]).toMatchObject({
      check: "dkim",
      message: expect.stringContaining(`${key.name} is stale`),
    });
    expect(failed[0]?.fix).toContain(key.record);

    delete dns.zones[key.name];
    failed = failures(await doctor());
    expect(failed).toHaveLength(1);
    expect(failed[0]?.message).toBe(
      `${key.name} is not published: mail signed with selector ${key.selector} fails DKIM`,
    );
  });

  it("a listing on a DNSBL fails with the list and its reason; a refusing list is a warning", async () => {
    const listed = `10.2.0.192.bl.test`;
    dns.zones[listed] = { a: ["127.0.0.2"], txt: ["listed for spam, see https://bl.test/q?192.0.2.10"] };
    let checks = await doctor();
    expect(failures(checks)).toEqual([
      expect.objectContaining({
        check: "dnsbl",
        message: `${IP} is listed on bl.test (127.0.0.2: listed for spam, see https://bl.test/q?192.0.2.10)`,
      }),
    ]);
    delete dns.zones[listed];
    dns.zones["10.2.0.192.zen.test"] = { a: ["127.255.255.254"] };
    checks = await doctor();
    expect(failures(checks)).toEqual([]);
    expect(checks.find((c) => c.check === "dnsbl")).toMatchObject({
      level: "warn",
      message: expect.stringContaining("zen.test (refused the query"),
    });
  });

  it("MX elsewhere, A elsewhere and no DMARC are failures; the wrong MX priority a warning", async () => {
    dns.zones[DOMAIN] = { ...dns.zones[DOMAIN], mx: [{ priority: 10, exchange: "mail.other.test" }] };
    dns.zones[HOST] = { a: ["198.51.100.7"] };
    delete dns.zones[`_dmarc.${DOMAIN}`];
    const failed = failures(await doctor());
    expect(failed.map((c) => c.message)).toEqual([
      `${HOST} A is 198.51.100.7, not ${IP}`,
      `${DOMAIN} MX does not point at this edge (10 mail.other.test)`,
      `_dmarc.${DOMAIN} has no DMARC record`,
    ]);
    dns.zones = goodZone();
    dns.zones[DOMAIN] = { ...dns.zones[DOMAIN], mx: [{ priority: 20, exchange: HOST }] };
    const checks = await doctor();
    expect(failures(checks)).toEqual([]);
    expect(checks.find((c) => c.check === "mx")?.level).toBe("warn");
    expect((await doctor({ mxPriority: 20 })).find((c) => c.check === "mx")?.level).toBe("pass");
  });

  it("outbound port 25 blocked, the agent down, a home away and a skewed clock are reported", async () => {
    const closed = net.createServer();
    await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve));
    const port = (closed.address() as net.AddressInfo).port;
    await new Promise((resolve) => closed.close(resolve));
    let checks = await doctor(
      { checks: { ...config.checks, outboundProbe: { host: "127.0.0.1", port } } },
      null,
    );
    expect(failures(checks).map((c) => c.check)).toEqual(["port25", "agent"]);
    expect(failures(checks)[0]?.message).toContain("ECONNREFUSED");

    checks = await doctor(
      {},
      {
        version: "0.1.0",
        homes: [
          {
            name: "away",
            fingerprint: "a",
            connected: false,
            rttMs: null,
            clockSkewMs: null,
            peerVersion: null,
            downSince: "2026-01-01T00:00:00.000Z",
          },
          {
            name: "late",
            fingerprint: "b",
            connected: true,
            rttMs: 3,
            clockSkewMs: -90_000,
            peerVersion: "9.0.0",
            downSince: null,
          },
        ],
      },
    );
    expect(failures(checks).map((c) => c.message)).toEqual([
      "home away: no tunnel (down since 2026-01-01T00:00:00.000Z); inbound mail is spooled",
      "home late's clock is 90000 ms behind",
    ]);
    expect(checks.find((c) => c.check === "version")?.message).toContain("the home runs 9.0.0");
  });

  it("says what requireTLS verifies, and flags a tlsCaFile that vanished, expired or is unused", async () => {
    expect((await doctor()).filter((c) => c.check === "outbound-tls")).toEqual([]);
    const made = await generate([{ name: "commonName", value: "partner CA" }], {
      keyType: "ec",
      algorithm: "sha256",
      notAfterDate: new Date("2030-01-01T00:00:00Z"),
      extensions: [{ name: "basicConstraints", cA: true, critical: true }],
    });
    const caFile = join(dir, "partner-ca.pem");
    await writeFile(caFile, made.cert);
    const outbound = { ...config.outbound, tlsCaFile: caFile };
    const tlsChecks = (overrides: Partial<EdgeConfig>, now?: number) =>
      outboundTlsChecks({ ...config, ...overrides }, now).map((c) => [c.level, c.message]);

    expect(tlsChecks({ requireTLS: ["partner.test"], outbound })).toEqual([
      [
        "pass",
        `mail to partner.test only over STARTTLS with a certificate from Node's CAs and the 1 of ${caFile} naming the MX host; other domains: TLS when offered, unverified`,
      ],
    ]);
    const expired = tlsChecks({ requireTLS: ["partner.test"], outbound }, Date.parse("2031-01-01T00:00:00Z"));
    expect(expired.map(([level]) => level)).toEqual(["warn", "pass"]);
    expect(expired[0]?.[1]).toContain("certificate 1 in outbound.tlsCaFile (CN=partner CA) is valid only");
    expect(tlsChecks({ outbound })[0]).toEqual([
      "warn",
      "outbound.tlsCaFile is set but requireTLS lists no domain, so it is not used (other domains' TLS is not verified)",
    ]);
    await rm(caFile);
    expect(tlsChecks({ requireTLS: ["partner.test"], outbound })).toEqual([
      ["fail", `outbound.tlsCaFile: ${caFile} does not exist; the edge will not start`],
    ]);
  });
});
