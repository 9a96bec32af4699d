// The systemd units in deploy/systemd pass `systemd-analyze verify` (ExecStart pointed at a stub that
// exists, as it would after install) with nothing printed, and carry the hardening the README promises.
import { spawnSync } from "node:child_process";
import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const root = fileURLToPath(new URL("../..", import.meta.url));
const analyze = spawnSync("systemd-analyze", ["--version"]).status === 0;
if (!analyze && process.env.CI === "true")
  throw new Error("systemd-analyze is required under CI=true (apt-get install systemd)");
if (!analyze) console.warn("WARNING: systemd-analyze not installed: the systemd unit tests are skipped");

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "mxt-systemd-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** The unit with ExecStart/ExecStartPre pointing at a stub in the temp dir; returns its path. */
async function installed(unit: string, text?: string): Promise<string> {
  const agent = unit.replace(".service", "");
  const stub = join(dir, agent);
  await writeFile(stub, "#!/bin/sh\nexit 0\n");
  await chmod(stub, 0o755);
  const source = text ?? (await readFile(join(root, "deploy/systemd", unit), "utf8"));
  const path = join(dir, unit);
  await writeFile(path, source.replaceAll(`/usr/local/bin/${agent}`, stub));
  return path;
}

function verify(path: string) {
  const result = spawnSync("systemd-analyze", ["verify", "--man=no", path], { encoding: "utf8" });
  return { status: result.status, output: `${result.stdout}${result.stderr}`.trim() };
}

describe.skipIf(!analyze)("systemd units", () => {
  for (const unit of ["mxtunnel-edge.service", "mxtunnel-home.service"]) {
    it(`${unit} passes systemd-analyze verify without a single warning`, async () => {
      expect(verify(await installed(unit))).toEqual({ status: 0, output: "" });
    });
  }

  it("verify is not a rubber stamp: a misspelt directive and a missing binary are reported", async () => {
    const text = await readFile(join(root, "deploy/systemd/mxtunnel-edge.service"), "utf8");
    const typo = verify(
      await installed("mxtunnel-edge.service", text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")),
    );
    expect(typo.output).toContain("Unknown key 'NoNewPrivilege'");
    const missing = join(dir, "missing.service");
    await writeFile(missing, text);
    expect(verify(missing).status).not.toBe(0);
  });

  it("the units run as dedicated users with the promised sandbox", async () => {
    const edge = await readFile(join(root, "deploy/systemd/mxtunnel-edge.service"), "utf8");
    const home = await readFile(join(root, "deploy/systemd/mxtunnel-home.service"), "utf8");
    for (const [text, user] of [
      [edge, "mxtunnel-edge"],
      [home, "mxtunnel-home"],
    ] as const) {
      const lines = new Set(text.split("\n"));
      for (const line of [
        `User=${user}`,
        "ProtectSystem=strict",
        `ReadWritePaths=/var/lib/${user}`,
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        `ExecStart=/usr/local/bin/${user} run --dir /var/lib/${user}`,
      ])
        expect(lines, `${user}: ${line}`).toContain(line);
    }
    expect(edge).toContain("AmbientCapabilities=CAP_NET_BIND_SERVICE");
    expect(home).toMatch(/^CapabilityBoundingSet=$/m);
    const sysusers = await readFile(join(root, "deploy/systemd/mxtunnel.sysusers"), "utf8");
    expect(sysusers).toMatch(/^u mxtunnel-edge /m);
    expect(sysusers).toMatch(/^u mxtunnel-home /m);
  });
});
