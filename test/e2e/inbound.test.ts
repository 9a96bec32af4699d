// Issue 3 end to end: port 25 on the edge spliced through the tunnel to a real Postfix at home,
// with real clients (swaks, nodemailer), the real client IP reaching Postfix via PROXY v2.
import { createHash, randomBytes } from "node:crypto";
import net from "node:net";
import nodemailer from "nodemailer";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cleanupAgents, makeEdge, makeHome, type TestEdge, type TestHome } from "../helpers/agents.js";
import { smtpOver } from "../helpers/smtp-client.js";
import { swaks, swaksTo } from "../helpers/swaks.js";
import { freePort, hasIPv6Loopback } from "./lab/ports.js";
import { type PostfixLab, startPostfix } from "./lab/postfix.js";
import { requireTools } from "./lab/require-tools.js";
import { waitFor } from "./lab/wait.js";

const ready = requireTools(["postfix", "postconf", "swaks"], "inbound e2e suite");

describe.skipIf(!ready)("inbound mail, live, through a real Postfix", () => {
  let postfix: PostfixLab;
  let edge: TestEdge;
  let home: TestHome;
  let v6Port: number | undefined;

  beforeAll(async () => {
    postfix = await startPostfix({ messageSizeLimit: 60 * 1024 * 1024 });
    v6Port = postfix.ipv6 && hasIPv6Loopback() ? await freePort({ ipv6: true }) : undefined;
    edge = await makeEdge({
      overrides: v6Port ? { forwards: [{ listen: `[::1]:${v6Port}`, service: "smtp" }] } : {},
    });
    home = await makeHome(
      await edge.token(),
      { "postfix.inject": `127.0.0.1:${postfix.injectPort}` },
      "lab-home",
    );
  }, 120_000);

  afterAll(async () => {
    await cleanupAgents();
    await postfix?.stop();
  });

  it("delivers swaks mail from 127.0.0.2 with the client's address in Postfix's log and Received header", async () => {
    const before = (await postfix.messages("alice")).length;
    const tag = `live-${randomBytes(4).toString("hex")}`;
    const result = await swaksTo(edge.smtpPort, `alice@${postfix.domain}`, [
      "--local-interface",
      "127.0.0.2",
      "--ehlo",
      "sender.example.net",
      "--from",
      "someone@example.net",
      "--header",
      `Subject: ${tag}`,
    ]);
    expect(result.code, result.output).toBe(0);
    expect(result.output).toMatch(/<-\s+250 2\.0\.0 Ok: queued/);
    const messages = await postfix.waitForMessages("alice", before + 1, 20_000);
    const message = messages.find((m) => m.includes(tag));
    expect(message).toMatch(/Received: from sender\.example\.net \(unknown \[127\.0\.0\.2\]\)/);
    await postfix.waitForLog(/client=unknown\[127\.0\.0\.2\]/);
  });

  it.skipIf(!hasIPv6Loopback())("carries an IPv6 client as TCP6 to Postfix", async () => {
    expect(v6Port, "the lab's Postfix should accept TCP6 when ::1 exists").toBeDefined();
    const tag = `v6-${randomBytes(4).toString("hex")}`;
    const result = await swaks([
      "--server",
      "::1",
      "--port",
      String(v6Port),
      "-6",
      "--ehlo",
      "v6.example.net",
      "--from",
      "someone@example.net",
      "--to",
      `alice@${postfix.domain}`,
      "--header",
      `Subject: ${tag}`,
    ]);
    expect(result.code, result.output).toBe(0);
    await postfix.waitForLog(/client=unknown\[::1\]/);
    const message = await waitFor(
      async () => (await postfix.messages("alice")).find((m) => m.includes(tag)),
      {
        what: "the IPv6 message in alice's Maildir",
        timeoutMs: 20_000,
      },
    );
    expect(message).toMatch(/\(unknown \[(IPv6:)?::1\]\)/);
  });

  it("leaves relay policy to Postfix: a foreign recipient is refused", async () => {
    const result = await swaksTo(edge.smtpPort, "victim@elsewhere.example", [
      "--local-interface",
      "127.0.0.2",
      "--from",
      "someone@example.net",
      "--quit-after",
      "RCPT",
    ]);
    expect(result.code).not.toBe(0);
    expect(result.output).toMatch(/<\*\* +454 4\.7\.1 .*Relay access denied/);
  });

  it("runs STARTTLS end to end with Postfix", async () => {
    const tag = `tls-${randomBytes(4).toString("hex")}`;
    const result = await swaksTo(edge.smtpPort, `alice@${postfix.domain}`, [
      "--local-interface",
      "127.0.0.2",
      "--tls",
      "--from",
      "someone@example.net",
      "--header",
      `Subject: ${tag}`,
    ]);
    expect(result.code, result.output).toBe(0);
    expect(result.output).toMatch(/TLS started/);
    await postfix.waitForLog(/TLS connection established from unknown\[127\.0\.0\.2\]/);
    await expect
      .poll(async () => (await postfix.messages("alice")).some((m) => m.includes(tag)), { timeout: 20_000 })
      .toBe(true);
  });

  it("delivers 20 concurrent sessions from nodemailer and swaks", async () => {
    const tag = `conc-${randomBytes(4).toString("hex")}`;
    const sends: Promise<unknown>[] = [];
    for (let i = 0; i < 10; i++) {
      const transport = nodemailer.createTransport({
        host: "127.0.0.1",
        port: edge.smtpPort,
        ignoreTLS: true,
        localAddress: "127.0.0.2",
      });
      sends.push(
        transport
          .sendMail({
            from: "n@example.net",
            to: `bob@${postfix.domain}`,
            subject: `${tag} n${i}`,
            text: `nodemailer ${i}\n`,
          })
          .finally(() => transport.close()),
      );
      sends.push(
        swaksTo(edge.smtpPort, `bob@${postfix.domain}`, [
          "--local-interface",
          "127.0.0.2",
          "--from",
          "s@example.net",
          "--header",
          `Subject: ${tag} s${i}`,
        ]).then((r) => expect(r.code, r.output).toBe(0)),
      );
    }
    await Promise.all(sends);
    await expect
      .poll(async () => (await postfix.messages("bob")).filter((m) => m.includes(tag)).length, {
        timeout: 30_000,
      })
      .toBe(20);
  });

  it("delivers a 50 MB message intact", async () => {
    const body = randomBytes(37 * 1024 * 1024)
      .toString("base64")
      .replace(/.{76}/g, "$&\r\n");
    const digest = createHash("sha256").update(body).digest("hex");
    const tag = `big-${digest.slice(0, 8)}`;
    const rssBefore = process.memoryUsage().rss;
    const transport = nodemailer.createTransport({
      host: "127.0.0.1",
      port: edge.smtpPort,
      ignoreTLS: true,
      localAddress: "127.0.0.2",
    });
    const raw = `From: big@example.net\r\nTo: alice@${postfix.domain}\r\nSubject: ${tag}\r\nMessage-ID: <${tag}@example.net>\r\n\r\n${body}`;
    const info = await transport.sendMail({
      envelope: { from: "big@example.net", to: [`alice@${postfix.domain}`] },
      raw,
    });
    transport.close();
    expect(info.response).toMatch(/^250/);
    await expect
      .poll(async () => (await postfix.messages("alice")).some((m) => m.includes(tag)), { timeout: 60_000 })
      .toBe(true);
    const message = (await postfix.messages("alice")).find((m) => m.includes(tag))!;
    const received = message
      .slice(message.indexOf("\n\n") + 2)
      .replace(/\r?\n/g, "\r\n")
      .trimEnd();
    expect(createHash("sha256").update(received).digest("hex")).toBe(
      createHash("sha256").update(body.trimEnd()).digest("hex"),
    );
    const mux = [...home.agent.links.values()][0]!.currentMux!;
    expect(mux.stats().receiveBuffered).toBeLessThanOrEqual(4 * 1024 * 1024);
    console.info(
      `50 MB message: test process RSS ${Math.round(rssBefore / 2 ** 20)} → ${Math.round(process.memoryUsage().rss / 2 ** 20)} MiB (edge, home, clients in one process)`,
    );
  }, 120_000);
});

describe.skipIf(!ready)("inbound failure modes", () => {
  let postfix: PostfixLab;

  beforeAll(async () => {
    postfix = await startPostfix();
  }, 120_000);

  afterAll(async () => {
    await cleanupAgents();
    await postfix?.stop();
  });

  it("home refuses a private client address unless allowPrivateClientIPs is set: never delivered as local", async () => {
    const edge = await makeEdge();
    const home = await makeHome(await edge.token(), {
      "postfix.inject": `127.0.0.1:${postfix.injectPort}`,
      allowPrivateClientIPs: false,
    });
    const before = (await postfix.messages("alice")).length;
    const result = await swaksTo(edge.smtpPort, `alice@${postfix.domain}`, [
      "--local-interface",
      "127.0.0.2",
      "--from",
      "x@example.net",
    ]);
    // Home reset the stream, so the edge answered the session itself (backup MX), not Postfix.
    expect(result.output).toMatch(/<- +220 mx\.edge\.test ESMTP backup MX/);
    expect(result.output).not.toMatch(/250 2\.0\.0 Ok: queued as [0-9A-F]+$/m);
    expect(home.agent.connector.counters.refusedAddress).toBeGreaterThan(0);
    expect(edge.agent.status().sessions.spliced).toBe(0);
    expect((await postfix.messages("alice")).length).toBe(before);
  });

  it("no home: the edge answers as backup MX at once, and stays up", async () => {
    const edge = await makeEdge();
    for (let i = 0; i < 3; i++) {
      const result = await swaksTo(edge.smtpPort, `alice@${postfix.domain}`, ["--quit-after", "RCPT"]);
      expect(result.output).toMatch(/<- +220 mx\.edge\.test ESMTP backup MX/);
    }
    expect(edge.agent.status().sessions.fallbacks).toBe(3);
  });

  it("home killed mid-DATA: no 250 and no partial message in Postfix", async () => {
    const edge = await makeEdge();
    const home = await makeHome(await edge.token(), { "postfix.inject": `127.0.0.1:${postfix.injectPort}` });
    const before = (await postfix.messages("alice")).length;
    const socket = net.connect({ host: "127.0.0.1", port: edge.smtpPort, localAddress: "127.0.0.2" });
    const smtp = smtpOver(socket);
    expect(await smtp.reply()).toMatch(/^220 /);
    expect(await smtp.command("EHLO cut.example.net")).toMatch(/^250 /m);
    expect(await smtp.command("MAIL FROM:<cut@example.net>")).toMatch(/^250/);
    expect(await smtp.command(`RCPT TO:<alice@${postfix.domain}>`)).toMatch(/^250/);
    expect(await smtp.command("DATA")).toMatch(/^354/);
    socket.write("Subject: half\r\n\r\nthe first half of a message\r\n");
    const closed = new Promise<string>((resolve) => {
      let rest = "";
      socket.on("data", (d: string) => (rest += d));
      socket.once("close", () => resolve(rest));
    });
    await home.stop();
    const trailing = await closed;
    expect(trailing).not.toMatch(/^250/m);
    await postfix.waitForLog(/lost connection after DATA/);
    expect((await postfix.messages("alice")).length).toBe(before);
  });
});
