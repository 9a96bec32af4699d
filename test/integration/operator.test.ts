// The operator's view of running agents, in-process on loopback: two edges for one home (MX 10 and
// MX 20) with mail flowing through whichever is up, home unpair while running, spool key rotation,
// status, the doctor probes (tunnel, RTT, clock, services) and Prometheus metrics.
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { dkimRecords, type EdgeStatus, renderEdgeStatus } from "@mxtunnel/edge";
import {
  type HomeStatus,
  homeDoctor,
  loadHomeConfigFrom,
  pairWithEdge,
  probeService,
  renderHomeStatus,
  SpoolKeyRing,
  startHome,
} from "@mxtunnel/home";
import { callAdminSocket, keyFingerprint, Mux, parseHomeConfig } from "@mxtunnel/shared";
import nodemailer from "nodemailer";
import { afterEach, describe, expect, it, vi } from "vitest";
import { type Mailbox, startMailbox } from "../../demo/src/mailbox.js";
import { freePort } from "../e2e/lab/ports.js";
import { waitFor } from "../e2e/lab/wait.js";
import {
  cleanupAgents,
  makeEdge,
  makeHome,
  pairedHomeDir,
  startTestHome,
  type TestEdge,
  tempDir,
  testLogger,
} from "../helpers/agents.js";

const mailboxes: Mailbox[] = [];
afterEach(async () => {
  await cleanupAgents();
  for (const box of mailboxes.splice(0)) await box.close();
});

async function mailbox(options: { proxy?: boolean } = {}): Promise<Mailbox> {
  const box = await startMailbox(options);
  mailboxes.push(box);
  return box;
}

/** Sends one message to an edge's port 25 as a remote MTA would (no TLS: the spool's cert is self-signed). */
async function sendInbound(port: number, subject: string, to = "alice@home.test") {
  const transport = nodemailer.createTransport({ host: "127.0.0.1", port, secure: false, ignoreTLS: true });
  try {
    return await transport.sendMail({ from: "sender@remote.test", to, subject, text: `${subject}\n` });
  } finally {
    transport.close();
  }
}

function relay(port: number) {
  return nodemailer.createTransport({ host: "127.0.0.1", port, secure: false, ignoreTLS: true });
}

const connected = (edge: TestEdge) => edge.agent.status().homes[0]?.connected ?? false;

describe("several edges for one home", () => {
  it("keeps a tunnel to each; with one edge stopped, inbound and outbound mail flow through the other", async () => {
    const box = await mailbox();
    const remote = await mailbox({ proxy: false });
    const transports = { "remote.test": `127.0.0.1:${remote.port}` };
    const primary = await makeEdge({ overrides: { mxPriority: 10, transports } });
    const backup = await makeEdge({ overrides: { mxPriority: 20, transports } });
    const { dir, state } = await pairedHomeDir(await primary.token(), "twin");
    await pairWithEdge({ token: await backup.token(), state, name: "twin" });
    const relayPort = await freePort();
    const home = await startTestHome(dir, {
      "postfix.inject": `127.0.0.1:${box.port}`,
      relayListen: `127.0.0.1:${relayPort}`,
    });
    await home.agent.waitConnected(10_000);
    await waitFor(() => connected(primary) && connected(backup), { what: "both edges to see the home" });
    expect(home.agent.status().edges.map((e) => e.connected)).toEqual([true, true]);

    await sendInbound(primary.smtpPort, "via the primary");
    await sendInbound(backup.smtpPort, "via the backup");
    await waitFor(() => box.messages.length === 2, { what: "two messages in the mailbox" });

    await primary.stop();
    await waitFor(() => home.agent.status().edges.filter((e) => e.connected).length === 1, {
      what: "home to see the primary gone",
    });
    const status = home.agent.status();
    expect(status.edges.find((e) => e.url === primary.url)).toMatchObject({
      connected: false,
      downSince: expect.any(String),
    });
    await sendInbound(backup.smtpPort, "while the primary is down");
    await waitFor(() => box.messages.length === 3, { what: "the third message in the mailbox" });
    expect(box.messages[2]?.data.toString()).toContain("Subject: while the primary is down");
    // Postfix still sees the sender's address, not the edge's or home's.
    expect(box.messages[2]?.clientAddress).toBe("127.0.0.1");

    // Outbound: home's relay listener hands the message to the connected edge, which signs it with
    // its own selector and delivers it.
    const sent = await relay(relayPort).sendMail({
      from: "alice@home.test",
      to: "bob@remote.test",
      subject: "outbound while the primary is down",
      text: "hello\n",
    });
    expect(sent.response).toMatch(/^250 /);
    await waitFor(() => remote.messages.length === 1, { what: "the outbound message at the remote server" });
    const backupSelector = (await dkimRecords(backup.dir))[0]!.selector;
    expect(backupSelector).not.toBe((await dkimRecords(primary.dir))[0]!.selector);
    expect(remote.messages[0]?.data.toString()).toMatch(new RegExp(`s=${backupSelector}`));
    expect(backup.agent.outbound.counters.queued).toBe(1);
    expect(primary.agent.outbound.counters.queued).toBe(0);
  });
});

describe("keys", () => {
  it("home unpair works while home runs: the link stops, edges.json forgets the edge, the other stays", async () => {
    const first = await makeEdge();
    const second = await makeEdge();
    const { dir, state } = await pairedHomeDir(await first.token(), "solo");
    const secondRecord = await pairWithEdge({ token: await second.token(), state, name: "solo" });
    const home = await startTestHome(dir);
    await home.agent.waitConnected(10_000);
    await waitFor(() => connected(second), { what: "the second edge to see the home" });

    const removed = (await callAdminSocket(join(dir, "admin.sock"), {
      command: "unpair",
      args: { edge: secondRecord.fingerprint },
    })) as { fingerprint: string };
    expect(removed.fingerprint).toBe(secondRecord.fingerprint);
    expect(home.agent.links.size).toBe(1);
    expect(home.agent.state.edges().map((e) => e.fingerprint)).not.toContain(secondRecord.fingerprint);
    await waitFor(() => !connected(second), { what: "the second edge to see the tunnel closed" });
    expect(connected(first)).toBe(true);
    // It stays gone: the link is not redialled.
    expect(home.agent.status().edges).toHaveLength(1);
  });

  it("rotates the spool key: mail sealed to the old key still drains, new mail is sealed to the new key, the old key is then deleted", async () => {
    const box = await mailbox();
    const edge = await makeEdge();
    const recipients = join(await tempDir("rcpt"), "recipients");
    await writeFile(recipients, "alice@home.test\n");
    const overrides = { "postfix.inject": `127.0.0.1:${box.port}`, "recipients.file": recipients };
    const first = await makeHome(await edge.token(), overrides, "rotor");
    const homeKey = edge.agent.state.homes()[0]!.publicKey;
    await waitFor(() => edge.agent.spool.recipients.info(homeKey), { what: "the recipient list to sync" });
    const oldId = keyFingerprint(first.agent.spoolKeys.currentKey.publicKey);
    await first.stop();
    await waitFor(() => !connected(edge), { what: "the edge to see home gone" });

    await sendInbound(edge.smtpPort, "sealed to the old key");
    expect(edge.agent.spool.store.list().map((e) => e.header.spoolKeyId)).toEqual([oldId]);

    // Offline rotation (the CLI's path when the agent is not running), then home starts.
    const rotated = await (await SpoolKeyRing.open(first.dir)).rotate();
    expect(rotated.retiring).toEqual([oldId]);
    const config = await loadHomeConfigFrom(first.dir, {
      allowPrivateClientIPs: true,
      "reconnect.minDelay": 50,
      "reconnect.maxDelay": 200,
      ...overrides,
    });
    const agent = await startHome({ dir: first.dir, config, logger: testLogger, spoolKeyCheckMs: 50 });
    try {
      await waitFor(() => box.messages.length === 1, { what: "the message sealed to the old key to drain" });
      expect(box.messages[0]?.data.toString()).toContain("Subject: sealed to the old key");
      await waitFor(
        () => edge.agent.state.homes()[0]?.spoolPublicKey === agent.spoolKeys.currentPublicKeyText,
        {
          what: "the edge to record the new spool key",
        },
      );
      await waitFor(() => agent.spoolKeys.oldKeyIds().length === 0, { what: "the old key to be retired" });
      expect(agent.status().spoolKeys).toEqual({
        current: rotated.current,
        acknowledgedBy: ["mx.edge.test"],
        retiring: [],
      });

      await agent.stop();
      await waitFor(() => !connected(edge), { what: "the edge to see home gone again" });
      await sendInbound(edge.smtpPort, "sealed to the new key");
      expect(edge.agent.spool.store.list().map((e) => e.header.spoolKeyId)).toEqual([rotated.current]);
    } finally {
      await agent.stop();
    }
  });

  it("keeps the old key while an edge still holds mail sealed to it", async () => {
    const edge = await makeEdge();
    const recipients = join(await tempDir("rcpt"), "recipients");
    await writeFile(recipients, "alice@home.test\n");
    // Postfix is down at home: the spooled message cannot drain and stays sealed to the old key.
    const deadPort = await freePort();
    const home = await makeHome(await edge.token(), {
      "postfix.inject": `127.0.0.1:${deadPort}`,
      "recipients.file": recipients,
    });
    const homeKey = edge.agent.state.homes()[0]!.publicKey;
    await waitFor(() => edge.agent.spool.recipients.info(homeKey), { what: "the recipient list to sync" });
    await home.stop();
    await waitFor(() => !connected(edge), { what: "the edge to see home gone" });
    await sendInbound(edge.smtpPort, "stuck");
    const oldId = edge.agent.spool.store.list()[0]!.header.spoolKeyId;
    const restarted = await startTestHome(home.dir, {
      "postfix.inject": `127.0.0.1:${deadPort}`,
      "recipients.file": recipients,
    });
    await restarted.agent.waitConnected(10_000);
    const result = (await callAdminSocket(join(home.dir, "admin.sock"), { command: "rotate-spool-key" })) as {
      current: string;
      retiring: string[];
    };
    expect(result.retiring).toEqual([oldId]);
    await waitFor(
      () => edge.agent.state.homes()[0]?.spoolPublicKey === restarted.agent.spoolKeys.currentPublicKeyText,
      {
        what: "the edge to record the new key",
      },
    );
    await waitFor(() => restarted.agent.status().spoolKeys?.acknowledgedBy.length === 1, {
      what: "the edge's ack",
    });
    // The ack named the old key as still in use: it stays.
    expect(restarted.agent.status().spoolKeys?.retiring).toEqual([
      { id: oldId, waitingFor: ["mx.edge.test"] },
    ]);
    expect(restarted.agent.spoolKeys.oldKeyIds()).toEqual([oldId]);
    expect(restarted.agent.status().warnings.join("\n")).toContain(
      `old spool key ${oldId} kept until mx.edge.test`,
    );
  });
});

describe("status, probes and metrics", () => {
  it("reports today's counts, queues, warnings and last errors; probes RTT and clock on both sides", async () => {
    const box = await mailbox();
    const metricsPort = await freePort();
    const edge = await makeEdge({
      overrides: { metricsListen: `127.0.0.1:${metricsPort}`, "checks.homeDownWarning": 0 },
    });
    const home = await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${box.port}` });
    await sendInbound(edge.smtpPort, "counted");
    await waitFor(() => box.messages.length === 1, { what: "the message in the mailbox" });

    const edgeProbe = await edge.agent.probe();
    expect(edgeProbe.homes).toEqual([
      expect.objectContaining({
        name: "home",
        connected: true,
        rttMs: expect.any(Number),
        clockSkewMs: expect.any(Number),
      }),
    ]);
    // Same machine, same clock: the measured skew is at most the round trip.
    expect(Math.abs(edgeProbe.homes[0]!.clockSkewMs!)).toBeLessThan(1000);
    const homeProbe = await home.agent.probe();
    expect(homeProbe.edges[0]).toMatchObject({ connected: true, clockSkewMs: expect.any(Number) });

    // The skew `status` shows is measured on its own when the tunnel comes up (same clock here: ~0).
    const edgeSkew = await waitFor(() => edge.agent.status().homes[0]?.clockSkewMs ?? undefined, {
      what: "the edge's status to show home's clock skew",
    });
    expect(Math.abs(edgeSkew)).toBeLessThan(1000);
    const homeSkew = await waitFor(() => home.agent.status().edges[0]?.clockSkewMs ?? undefined, {
      what: "home's status to show the edge's clock skew",
    });
    expect(Math.abs(homeSkew)).toBeLessThan(1000);

    let status = edge.agent.status();
    expect(status.today).toMatchObject({ inboundSessions: 1 });
    expect(status.homes[0]).toMatchObject({
      connected: true,
      peerVersion: "0.1.0",
      versionProblem: null,
      downSince: null,
    });
    expect(status.queues.details).toEqual({
      spool: { messages: 0, oldestSeconds: null },
      outbound: { messages: 0, oldestSeconds: null },
    });
    expect(status.warnings).toEqual([]);
    expect(home.agent.status().today).toMatchObject({ forwarded: 1 });

    const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(metrics).toContain('mxtunnel_edge_tunnel_up{home="home"} 1');
    expect(metrics).toMatch(/mxtunnel_edge_sessions_total\{service="smtp",outcome="spliced"\} 1/);
    expect(metrics).toContain('mxtunnel_edge_queue_messages{queue="spool"} 0');
    expect(metrics).toMatch(/mxtunnel_edge_handshake_failures_total\{reason="failed"\} 0/);
    expect(metrics).toMatch(/mxtunnel_edge_tunnel_bytes_total\{home="home",direction="received"\} [1-9]/);
    expect((await fetch(`http://127.0.0.1:${metricsPort}/other`)).status).toBe(404);

    await home.stop();
    await waitFor(() => !connected(edge), { what: "the edge to see home gone" });
    status = edge.agent.status();
    expect(status.homes[0]?.downSince).toEqual(expect.any(String));
    expect(status.homes[0]?.clockSkewMs).toBeNull();
    expect(status.warnings).toEqual([
      expect.stringMatching(/^home home has been disconnected for \d+s .*inbound mail is spooled$/),
    ]);
    expect(status.lastErrors[0]?.message).toMatch(/^tunnel of home home down/);
    const after = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(after).toContain('mxtunnel_edge_tunnel_up{home="home"} 0');
  });

  it("shows a skewed peer clock in status (JSON over the admin socket, table) and warns about it", async () => {
    // Fault injection: every `time` answer claims a clock 5 s ahead, so each side sees the other ahead.
    const sendControl = Mux.prototype.sendControl;
    const skewed = vi.spyOn(Mux.prototype, "sendControl").mockImplementation(function (this: Mux, message) {
      const shifted =
        message.type === "time" && typeof message.now === "number"
          ? { ...message, now: message.now + 5000 }
          : message;
      sendControl.call(this, shifted);
    });
    try {
      const edge = await makeEdge();
      const home = await makeHome(await edge.token());
      await waitFor(() => (edge.agent.status().homes[0]?.clockSkewMs ?? 0) > 4000, {
        what: "the edge to measure home's clock",
      });
      await waitFor(() => (home.agent.status().edges[0]?.clockSkewMs ?? 0) > 4000, {
        what: "home to measure the edge's clock",
      });

      const edgeStatus = (await callAdminSocket(join(edge.dir, "admin.sock"), {
        command: "status",
      })) as EdgeStatus;
      expect(edgeStatus.homes[0]?.clockSkewMs).toBeGreaterThan(4000);
      expect(edgeStatus.warnings).toEqual([
        expect.stringMatching(/^home home's clock is \d+ ms ahead: run NTP on both machines/),
      ]);
      expect(renderEdgeStatus(edgeStatus)).toMatch(/^home +yes +\S+ +\+\d{4}ms /m);

      const homeStatus = (await callAdminSocket(join(home.dir, "admin.sock"), {
        command: "status",
      })) as HomeStatus;
      expect(homeStatus.edges[0]?.clockSkewMs).toBeGreaterThan(4000);
      expect(homeStatus.warnings).toEqual([
        expect.stringMatching(/^mx\.edge\.test's clock is \d+ ms ahead: run NTP on both machines/),
      ]);
      expect(renderHomeStatus(homeStatus)).toMatch(/^mx\.edge\.test +yes +\S+ +\+\d{4}ms /m);
    } finally {
      skewed.mockRestore();
    }
  });

  it("warns about a pairing token about to expire unused and about a nearly full disk", async () => {
    const edge = await makeEdge({ overrides: { "checks.minFreeSpace": Number.MAX_SAFE_INTEGER } });
    await edge.token({ ttlMs: 5 * 60_000, domains: ["home.test"] });
    const warnings = edge.agent.status().warnings;
    expect(warnings).toEqual([
      expect.stringMatching(/^only .* free for the spool and queue \(checks\.minFreeSpace .*\)/),
      expect.stringMatching(/^a pairing token \(domains home\.test\) expires unused in (4m\d+s|5m)$/),
    ]);
  });

  it("metrics are off by default", async () => {
    const edge = await makeEdge();
    expect(edge.agent.addresses.metrics).toBeNull();
  });

  it("home doctor: a probe session tells a PROXY-ready service from one that greets at once", async () => {
    const proxied = await mailbox({ proxy: true });
    const plain = await mailbox({ proxy: false });
    const closedPort = await freePort();
    const options = { timeoutMs: 3000, quietMs: 300 };
    const target = (port: number) => ({ host: "127.0.0.1", port });
    expect(await probeService("smtp", target(proxied.port), "v2", options)).toMatchObject({
      level: "pass",
      message: expect.stringContaining("accepts the PROXY v2 header and greets: 220"),
    });
    expect(await probeService("smtp", target(proxied.port), "v1", options)).toMatchObject({ level: "pass" });
    expect(await probeService("smtp", target(plain.port), "v2", options)).toMatchObject({
      level: "fail",
      message: expect.stringContaining("greets before any PROXY header"),
      fix: expect.stringContaining("smtpd_upstream_proxy_protocol=haproxy"),
    });
    expect(await probeService("smtp", target(plain.port), "off", options)).toMatchObject({ level: "pass" });
    expect(await probeService("smtp", target(proxied.port), "off", options)).toMatchObject({
      level: "fail",
      message: expect.stringContaining("seems to wait for a PROXY header"),
    });
    expect(await probeService("smtp", target(closedPort), "v2", options)).toMatchObject({
      level: "fail",
      message: expect.stringContaining("ECONNREFUSED"),
    });
    // The probe's PROXY header names a TEST-NET client, never a real one.
    expect(proxied.messages).toEqual([]);

    const checks = await homeDoctor({
      config: parseHomeConfig({
        postfix: { inject: `127.0.0.1:${proxied.port}` },
        services: { imaps: { target: `127.0.0.1:${closedPort}` } },
      }),
      probe: null,
      postfix: null,
      timeoutMs: 3000,
      quietMs: 300,
    });
    expect(checks.map((c) => `${c.level} ${c.check}`)).toEqual([
      "fail agent",
      "pass service",
      "fail service",
      "skip postfix",
    ]);
  });
});
