import { spawnSync } from "node:child_process";
import { chmod, mkdtemp, readFile, rm, utimes, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type HomeConfigFile, parseHomeConfig } from "@mxtunnel/shared";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  collectPostconf,
  effectiveParam,
  hasFailures,
  matchAddressList,
  type PostconfOutputs,
  type PostfixAdvice,
  parsePostconf,
  postfixAdvice,
  renderPostfixAdvice,
} from "../src/postfix-config.js";

const home = (file: HomeConfigFile = {}) => parseHomeConfig(file);

/** What `postconf`, `postconf -M`, `postconf -P` print, built from a few settings. */
function postconfText(
  main: Record<string, string>,
  master: string[],
  params: Record<string, Record<string, string>> = {},
): PostconfOutputs {
  const defaults: Record<string, string> = {
    mail_version: "3.7.11",
    mynetworks: "127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128",
    inet_interfaces: "all",
    inet_protocols: "all",
    message_size_limit: "52428800",
    relayhost: "[127.0.0.1]:2525",
    smtpd_forbid_bare_newline: "reject",
    smtpd_forbid_bare_newline_exclusions: "$mynetworks",
    smtputf8_enable: "yes",
    smtpd_service_name: "smtpd",
    smtpd_upstream_proxy_protocol: "",
    postscreen_upstream_proxy_protocol: "",
  };
  const all = { ...defaults, ...main };
  return {
    main: Object.entries(all)
      .filter(([, v]) => v !== "\u0000")
      .map(([k, v]) => (v ? `${k} = ${v}` : `${k} =`))
      .join("\n"),
    master: [
      "smtp       inet  n       -       y       -       -       smtpd",
      "pickup     unix  n       -       y       60      1       pickup",
      ...master,
    ].join("\n"),
    masterParams: Object.entries(params)
      .flatMap(([service, values]) =>
        Object.entries(values).map(([k, v]) => (v ? `${service}/${k} = ${v}` : `${service}/${k} =`)),
      )
      .join("\n"),
  };
}

const SAFE_SERVICE = "127.0.0.1:10025 inet n   -       n       -       -       smtpd";
const SAFE_PARAMS = {
  "127.0.0.1:10025/inet": {
    smtpd_upstream_proxy_protocol: "haproxy",
    mynetworks: "",
    smtpd_forbid_bare_newline: "reject",
    smtpd_forbid_bare_newline_exclusions: "",
  },
};

const failures = (advice: PostfixAdvice) => advice.checks.filter((c) => c.level === "fail");
const warnings = (advice: PostfixAdvice) => advice.checks.filter((c) => c.level === "warn");
const section = (advice: PostfixAdvice, id: string) => advice.sections.find((s) => s.id === id);
const texts = (advice: PostfixAdvice, id: string) => section(advice, id)?.lines.map((l) => l.text) ?? [];

describe("postfixAdvice: printed lines", () => {
  it("prints the tunnel-facing smtpd with PROXY, empty mynetworks and bare-newline rejection, each with a reason", () => {
    const advice = postfixAdvice({ config: home() });
    expect(texts(advice, "master-smtpd")).toEqual([
      "127.0.0.1:10025 inet n - n - - smtpd",
      "  -o smtpd_upstream_proxy_protocol=haproxy",
      "  -o mynetworks=",
      "  -o smtpd_forbid_bare_newline=reject",
      "  -o smtpd_forbid_bare_newline_exclusions=",
    ]);
    for (const s of advice.sections)
      for (const line of s.lines) if (!/[{}]$/.test(line.text)) expect(line.why, line.text).toBeTruthy();
    expect(advice.checked).toBe(false);
    expect(advice.checks).toEqual([]);
    expect(renderPostfixAdvice(advice)).toContain("postconf not found");
  });

  it("prints a postscreen variant that hands clients to its own smtpd pass service", () => {
    const lines = texts(postfixAdvice({ config: home() }), "master-postscreen");
    expect(lines[0]).toBe("127.0.0.1:10025 inet n - n - 1 postscreen");
    expect(lines).toContain("  -o postscreen_upstream_proxy_protocol=haproxy");
    expect(lines).toContain("mxtunnel-smtpd pass - - n - - smtpd");
    const pass = lines.slice(lines.indexOf("mxtunnel-smtpd pass - - n - - smtpd"));
    expect(pass).toContain("  -o mynetworks=");
    expect(pass).not.toContain("  -o smtpd_upstream_proxy_protocol=haproxy");
  });

  it("uses the configured inject address and relayListen", () => {
    const advice = postfixAdvice({
      config: home({
        postfix: { inject: "[::1]:10026" },
        relayListen: "0.0.0.0:2600",
        relayAuth: { users: { postfix: "a-long-secret-password" } },
      }),
    });
    expect(texts(advice, "master-smtpd")[0]).toBe("[::1]:10026 inet n - n - - smtpd");
    expect(texts(advice, "main")).toEqual(
      expect.arrayContaining(["relayhost = [127.0.0.1]:2600", "smtp_sasl_auth_enable = yes"]),
    );
    expect(JSON.stringify(advice)).not.toContain("a-long-secret-password");
  });

  it("says v2 or v1 in the reasons; both use haproxy; off drops the PROXY line and warns loudly", () => {
    const v2 = section(postfixAdvice({ config: home() }), "master-smtpd")!;
    const v1 = section(
      postfixAdvice({ config: home({ postfix: { proxyProtocol: "v1" } }) }),
      "master-smtpd",
    )!;
    const proxyLine = (s: typeof v2) => s.lines.find((l) => l.text.includes("upstream_proxy_protocol"));
    expect(proxyLine(v2)?.text).toBe("  -o smtpd_upstream_proxy_protocol=haproxy");
    expect(proxyLine(v1)?.text).toBe("  -o smtpd_upstream_proxy_protocol=haproxy");
    expect(proxyLine(v2)?.why).toContain("PROXY v2");
    expect(proxyLine(v1)?.why).toContain("PROXY v1");

    const off = postfixAdvice({ config: home({ postfix: { proxyProtocol: "off" } }) });
    expect(texts(off, "master-smtpd").some((t) => t.includes("upstream_proxy"))).toBe(false);
    expect(section(off, "master-smtpd")?.notes.join(" ")).toMatch(/WARNING.*"off".*benchmarks/);
    expect(
      warnings(off)
        .map((c) => c.message)
        .join(" "),
    ).toContain('postfix.proxyProtocol is "off"');
    expect(hasFailures(off)).toBe(false);
  });

  it("adds submission/submissions and Dovecot sections only when such services exist", () => {
    expect(section(postfixAdvice({ config: home() }), "dovecot")).toBeUndefined();
    expect(section(postfixAdvice({ config: home() }), "master-submission")).toBeUndefined();

    const advice = postfixAdvice({
      config: home({
        services: {
          imaps: { target: "127.0.0.1:10993" },
          pop3: { target: "127.0.0.1:10110", proxyProtocol: "v1" },
          sieve: { target: "127.0.0.1:14190" },
          submission: { target: "127.0.0.1:10587" },
          submissions: { target: "127.0.0.1:10465" },
          gitea: { target: "127.0.0.1:3000" },
        },
      }),
    });
    const submission = texts(advice, "master-submission");
    expect(submission[0]).toBe("127.0.0.1:10587 inet n - n - - smtpd");
    expect(submission).toEqual(
      expect.arrayContaining([
        "  -o smtpd_upstream_proxy_protocol=haproxy",
        "  -o smtpd_sasl_auth_enable=yes",
        "  -o smtpd_tls_security_level=encrypt",
      ]),
    );
    const submissions = texts(advice, "master-submissions");
    expect(submissions[0]).toBe("127.0.0.1:10465 inet n - n - - smtpd");
    expect(submissions).toContain("  -o smtpd_tls_wrappermode=yes");

    const dovecot = texts(advice, "dovecot");
    expect(dovecot[0]).toBe("haproxy_trusted_networks = 127.0.0.1");
    expect(dovecot).toEqual(
      expect.arrayContaining([
        "service imap-login {",
        "  inet_listener mxtunnel-imaps {",
        "    port = 10993",
        "    ssl = yes",
        "service pop3-login {",
        "service managesieve-login {",
        "    haproxy = yes",
      ]),
    );
    expect(dovecot.filter((t) => t === "    haproxy = yes")).toHaveLength(3);
    expect(dovecot.join("\n")).not.toContain("gitea");
  });

  it("puts only home's own address in haproxy_trusted_networks", () => {
    const remote = postfixAdvice({
      config: home({ services: { imap: { target: "192.168.1.20:10143" } } }),
      localAddresses: { "192.168.1.20": "192.168.1.5" },
    });
    expect(texts(remote, "dovecot")[0]).toBe("haproxy_trusted_networks = 192.168.1.5");
    const unknown = postfixAdvice({ config: home({ services: { imap: { target: "192.168.1.20:10143" } } }) });
    expect(texts(unknown, "dovecot")[0]).toBe("haproxy_trusted_networks = HOME_AGENT_ADDRESS");
    expect(section(unknown, "dovecot")?.notes.join(" ")).toContain("HOME_AGENT_ADDRESS");
    const v6 = postfixAdvice({ config: home({ services: { imaps: { target: "[::1]:10993" } } }) });
    expect(texts(v6, "dovecot")[0]).toBe("haproxy_trusted_networks = ::1");
  });
});

describe("postfixAdvice: checks against postconf output", () => {
  it("a safe configuration passes every check", () => {
    const advice = postfixAdvice({ config: home(), postconf: postconfText({}, [SAFE_SERVICE], SAFE_PARAMS) });
    expect(advice.checked).toBe(true);
    expect(advice.postfixVersion).toBe("3.7.11");
    expect(advice.checks.length).toBeGreaterThanOrEqual(5);
    expect(advice.checks.filter((c) => c.level !== "pass")).toEqual([]);
    expect(hasFailures(advice)).toBe(false);
  });

  it("flags MISSING when no service listens on the inject port, with the lines as the fix", () => {
    const advice = postfixAdvice({ config: home(), postconf: postconfText({}, []) });
    const [missing] = failures(advice);
    expect(missing?.message).toMatch(/^MISSING: no master.cf service listens on 127.0.0.1:10025/);
    expect(missing?.fix).toContain("-o smtpd_upstream_proxy_protocol=haproxy");
    expect(hasFailures(advice)).toBe(true);
  });

  it("flags UNSAFE when the service inherits loopback in mynetworks", () => {
    const params = { "127.0.0.1:10025/inet": { smtpd_upstream_proxy_protocol: "haproxy" } };
    const advice = postfixAdvice({ config: home(), postconf: postconfText({}, [SAFE_SERVICE], params) });
    const messages = failures(advice).map((c) => c.message);
    expect(messages.some((m) => /^UNSAFE: mynetworks of 127.0.0.1:10025\/inet .*127\.0\.0\.1/.test(m))).toBe(
      true,
    );
    // $mynetworks in the default exclusions also exempts loopback from the bare-newline check
    expect(messages.some((m) => m.includes("smtpd_forbid_bare_newline_exclusions"))).toBe(true);
    expect(failures(advice).every((c) => c.fix)).toBe(true);
  });

  it("flags a range containing home's LAN address, and an override that reintroduces loopback", () => {
    const lan = postfixAdvice({
      config: home({ postfix: { inject: "192.168.1.20:10025" } }),
      localAddresses: { "192.168.1.20": "192.168.1.5" },
      postconf: postconfText({ mynetworks: "192.168.0.0/16" }, ["10025 inet n - n - - smtpd"], {
        "10025/inet": { smtpd_upstream_proxy_protocol: "haproxy", smtpd_forbid_bare_newline_exclusions: "" },
      }),
    });
    expect(
      failures(lan)
        .map((c) => c.message)
        .join("\n"),
    ).toMatch(/UNSAFE: mynetworks .*192\.168\.1\.5/);

    const override = postfixAdvice({
      config: home(),
      postconf: postconfText({ trusted: "10.0.0.0/8, 127.0.0.1" }, [SAFE_SERVICE], {
        "127.0.0.1:10025/inet": { ...SAFE_PARAMS["127.0.0.1:10025/inet"], mynetworks: "$trusted" },
      }),
    });
    expect(
      failures(override)
        .map((c) => c.message)
        .join("\n"),
    ).toContain("UNSAFE: mynetworks");
  });

  it("flags bare-newline protection that is off, and warns when this Postfix has no such knob", () => {
    const off = postfixAdvice({
      config: home(),
      postconf: postconfText({}, [SAFE_SERVICE], {
        "127.0.0.1:10025/inet": { ...SAFE_PARAMS["127.0.0.1:10025/inet"], smtpd_forbid_bare_newline: "no" },
      }),
    });
    expect(failures(off).map((c) => c.message)).toEqual([
      expect.stringMatching(/^UNSAFE: smtpd_forbid_bare_newline/),
    ]);

    const old = postfixAdvice({
      config: home(),
      postconf: postconfText(
        {
          mail_version: "3.6.4",
          smtpd_forbid_bare_newline: "\u0000",
          smtpd_forbid_bare_newline_exclusions: "\u0000",
        },
        [SAFE_SERVICE],
        { "127.0.0.1:10025/inet": { smtpd_upstream_proxy_protocol: "haproxy", mynetworks: "" } },
      ),
    });
    expect(hasFailures(old)).toBe(false);
    expect(
      warnings(old)
        .map((c) => c.message)
        .join("\n"),
    ).toContain("Postfix 3.6.4 has no smtpd_forbid_bare_newline");
    expect(texts(old, "master-smtpd").some((t) => t.includes("smtpd_forbid_bare_newline="))).toBe(false);

    const stopgap = postfixAdvice({ config: home(), postconf: postconfText({ mail_version: "3.7.9" }, []) });
    expect(texts(stopgap, "master-smtpd")).toContain("  -o smtpd_forbid_bare_newline=yes");
  });

  it("flags a service that does not expect the PROXY header, and v2 on a Postfix older than 3.5", () => {
    const noProxy = postfixAdvice({
      config: home(),
      postconf: postconfText({}, [SAFE_SERVICE], {
        "127.0.0.1:10025/inet": { ...SAFE_PARAMS["127.0.0.1:10025/inet"], smtpd_upstream_proxy_protocol: "" },
      }),
    });
    expect(
      failures(noProxy)
        .map((c) => c.message)
        .join("\n"),
    ).toMatch(/does not expect a PROXY header/);

    const ancient = postfixAdvice({
      config: home(),
      postconf: postconfText({ mail_version: "3.4.14" }, [SAFE_SERVICE], SAFE_PARAMS),
    });
    expect(
      failures(ancient)
        .map((c) => c.message)
        .join("\n"),
    ).toContain("reads only PROXY v1");
    const ancientV1 = postfixAdvice({
      config: home({ postfix: { proxyProtocol: "v1" } }),
      postconf: postconfText({ mail_version: "3.4.14" }, [SAFE_SERVICE], SAFE_PARAMS),
    });
    expect(hasFailures(ancientV1)).toBe(false);
  });

  it("follows postscreen to the smtpd pass service it names", () => {
    const advice = postfixAdvice({
      config: home(),
      postconf: postconfText(
        {},
        ["127.0.0.1:10025 inet n - n - 1 postscreen", "mxtunnel-smtpd pass - - n - - smtpd"],
        {
          "127.0.0.1:10025/inet": {
            postscreen_upstream_proxy_protocol: "haproxy",
            smtpd_service_name: "mxtunnel-smtpd",
          },
          "mxtunnel-smtpd/pass": { mynetworks: "", smtpd_forbid_bare_newline_exclusions: "" },
        },
      ),
    });
    expect(advice.checks.filter((c) => c.level !== "pass")).toEqual([]);

    const noPass = postfixAdvice({
      config: home(),
      postconf: postconfText({}, ["127.0.0.1:10025 inet n - n - 1 postscreen"], {
        "127.0.0.1:10025/inet": { postscreen_upstream_proxy_protocol: "haproxy" },
      }),
    });
    expect(
      failures(noPass)
        .map((c) => c.message)
        .join("\n"),
    ).toMatch(/MISSING: postscreen .* "smtpd"/);
  });

  it("warns about IPv4-only Postfix, small or unlimited size limits, a port open beyond loopback, another relayhost", () => {
    const advice = postfixAdvice({
      config: home(),
      postconf: postconfText(
        { inet_protocols: "ipv4", message_size_limit: "10240000", relayhost: "" },
        ["10025 inet n - n - - smtpd"],
        { "10025/inet": SAFE_PARAMS["127.0.0.1:10025/inet"] },
      ),
    });
    const text = warnings(advice)
      .map((c) => c.message)
      .join("\n");
    expect(text).toContain("inet_protocols = ipv4");
    expect(text).toContain("message_size_limit = 10240000");
    expect(text).toContain("listens beyond loopback");
    expect(text).toContain("relayhost");
    expect(hasFailures(advice)).toBe(false);
    expect(warnings(advice).every((c) => c.fix)).toBe(true);

    const unlimited = postfixAdvice({
      config: home(),
      postconf: postconfText({ message_size_limit: "0" }, [SAFE_SERVICE], SAFE_PARAMS),
    });
    expect(
      warnings(unlimited)
        .map((c) => c.message)
        .join("\n"),
    ).toContain("unlimited");
  });

  it("renders checks with their fixes", () => {
    const out = renderPostfixAdvice(postfixAdvice({ config: home(), postconf: postconfText({}, []) }));
    expect(out).toContain("checks against Postfix 3.7.11");
    expect(out).toMatch(/FAIL {2}MISSING: no master.cf service/);
    expect(out).toContain("fix: add to master.cf");
  });
});

describe("postconf parsing helpers", () => {
  it("expands $names with the service's overrides first", () => {
    const facts = parsePostconf(
      postconfText({ a: "x $b", b: "main-b" }, [SAFE_SERVICE], { "127.0.0.1:10025/inet": { b: "svc-b" } }),
    );
    const service = facts.services.find((s) => s.name === "127.0.0.1:10025");
    expect(effectiveParam(facts, service, "a")).toBe("x svc-b");
    expect(effectiveParam(facts, undefined, "a")).toBe("x main-b");
    expect(effectiveParam(facts, service, "mynetworks")).toBe("127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128");
  });

  it("matches Postfix address lists: CIDR, bracketed IPv6, IPv4-mapped ranges, negation, unknown entries", () => {
    expect(matchAddressList("127.0.0.0/8", ["127.0.0.1", "::1"]).matched).toEqual(["127.0.0.1"]);
    expect(matchAddressList("[::1]/128", ["::1"]).matched).toEqual(["::1"]);
    expect(matchAddressList("[::ffff:127.0.0.0]/104", ["127.0.0.1"]).matched).toEqual(["127.0.0.1"]);
    expect(matchAddressList("!127.0.0.1 127.0.0.0/8", ["127.0.0.1"]).matched).toEqual([]);
    expect(matchAddressList("", ["127.0.0.1"]).matched).toEqual([]);
    expect(matchAddressList("hash:/etc/postfix/network_table localhost", ["127.0.0.1"]).unknown).toEqual([
      "hash:/etc/postfix/network_table",
      "localhost",
    ]);
    expect(matchAddressList("2001:db8::/32", ["2001:db8::5"]).matched).toEqual(["2001:db8::5"]);
  });
});

// The one test that reads a real Postfix: a private config directory, never the system's.
const havePostconf = ["postconf", "/usr/sbin/postconf"].some(
  (file) => !spawnSync(file, ["-d", "mail_version"], { stdio: "ignore" }).error,
);
const runReal = havePostconf || process.env.CI === "true";
if (!runReal)
  console.warn(
    "\n!!! postfix-config.test.ts: `postconf` not found, SKIPPING the real-Postfix test " +
      "(apt-get install postfix; with CI=true this fails instead) !!!\n",
  );

describe.skipIf(!runReal)("postfixAdvice with a real postconf", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "mxtunnel-postconf-"));
    await chmod(dir, 0o755);
  });
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  async function writeInstance(serviceLines: string[]): Promise<void> {
    const debianMaster = await readFile("/etc/postfix/master.cf", "utf8");
    await writeFile(join(dir, "master.cf"), `${debianMaster}\n${serviceLines.join("\n")}\n`);
    await writeFile(
      join(dir, "main.cf"),
      [
        "compatibility_level = 3.6",
        "myhostname = home.example.test",
        "mynetworks = 127.0.0.0/8 [::1]/128",
        "inet_interfaces = 127.0.0.1",
        "inet_protocols = all",
        "message_size_limit = 52428800",
        "relayhost = [127.0.0.1]:2525",
        "",
      ].join("\n"),
    );
    // postconf waits (in 300 ms steps) for a main.cf changed in the last second to settle
    const settled = new Date(Date.now() - 60_000);
    for (const file of ["main.cf", "master.cf"]) await utimes(join(dir, file), settled, settled);
  }

  it("reads master.cf overrides and main.cf through postconf -c", async () => {
    await writeInstance([
      "127.0.0.1:10025 inet n - n - - smtpd",
      "  -o smtpd_upstream_proxy_protocol=haproxy",
      "  -o mynetworks=",
      "  -o smtpd_forbid_bare_newline=yes",
      "  -o smtpd_forbid_bare_newline_exclusions=",
    ]);
    const postconf = await collectPostconf({ configDirectory: dir });
    expect(postconf, "postconf must be installed when CI=true").toBeDefined();
    const safe = postfixAdvice({ config: home(), postconf: postconf! });
    expect(safe.postfixVersion).toMatch(/^\d+\.\d+/);
    expect(failures(safe)).toEqual([]);
    expect(safe.checks.map((c) => c.message).join("\n")).toContain("reads the PROXY v2 header");

    // The same service without `-o mynetworks=` inherits loopback from this main.cf.
    await writeInstance([
      "127.0.0.1:10025 inet n - n - - smtpd",
      "  -o smtpd_upstream_proxy_protocol=haproxy",
    ]);
    const unsafe = postfixAdvice({
      config: home(),
      postconf: (await collectPostconf({ configDirectory: dir }))!,
    });
    expect(
      failures(unsafe)
        .map((c) => c.message)
        .join("\n"),
    ).toMatch(/UNSAFE: mynetworks .*127\.0\.0\.1/);
  });
});
