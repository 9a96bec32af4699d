// The operator commands through the real binaries: a bad config file refused with every problem and
// nothing started, `dns`, `doctor` against a loopback test DNS server, status, rotate-spool-key.
import { type ChildProcess, spawn } from "node:child_process";
import { access, readFile, stat, writeFile } from "node:fs/promises";
import net from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { dkimRecords } from "@mxtunnel/edge";
import { keyFingerprint, loadKeyPair } from "@mxtunnel/shared";
import { afterEach, describe, expect, it } from "vitest";
import { freePort } from "../e2e/lab/ports.js";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents, makeEdge, pairedHomeDir, tempDir } from "../helpers/agents.js";
import { reverseName, startDnsServer, type TestDnsServer } from "../helpers/dns-server.js";

const root = fileURLToPath(new URL("../..", import.meta.url));
const EDGE = join(root, "packages/edge/dist/cli.js");
const HOME = join(root, "packages/home/dist/cli.js");
const children = new Set<ChildProcess>();
const servers: (TestDnsServer | net.Server)[] = [];

afterEach(async () => {
  for (const child of children) if (child.exitCode === null) child.kill("SIGKILL");
  children.clear();
  for (const server of servers.splice(0)) {
    if (server instanceof net.Server) await new Promise((resolve) => server.close(resolve));
    else await server.stop();
  }
  await cleanupAgents();
});

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(bin: string, args: string[]): Promise<Result> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d));
    child.stderr.on("data", (d: Buffer) => (stderr += d));
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

function refused(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: "127.0.0.1", port });
    socket.once("connect", () => {
      socket.destroy();
      resolve(false);
    });
    socket.once("error", () => resolve(true));
  });
}

const exists = (path: string) =>
  access(path).then(
    () => true,
    () => false,
  );

async function initEdge(extra: Record<string, unknown> = {}) {
  const dir = join(await tempDir("op-edge"), "state");
  const smtpPort = await freePort();
  const tunnelPort = await freePort();
  const init = await run(EDGE, [
    "init",
    "--dir",
    dir,
    "--hostname",
    "mx.example.test",
    "--domain",
    "example.test",
    "--smtp-listen",
    `127.0.0.1:${smtpPort}`,
    "--tunnel-listen",
    `127.0.0.1:${tunnelPort}`,
  ]);
  expect(init.code, init.stderr).toBe(0);
  const path = join(dir, "edge.json");
  const config = JSON.parse(await readFile(path, "utf8")) as Record<string, unknown>;
  await writeFile(path, JSON.stringify({ ...config, ...extra }, null, 2));
  return { dir, smtpPort, tunnelPort, config };
}

describe("a bad config file", () => {
  it("edge: every problem with its key path, exit 2, nothing started", async () => {
    const { dir, smtpPort, tunnelPort } = await initEdge({
      smtpListen: "0.0.0.0",
      mxPriority: -1,
      publicAddresses: ["192.0.2.300"],
      checks: { dnsbls: ["not a domain"], minFreeSpace: "lots" },
      limits: { maxConection: 5 },
      colour: "blue",
    });
    // The listeners would be these ports if the file were good.
    const result = await run(EDGE, ["run", "--dir", dir]);
    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
    const lines = result.stderr.trim().split("\n");
    expect(lines[0]).toBe("mxtunnel-edge: invalid configuration:");
    expect(
      lines
        .slice(1)
        .map((l) => l.trim().split(":")[0])
        .sort(),
    ).toEqual(
      [
        "checks.dnsbls[0]",
        "checks.minFreeSpace",
        "colour",
        "limits.maxConection",
        "mxPriority",
        "publicAddresses[0]",
        "smtpListen",
      ].sort(),
    );
    expect(result.stderr).toContain('limits.maxConection: unknown key (did you mean "maxConnections"?)');
    expect(result.stderr).toContain("mxPriority: expected a whole number from 0 to 65535, got -1");
    expect(result.stderr).not.toMatch(/\n\s+at /);
    // Nothing started: no listener, no admin socket, no lock left behind.
    expect(await refused(smtpPort)).toBe(true);
    expect(await refused(tunnelPort)).toBe(true);
    expect(await exists(join(dir, "admin.sock"))).toBe(false);
    expect(await exists(join(dir, "edge.lock"))).toBe(false);
  });

  it("home: every problem with its key path, exit 2, nothing started", async () => {
    const edge = await makeEdge();
    const { dir } = await pairedHomeDir(await edge.token());
    const relayPort = await freePort();
    await writeFile(
      join(dir, "home.json"),
      JSON.stringify({
        postfix: { inject: "localhost", proxyProtocol: "v3" },
        relayListen: `0.0.0.0:${relayPort}`,
        reconnect: { minDelay: "soon" },
        services: { imaps: { target: "127.0.0.1:993", proxy: "v2" } },
      }),
    );
    const result = await run(HOME, ["run", "--dir", dir]);
    expect(result.code).toBe(2);
    const keys = result.stderr
      .trim()
      .split("\n")
      .slice(1)
      .map((l) => l.trim().split(":")[0]);
    expect(keys.sort()).toEqual(
      [
        "postfix.inject",
        "postfix.proxyProtocol",
        "reconnect.minDelay",
        "relayListen",
        "services.imaps.proxy",
      ].sort(),
    );
    expect(result.stderr).toContain("relayAuth with at least one user is required");
    expect(await refused(relayPort)).toBe(true);
    expect(await exists(join(dir, "admin.sock"))).toBe(false);
    expect(edge.agent.status().homes[0]?.connected).toBe(false);
  });
});

describe("dns and doctor", () => {
  it("dns prints the records to paste; doctor passes on that zone and fails precisely when the PTR is wrong", async () => {
    const dns = await startDnsServer({});
    servers.push(dns);
    const mx = net.createServer((socket) => {
      socket.on("error", () => {});
      socket.resume();
      socket.end("220 remote.test ESMTP\r\n");
    });
    servers.push(mx);
    await new Promise<void>((resolve) => mx.listen(0, "127.0.0.1", resolve));
    const mxPort = (mx.address() as net.AddressInfo).port;
    const { dir } = await initEdge({
      dnsServers: [dns.address],
      publicAddresses: ["192.0.2.10"],
      mxPriority: 20,
      checks: { dnsbls: ["bl.test"], outboundProbe: `127.0.0.1:${mxPort}`, minFreeSpace: 0 },
    });

    const printed = await run(EDGE, ["dns", "--dir", dir]);
    expect(printed.code, printed.stderr).toBe(0);
    const [key] = await dkimRecords(dir);
    const text = printed.stdout;
    expect(text).toMatch(/^mx\.example\.test\.\s+3600 IN A\s+192\.0\.2\.10$/m);
    expect(text).toMatch(/^example\.test\.\s+3600 IN MX\s+20 mx\.example\.test\.$/m);
    expect(text).toMatch(/^example\.test\.\s+3600 IN TXT\s+"v=spf1 ip4:192\.0\.2\.10 -all"$/m);
    expect(text).toContain(`${key!.name}.`);
    expect(text).toMatch(
      /^_dmarc\.example\.test\.\s+3600 IN TXT\s+"v=DMARC1; p=quarantine; rua=mailto:postmaster@example\.test"$/m,
    );
    expect(text).toMatch(/^10\.2\.0\.192\.in-addr\.arpa\.\s+3600 IN PTR\s+mx\.example\.test\.$/m);
    expect(text).toContain("_mta-sts.example.test.");
    expect(text).toContain("_smtp._tls.example.test.");
    const json = JSON.parse(
      (await run(EDGE, ["dns", "--dir", dir, "--json", "--ip", "198.51.100.4"])).stdout,
    ) as {
      addressSource: string;
      records: { name: string; type: string; value: string }[];
    };
    expect(json.addressSource).toBe("flag");
    expect(json.records.find((r) => r.type === "A")?.value).toBe("198.51.100.4");
    // The DKIM record as printed is the key on disk.
    expect(json.records.find((r) => r.name === key!.name)?.value).toBe(key!.record);

    // Publish exactly what `dns --json` printed (the PTR as the provider would).
    for (const record of JSON.parse((await run(EDGE, ["dns", "--dir", dir, "--json"])).stdout).records as {
      name: string;
      type: string;
      value: string;
      required: boolean;
    }[]) {
      if (!record.required) continue;
      const zone = dns.zones[record.name] ?? {};
      dns.zones[record.name] = zone;
      const [priority, exchange] = record.value.split(" ");
      if (record.type === "A") zone.a = [...(zone.a ?? []), record.value];
      if (record.type === "MX")
        zone.mx = [...(zone.mx ?? []), { priority: Number(priority), exchange: exchange! }];
      if (record.type === "TXT") zone.txt = [...(zone.txt ?? []), record.value];
      if (record.type === "PTR") zone.ptr = [...(zone.ptr ?? []), record.value];
    }

    const agent = spawn(process.execPath, [EDGE, "run", "--dir", dir], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    children.add(agent);
    agent.stderr.resume();
    await waitFor(() => stat(join(dir, "admin.sock")).then(() => true), { what: "the edge's admin socket" });

    const good = await run(EDGE, ["doctor", "--dir", dir, "--timeout", "2s"]);
    expect(good.stdout).not.toMatch(/^FAIL/m);
    expect(good.code, good.stdout).toBe(0);
    expect(good.stdout).toMatch(/^PASS\s+ptr\s+192\.0\.2\.10 → mx\.example\.test/m);
    expect(good.stdout).toMatch(/^PASS\s+dkim\s+/m);
    expect(good.stdout).toMatch(/^PASS\s+port25\s+outbound SMTP to 127\.0\.0\.1:\d+ works/m);
    expect(good.stdout).toMatch(/^PASS\s+agent\s+the edge agent is running/m);
    expect(good.stdout).toMatch(/^WARN\s+tunnel\s+no home is paired yet/m);

    dns.zones[reverseName("192.0.2.10")] = { ptr: ["vps-12.provider.test"] };
    const bad = await run(EDGE, ["doctor", "--dir", dir, "--timeout", "2s", "--json"]);
    expect(bad.code).toBe(1);
    const report = JSON.parse(bad.stdout) as {
      failed: boolean;
      checks: { level: string; check: string; message: string }[];
    };
    expect(report.failed).toBe(true);
    expect(report.checks.filter((c) => c.level === "fail")).toEqual([
      expect.objectContaining({
        check: "ptr",
        message: expect.stringContaining("192.0.2.10 → vps-12.provider.test, expected mx.example.test"),
      }),
    ]);
  });
});

describe("status and keys through the binaries", () => {
  it("edge status shows queues, warnings; home rotate-spool-key offline keeps the old key beside the new", async () => {
    const { dir } = await initEdge();
    const status = await run(EDGE, ["status", "--dir", dir]);
    expect(status.code, status.stderr).toBe(0);
    expect(status.stdout).toContain("queues   spool 0; outbound 0");
    expect(status.stdout).toContain("WARNING  the edge agent is not running: no mail is received");
    const json = JSON.parse((await run(EDGE, ["status", "--dir", dir, "--json"])).stdout) as Record<
      string,
      unknown
    >;
    expect(json).toMatchObject({
      running: false,
      today: null,
      lastErrors: [],
      queues: { spool: 0, outbound: 0 },
    });
    expect(json.freeBytes).toEqual(expect.any(Number));

    const edge = await makeEdge();
    const { dir: homeDir } = await pairedHomeDir(await edge.token());
    const before = keyFingerprint((await loadKeyPair(join(homeDir, "spool.key"))).publicKey);
    const rotate = await run(HOME, ["rotate-spool-key", "--dir", homeDir]);
    expect(rotate.code, rotate.stderr).toBe(0);
    const after = keyFingerprint((await loadKeyPair(join(homeDir, "spool.key"))).publicKey);
    expect(after).not.toBe(before);
    expect(rotate.stdout).toContain(`new spool key ${after}`);
    expect(rotate.stdout).toContain(before);
    const old = await loadKeyPair(join(homeDir, `spool.${before.slice("SHA256:".length)}.old.key`));
    expect(keyFingerprint(old.publicKey)).toBe(before);
    expect((await stat(join(homeDir, "spool.key"))).mode & 0o777).toBe(0o600);

    const homeStatus = JSON.parse((await run(HOME, ["status", "--dir", homeDir, "--json"])).stdout) as {
      spoolKeys: { current: string; retiring: { id: string; waitingFor: string[] }[] };
      warnings: string[];
    };
    expect(homeStatus.spoolKeys).toMatchObject({
      current: after,
      retiring: [{ id: before, waitingFor: ["mx.edge.test"] }],
    });

    const doctor = await run(HOME, ["doctor", "--dir", homeDir, "--timeout", "1s"]);
    expect(doctor.code).toBe(1);
    expect(doctor.stdout).toMatch(/^FAIL\s+agent\s+the home agent is not running/m);
  });
});
