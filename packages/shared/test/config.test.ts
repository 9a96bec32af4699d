import * as fs from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  configWarnings,
  defaultEdgeConfig,
  defaultHomeConfig,
  edgeConfigWarnings,
  homeConfigWarnings,
  loadEdgeConfig,
  loadHomeConfig,
  MASK,
  maskSecrets,
  parseDuration,
  parseEdgeConfig,
  parseHomeConfig,
  parseHostPort,
} from "../src/config.js";
import { ConfigError, StateError } from "../src/errors.js";

function problemsOf(fn: () => unknown): string[] {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as ConfigError).code).toBe("CONFIG_INVALID");
    return [...(error as ConfigError).problems];
  }
  throw new Error("expected a ConfigError");
}

/** A throwaway CA certificate (openssl req -x509, P-256; its key was never kept). */
const CA_PEM = await fs.readFile(new URL("./fixtures/test-ca.pem", import.meta.url), "utf8");

const minimalEdge = { hostname: "mx.example.net", domains: ["example.org"] };

describe("parseDuration", () => {
  it.each([
    [2500, 2500],
    ["500ms", 500],
    ["3s", 3000],
    ["10m", 600_000],
    ["1h", 3_600_000],
    ["5d", 432_000_000],
    ["1h30m", 5_400_000],
    ["1.5s", 1500],
    [" 3s ", 3000],
    [0, 0],
  ])("%j is %d ms", (text, ms) => {
    expect(parseDuration(text, "x")).toBe(ms);
  });

  it.each(["3", "3 s", "s", "-1s", "3sec", "", "1w"])("refuses %j naming the key", (text) => {
    expect(problemsOf(() => parseDuration(text, "limits.idleTimeout"))[0]).toMatch(
      /^limits\.idleTimeout: expected/,
    );
  });

  it("refuses negative numbers and durations setTimeout cannot wait", () => {
    expect(() => parseDuration(-5, "x")).toThrow(ConfigError);
    expect(() => parseDuration("30d", "x")).toThrow(/at most 24 days/);
    expect(parseDuration("24d", "x")).toBe(24 * 86_400_000);
  });
});

describe("parseHostPort", () => {
  it.each([
    ["0.0.0.0:25", { host: "0.0.0.0", port: 25 }],
    ["[::1]:25", { host: "::1", port: 25 }],
    ["[::]:8443", { host: "::", port: 8443 }],
    ["localhost:2525", { host: "localhost", port: 2525 }],
    ["Mail.Example.NET:587", { host: "mail.example.net", port: 587 }],
    ["127.0.0.1:65535", { host: "127.0.0.1", port: 65535 }],
  ])("%s", (text, expected) => {
    expect(parseHostPort(text, "x")).toEqual(expected);
  });

  it.each([
    ["0.0.0.0", /no port/],
    ["0.0.0.0:0", /1\.\.65535/],
    ["0.0.0.0:65536", /1\.\.65535/],
    ["0.0.0.0:2x", /1\.\.65535/],
    ["::1:25", /brackets/],
    ["[nope]:25", /not an IPv6/],
    [":25", /bad host/],
    ["bad_host:25", /bad host/],
  ])("refuses %s", (text, reason) => {
    const [problem] = problemsOf(() => parseHostPort(text, "smtpListen"));
    expect(problem).toMatch(/^smtpListen: /);
    expect(problem).toMatch(reason);
  });
});

describe("edge config", () => {
  it("fills every default", () => {
    const config = parseEdgeConfig(minimalEdge);
    expect(config.spool).toEqual({
      maxAge: 5 * 86_400_000,
      recipientListMaxAge: 7 * 86_400_000,
      maxRecipients: 100,
      defaultMessageSizeLimit: 10_240_000,
      messagesPerIpPerMinute: 60,
      drainConcurrency: 4,
      retryMin: 60_000,
      retryMax: 3_600_000,
      commandTimeout: 60_000,
      dataTimeout: 600_000,
    });
    expect(config).toMatchObject({
      hostname: "mx.example.net",
      domains: ["example.org"],
      smtpListen: { host: "0.0.0.0", port: 25 },
      tunnelListen: { host: "0.0.0.0", port: 8443 },
      publicUrl: "ws://mx.example.net:8443",
      forwards: [],
      openTimeout: 3000,
      stableAfter: 10_000,
      limits: {
        maxConnections: 1000,
        maxConnectionsPerIp: 20,
        idleTimeout: 600_000,
        sessionTimeout: 1_800_000,
        handshakesPerIpPerSecond: 5,
        handshakeBurst: 20,
        maxPendingHandshakes: 256,
        authTimeout: 5000,
      },
      transports: {},
      dnsServers: [],
      requireTLS: [],
      metricsListen: null,
      logLevel: "info",
    });
  });

  it("parses a full file, lower-casing names", () => {
    const config = parseEdgeConfig({
      hostname: "MX.Example.NET.",
      domains: ["Example.ORG", "example.com"],
      smtpListen: "[::]:25",
      tunnelListen: "0.0.0.0:443",
      publicUrl: "wss://edge.example.net/mx/",
      forwards: [{ listen: "0.0.0.0:993", service: "imaps" }],
      openTimeout: 1500,
      stableAfter: "1m",
      limits: { maxConnections: 10, idleTimeout: "15m" },
      transports: { "Remote.Test": "127.0.0.1:2526" },
      dnsServers: ["1.1.1.1", "[2606:4700::1111]:53"],
      requireTLS: ["gmail.com"],
      metricsListen: "127.0.0.1:9100",
      logLevel: "debug",
    });
    expect(config).toMatchObject({
      hostname: "mx.example.net",
      domains: ["example.org", "example.com"],
      smtpListen: { host: "::", port: 25 },
      publicUrl: "wss://edge.example.net/mx",
      forwards: [{ listen: { host: "0.0.0.0", port: 993 }, service: "imaps" }],
      openTimeout: 1500,
      stableAfter: 60_000,
      limits: { maxConnections: 10, maxConnectionsPerIp: 20, idleTimeout: 900_000 },
      transports: { "remote.test": { host: "127.0.0.1", port: 2526 } },
      metricsListen: { host: "127.0.0.1", port: 9100 },
      logLevel: "debug",
    });
  });

  it("derives publicUrl from hostname and the tunnel port", () => {
    expect(parseEdgeConfig({ ...minimalEdge, tunnelListen: "[::]:9443" }).publicUrl).toBe(
      "ws://mx.example.net:9443",
    );
  });

  it("reports every problem of a bad file at once, each with its path", () => {
    const problems = problemsOf(() =>
      parseEdgeConfig({
        hostname: "not a host",
        domains: [],
        smtpListen: "0.0.0.0",
        tunnelListen: "0.0.0.0:99999",
        publicUrl: "http://mx.example.net",
        forwards: [{ listen: "0.0.0.0:993", servce: "imaps" }],
        openTimeout: "soon",
        limits: { maxConnections: 0, maxConection: 5, handshakesPerIpPerSecond: -1 },
        transports: { "remote.test": "nowhere", under_score: "127.0.0.1:25" },
        dnsServers: ["dns.google"],
        requireTLS: "gmail.com",
        metricsListen: "::1:9100",
        logLevel: "loud",
        colour: "blue",
      }),
    );
    const paths = problems.map((p) => p.slice(0, p.indexOf(":")));
    expect(paths.sort()).toEqual(
      [
        "hostname",
        "domains",
        "smtpListen",
        "tunnelListen",
        "publicUrl",
        "forwards[0].service",
        "forwards[0].servce",
        "openTimeout",
        "limits.maxConnections",
        "limits.maxConection",
        "limits.handshakesPerIpPerSecond",
        'transports["remote.test"]',
        "transports.under_score",
        "dnsServers[0]",
        "requireTLS",
        "metricsListen",
        "logLevel",
        "colour",
      ].sort(),
    );
    expect(problems).toContain('limits.maxConection: unknown key (did you mean "maxConnections"?)');
    expect(problems).toContain("colour: unknown key");
    expect(problems).toContain("forwards[0].service: is required");
  });

  it("checks outbound.tlsCaFile when the config is loaded: absolute, readable, PEM certificates", async () => {
    const dir = await fs.mkdtemp(join(tmpdir(), "mxt-ca-"));
    try {
      const caFile = (name: string) => join(dir, name);
      await fs.writeFile(caFile("ca.pem"), CA_PEM);
      await fs.writeFile(
        caFile("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
      );
      await fs.writeFile(
        caFile("broken.pem"),
        `${CA_PEM}-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n`,
      );
      const withCa = (tlsCaFile: unknown) => parseEdgeConfig({ ...minimalEdge, outbound: { tlsCaFile } });
      expect(withCa(caFile("ca.pem")).outbound.tlsCaFile).toBe(caFile("ca.pem"));
      expect(parseEdgeConfig(minimalEdge).outbound.tlsCaFile).toBeNull();
      expect(problemsOf(() => withCa("ca.pem"))).toEqual([
        'outbound.tlsCaFile: expected an absolute path to a PEM file of CA certificates, or null, got "ca.pem"',
      ]);
      expect(problemsOf(() => withCa(caFile("missing.pem")))).toEqual([
        `outbound.tlsCaFile: ${caFile("missing.pem")} does not exist`,
      ]);
      expect(problemsOf(() => withCa(dir))).toEqual([
        `outbound.tlsCaFile: ${dir} is a directory, expected a PEM file`,
      ]);
      expect(problemsOf(() => withCa(caFile("key.pem")))[0]).toMatch(
        /^outbound\.tlsCaFile: .*key\.pem holds no PEM certificate/,
      );
      expect(problemsOf(() => withCa(caFile("broken.pem")))).toEqual([
        `outbound.tlsCaFile: certificate 2 of 2 in ${caFile("broken.pem")} is not a valid certificate`,
      ]);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });

  it("refuses an unknown key even when everything else is right", () => {
    expect(problemsOf(() => parseEdgeConfig({ ...minimalEdge, smtpListn: "0.0.0.0:25" }))).toEqual([
      'smtpListn: unknown key (did you mean "smtpListen"?)',
    ]);
  });

  it("refuses listeners that share a port and duplicate domains", () => {
    const problems = problemsOf(() =>
      parseEdgeConfig({
        ...minimalEdge,
        domains: ["example.org", "EXAMPLE.org"],
        tunnelListen: "127.0.0.1:25",
        forwards: [
          { listen: "0.0.0.0:993", service: "imaps" },
          { listen: "[::]:993", service: "imaps" },
          { listen: "127.0.0.1:995", service: "pop3s" },
        ],
        metricsListen: "127.0.0.2:995",
      }),
    );
    expect(problems).toEqual([
      "domains[1]: example.org is listed twice",
      "tunnelListen: port 25 is already used by smtpListen",
      "forwards[1].listen: port 993 is already used by forwards[0].listen",
    ]);
  });

  it("reports cross-key problems together with field problems", () => {
    const problems = problemsOf(() =>
      parseEdgeConfig({ ...minimalEdge, logLevel: "loud", tunnelListen: "0.0.0.0:25" }),
    );
    expect(problems).toHaveLength(2);
  });

  it("takes the spool session deadlines from spool.commandTimeout and spool.dataTimeout", () => {
    const config = parseEdgeConfig({ ...minimalEdge, spool: { commandTimeout: "30s", dataTimeout: "20m" } });
    expect(config.spool).toMatchObject({ commandTimeout: 30_000, dataTimeout: 1_200_000 });
    expect(problemsOf(() => parseEdgeConfig({ ...minimalEdge, spool: { dataTimeout: "soon" } }))).toEqual([
      expect.stringMatching(/^spool\.dataTimeout: expected a duration/),
    ]);
    expect(problemsOf(() => parseEdgeConfig({ ...minimalEdge, spool: { commandTimeout: "500ms" } }))).toEqual(
      ["spool.commandTimeout: expected at least 1s, got 500ms"],
    );
  });

  it("refuses a non-object", () => {
    expect(problemsOf(() => parseEdgeConfig([]))).toEqual([
      "(top level): expected a JSON object, got a list",
    ]);
    expect(problemsOf(() => parseEdgeConfig(null))[0]).toMatch(/top level/);
  });

  it("warns about settings below RFC 5321's timeouts and exposed metrics", () => {
    const config = parseEdgeConfig({
      ...minimalEdge,
      limits: { idleTimeout: "1m", sessionTimeout: "5m" },
      metricsListen: "0.0.0.0:9100",
    });
    const warnings = edgeConfigWarnings(config);
    expect(warnings).toHaveLength(3);
    expect(configWarnings(config)).toEqual(warnings);
    expect(edgeConfigWarnings(parseEdgeConfig(minimalEdge))).toEqual([]);
  });

  it("init's default file validates and spells out every key", () => {
    const file = defaultEdgeConfig({ hostname: "MX.example.net", domains: ["Example.org"] });
    expect(Object.keys(file).sort()).toEqual(Object.keys(parseEdgeConfig(minimalEdge)).sort());
    expect(file.publicUrl).toBe("ws://mx.example.net:8443");
    expect(parseEdgeConfig(file)).toEqual(parseEdgeConfig(minimalEdge));
    const custom = defaultEdgeConfig({
      ...minimalEdge,
      smtpListen: "0.0.0.0:2525",
      tunnelListen: "[::]:9000",
    });
    expect(parseEdgeConfig(custom).publicUrl).toBe("ws://mx.example.net:9000");
  });
});

describe("home config", () => {
  it("fills every default, with smtp among the services", () => {
    expect(parseHomeConfig({})).toMatchObject({
      postfix: {
        inject: { host: "127.0.0.1", port: 10025 },
        proxyProtocol: "v2",
        messageSizeLimit: 10_240_000,
      },
      recipients: { file: null, delimiter: "+", refresh: 60_000 },
      services: { smtp: { target: { host: "127.0.0.1", port: 10025 }, proxyProtocol: "v2" } },
      allowPrivateClientIPs: false,
      relayListen: { host: "127.0.0.1", port: 2525 },
      relayAuth: null,
      reconnect: { minDelay: 1000, maxDelay: 30_000 },
      logLevel: "info",
    });
    expect(parseHomeConfig(defaultHomeConfig())).toEqual(parseHomeConfig({}));
  });

  it("refuses a relative recipient list path and a delimiter with spaces", () => {
    const problems = problemsOf(() => parseHomeConfig({ recipients: { file: "virtual", delimiter: "+ " } }));
    expect(problems.join("\n")).toMatch(/recipients\.file: expected an absolute file path/);
    expect(problems.join("\n")).toMatch(/recipients\.delimiter: /);
  });

  it("parses services and relay auth", () => {
    const config = parseHomeConfig({
      postfix: { inject: "[::1]:10025", proxyProtocol: "v1" },
      services: {
        imaps: { target: "127.0.0.1:993" },
        submission: { target: "10.0.0.5:587", proxyProtocol: "off" },
      },
      relayListen: "0.0.0.0:2525",
      relayAuth: { users: { postfix: "correct horse battery" } },
      reconnect: { minDelay: "500ms", maxDelay: "1m" },
    });
    expect(config.services).toEqual({
      smtp: { target: { host: "::1", port: 10025 }, proxyProtocol: "v1" },
      imaps: { target: { host: "127.0.0.1", port: 993 }, proxyProtocol: "v2" },
      submission: { target: { host: "10.0.0.5", port: 587 }, proxyProtocol: "off" },
    });
    expect(config.relayAuth).toEqual({ users: { postfix: "correct horse battery" } });
    expect(config.reconnect).toEqual({ minDelay: 500, maxDelay: 60_000 });
  });

  it("requires relayAuth when the relay listens beyond loopback", () => {
    const [problem] = problemsOf(() => parseHomeConfig({ relayListen: "0.0.0.0:2525" }));
    expect(problem).toMatch(/^relayListen: .*relayAuth/);
    expect(
      problemsOf(() => parseHomeConfig({ relayListen: "192.168.1.2:2525", relayAuth: null })),
    ).toHaveLength(1);
    expect(parseHomeConfig({ relayListen: "[::1]:2525" }).relayListen).toEqual({ host: "::1", port: 2525 });
    expect(parseHomeConfig({ relayListen: "127.0.0.2:2525" }).relayAuth).toBeNull();
  });

  it("reports every problem at once, never echoing a password", () => {
    const problems = problemsOf(() =>
      parseHomeConfig({
        postfix: { inject: "127.0.0.1:0", proxyProtocol: "v3" },
        services: { smtp: { target: "127.0.0.1:25" }, IMAPS: { target: "127.0.0.1:993", extra: 1 } },
        allowPrivateClientIPs: "yes",
        relayAuth: { users: { "bad user": "hunter2-secret", postfix: 42 } },
        reconnect: { minDelay: "5s", maxDelay: "1s" },
        loglevel: "info",
      }),
    );
    expect(problems.map((p) => p.slice(0, p.indexOf(": ")))).toEqual([
      "postfix.inject",
      "postfix.proxyProtocol",
      "services.smtp",
      "services.IMAPS",
      "services.IMAPS.extra",
      "allowPrivateClientIPs",
      'relayAuth.users["bad user"]',
      "relayAuth.users.postfix",
      "loglevel",
      "reconnect.maxDelay",
    ]);
    expect(problems.join("\n")).not.toContain("hunter2");
    expect(problems).toContain('loglevel: unknown key (did you mean "logLevel"?)');
  });

  it("refuses an empty user list", () => {
    expect(problemsOf(() => parseHomeConfig({ relayAuth: { users: {} } }))).toEqual([
      "relayAuth.users: expected at least one user",
    ]);
  });

  it("warns when PROXY protocol is off or private clients are allowed", () => {
    expect(homeConfigWarnings(parseHomeConfig({}))).toEqual([]);
    const config = parseHomeConfig({
      postfix: { proxyProtocol: "off" },
      services: { imaps: { target: "127.0.0.1:993", proxyProtocol: "off" } },
      allowPrivateClientIPs: true,
    });
    const warnings = configWarnings(config);
    expect(warnings).toHaveLength(3);
    expect(warnings[0]).toMatch(/^postfix\.proxyProtocol is "off"/);
    expect(warnings[1]).toMatch(/^services\.imaps\.proxyProtocol/);
  });
});

describe("maskSecrets", () => {
  it("masks relay passwords and secret-named fields without touching the original", () => {
    const config = parseHomeConfig({
      relayListen: "0.0.0.0:2525",
      relayAuth: { users: { postfix: "s3cret-pass", other: "x" } },
    });
    const masked = maskSecrets(config);
    expect(masked.relayAuth).toEqual({ users: { postfix: MASK, other: MASK } });
    expect(config.relayAuth?.users.postfix).toBe("s3cret-pass");
    expect(JSON.stringify(maskSecrets({ a: [{ token: "t", password: "p", psk: "k", name: "n" }] }))).toBe(
      JSON.stringify({ a: [{ token: MASK, password: MASK, psk: MASK, name: "n" }] }),
    );
    expect(maskSecrets(parseEdgeConfig(minimalEdge))).toEqual(parseEdgeConfig(minimalEdge));
  });
});

describe("config files", () => {
  let dir: string;
  beforeEach(async () => {
    dir = await fs.mkdtemp(join(tmpdir(), "mxt-config-"));
  });
  afterEach(async () => {
    await fs.rm(dir, { recursive: true, force: true });
  });

  it("loads both agents' files", async () => {
    await fs.writeFile(join(dir, "edge.json"), JSON.stringify(defaultEdgeConfig(minimalEdge), null, 2));
    await fs.writeFile(join(dir, "home.json"), JSON.stringify(defaultHomeConfig(), null, 2));
    expect((await loadEdgeConfig(join(dir, "edge.json"))).hostname).toBe("mx.example.net");
    expect((await loadHomeConfig(join(dir, "home.json"))).relayAuth).toBeNull();
  });

  it("names the file and line of a JSON syntax error", async () => {
    const path = join(dir, "edge.json");
    await fs.writeFile(
      path,
      '{\n  "hostname": "mx.example.net",\n  "domains": ["example.org"]\n  "logLevel": "info"\n}\n',
    );
    const error = (await loadEdgeConfig(path).then(
      () => undefined,
      (e: unknown) => e,
    )) as ConfigError;
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toContain(`${path}:4:`);
  });

  it("names the file for validation errors", async () => {
    const path = join(dir, "home.json");
    await fs.writeFile(path, JSON.stringify({ relayListen: "0.0.0.0:2525", logLevel: 3 }));
    const error = (await loadHomeConfig(path).then(
      () => undefined,
      (e: unknown) => e,
    )) as ConfigError;
    expect(error).toBeInstanceOf(ConfigError);
    expect(error.message).toContain(`invalid configuration in ${path}:`);
    expect(error.problems).toHaveLength(2);
  });

  it("says how to create a missing file", async () => {
    const error = (await loadEdgeConfig(join(dir, "edge.json")).then(
      () => undefined,
      (e: unknown) => e,
    )) as StateError;
    expect(error).toBeInstanceOf(StateError);
    expect(error.code).toBe("STATE_MISSING");
    expect(error.message).toContain("mxtunnel-edge init");
  });
});
