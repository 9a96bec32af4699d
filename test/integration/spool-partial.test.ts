// Spooled mail that home's mail server takes for some recipients only: the accepted ones get exactly
// one copy (also after an edge restart), the ones refused for good a DSN when the sender was
// authenticated (quarantine otherwise), the deferred ones are retried alone; and every recipient
// keeps its own DSN parameters (NOTIFY, ORCPT). Home's "Postfix" is an smtp-server here, so the test
// can script each recipient's answer and see every RCPT's parameters.
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { SMTPServer } from "smtp-server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mailbox, startMailbox } from "../../demo/src/mailbox.js";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents, makeEdge, makeHome, startTestHome, tempDir } from "../helpers/agents.js";
import { startDnsServer, type TestDnsServer } from "../helpers/dns-server.js";
import { smtpConnect } from "../helpers/smtp-client.js";

interface Transaction {
  from: string;
  rcpts: { address: string; notify: string | undefined; orcpt: string | undefined }[];
  subject: string;
}

/** A stand-in for home's Postfix: refuses ghost@ for good and later@ while `deferLater` is set. */
async function startHomeMta(): Promise<{
  port: number;
  transactions: Transaction[];
  deferLater: boolean;
  close(): Promise<void>;
}> {
  const state = { transactions: [] as Transaction[], deferLater: true };
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ["STARTTLS", "AUTH"],
    hideDSN: false,
    logger: false,
    onRcptTo(address, _session, callback) {
      const refusal = (code: number, text: string) => Object.assign(new Error(text), { responseCode: code });
      if (address.address.startsWith("ghost@")) return callback(refusal(550, "5.1.1 <ghost>: no such user"));
      if (address.address.startsWith("later@") && state.deferLater)
        return callback(refusal(450, "4.2.0 <later>: mailbox busy, try later"));
      callback();
    },
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on("data", (chunk: Buffer) => chunks.push(chunk));
      stream.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        state.transactions.push({
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
          rcpts: session.envelope.rcptTo.map((r) => {
            const args = (r.args || {}) as Record<string, string>;
            return { address: r.address, notify: args.NOTIFY, orcpt: args.ORCPT };
          }),
          subject: /^Subject: (.*)$/m.exec(text)?.[1]?.trim() ?? "",
        });
        callback();
      });
    },
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.server.address() as { port: number }).port;
  return {
    port,
    get transactions() {
      return state.transactions;
    },
    get deferLater() {
      return state.deferLater;
    },
    set deferLater(value: boolean) {
      state.deferLater = value;
    },
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** Sends one message to the edge (from 127.0.0.2, which sender.test's SPF allows) with raw RCPT lines. */
async function spool(port: number, from: string, rcptLines: string[], subject: string): Promise<void> {
  const { client, banner } = await smtpConnect(port);
  expect(banner).toMatch(/^220 .*backup MX/);
  expect(await client.command("EHLO client.example")).toMatch(/^250/);
  expect(await client.command(`MAIL FROM:<${from}>`)).toMatch(/^250/);
  for (const line of rcptLines) expect(await client.command(`RCPT TO:${line}`), line).toMatch(/^250/);
  expect(await client.command("DATA")).toMatch(/^354/);
  const reply = await client.command(`From: <${from}>\r\nSubject: ${subject}\r\n\r\nhello\r\n.`);
  expect(reply).toMatch(/^250/);
  client.close();
}

function copies(transactions: Transaction[], subject: string, address: string): number {
  return transactions.filter((t) => t.subject === subject && t.rcpts.some((r) => r.address === address))
    .length;
}

describe("spooled mail taken for some recipients only", () => {
  let mta: Awaited<ReturnType<typeof startHomeMta>>;
  let dns: TestDnsServer;
  let remote: Mailbox;

  beforeAll(async () => {
    mta = await startHomeMta();
    dns = await startDnsServer({
      "sender.test": { txt: ["v=spf1 ip4:127.0.0.2 -all"] },
      "forged.test": { txt: ["v=spf1 ip4:192.0.2.1 -all"] },
    });
    remote = await startMailbox({ proxy: false });
  }, 60_000);

  afterAll(async () => {
    await cleanupAgents();
    await remote?.close();
    await dns?.stop();
    await mta?.close();
  });

  it("delivers once, bounces or quarantines the refused, retries only the deferred, per-recipient NOTIFY", async () => {
    const recipients = join(await tempDir("rcpt"), "list");
    await writeFile(recipients, ["alice", "bob", "ghost", "later"].map((u) => `${u}@home.test\n`).join(""));
    const edge = await makeEdge({
      overrides: {
        dnsServers: [dns.address],
        transports: { "sender.test": `127.0.0.1:${remote.port}`, "forged.test": `127.0.0.1:${remote.port}` },
        "spool.retryMin": 100,
        "spool.retryMax": 200,
      },
    });
    const overrides = {
      "postfix.inject": `127.0.0.1:${mta.port}`,
      "postfix.proxyProtocol": "off",
      "recipients.file": recipients,
    };
    const home = await makeHome(await edge.token(), overrides, "partial-home");
    await waitFor(() => edge.agent.status().homes[0]?.recipients ?? false, { what: "recipient sync" });
    await home.stop();
    await waitFor(() => !edge.agent.status().homes[0]!.connected, { what: "home gone" });

    await spool(
      edge.smtpPort,
      "someone@sender.test",
      [
        "<alice@home.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;alice@home.test",
        "<bob@home.test> NOTIFY=NEVER ORCPT=rfc822;bob+2Bspool@home.test",
        "<ghost@home.test> NOTIFY=FAILURE",
        "<later@home.test>",
      ],
      "authenticated",
    );
    await spool(edge.smtpPort, "liar@forged.test", ["<alice@home.test>", "<ghost@home.test>"], "forged");
    const entries = await waitFor(
      () => {
        const list = edge.agent.spool.store.list();
        return list.length === 2 && list.every((e) => e.auth) ? list : undefined;
      },
      { what: "sender checks stored" },
    );
    const bySender = new Map(entries.map((e) => [e.header.envelope.mailFrom, e]));
    const authenticatedId = bySender.get("someone@sender.test")!.id;
    const forgedId = bySender.get("liar@forged.test")!.id;

    await startTestHome(home.dir, overrides);
    // ghost@ failed for good: a DSN to the authenticated sender, naming ghost@ alone.
    const dsn = await waitFor(() => remote.messages.find((m) => m.to.includes("someone@sender.test")), {
      what: "the DSN at the sender's server",
      timeoutMs: 30_000,
    });
    const text = dsn.data.toString("utf8");
    expect(dsn.from).toBe("");
    expect(text).toMatch(/Final-Recipient: rfc822; ?ghost@home\.test/i);
    expect(text).toMatch(/Status: 5\.1\.1/);
    expect(text).toMatch(/Diagnostic-Code: smtp; 550 5\.1\.1 <ghost>: no such user/);
    expect(text).not.toMatch(/Final-Recipient: rfc822; ?(alice|bob|later)@/i);
    // The forged sender's message went to alice@; for ghost@ a copy is quarantined, no DSN.
    await waitFor(() => edge.agent.spool.store.get(forgedId) === undefined, {
      what: "forged message settled",
    });
    const quarantine = join(edge.dir, "spool", "quarantine");
    expect(await readdir(quarantine)).toContain(`${forgedId}.partial.spool`);
    expect(await readFile(join(quarantine, `${forgedId}.partial.reason`), "utf8")).toMatch(
      /<ghost@home\.test>: 550 5\.1\.1 .*not authenticated/,
    );
    expect(remote.messages.filter((m) => m.to.includes("liar@forged.test"))).toHaveLength(0);
    expect(copies(mta.transactions, "forged", "alice@home.test")).toBe(1);

    // later@ was deferred: only it stays to be retried, and retries go to it alone.
    const entry = await waitFor(
      () => {
        const e = edge.agent.spool.store.get(authenticatedId);
        return e?.remaining && e.tries >= 2 ? e : undefined;
      },
      { what: "two retries for the deferred recipient" },
    );
    expect(entry.remaining).toEqual(["later@home.test"]);
    const authenticated = mta.transactions.filter((t) => t.subject === "authenticated");
    // Each recipient had its own NOTIFY/ORCPT, so each set went in its own transaction.
    const rcpt = (address: string) =>
      authenticated.flatMap((t) => t.rcpts).find((r) => r.address === address);
    expect(rcpt("alice@home.test")).toMatchObject({
      notify: "SUCCESS,FAILURE",
      orcpt: "rfc822;alice@home.test",
    });
    // ORCPT is xtext on the wire ("+2B" is a "+"); each hop decodes it and encodes it once again.
    expect(rcpt("bob@home.test")).toMatchObject({ notify: "NEVER", orcpt: "rfc822;bob+spool@home.test" });
    expect(
      authenticated.find((t) => t.rcpts.some((r) => r.address === "alice@home.test"))?.rcpts,
    ).toHaveLength(1);

    // An edge restart keeps the narrowed recipient list: nothing goes to alice@ or bob@ again.
    await edge.restart();
    expect(edge.agent.spool.store.get(authenticatedId)?.remaining).toEqual(["later@home.test"]);
    mta.deferLater = false;
    await waitFor(() => edge.agent.spool.store.size === 0, { what: "spool empty", timeoutMs: 30_000 });
    expect(copies(mta.transactions, "authenticated", "alice@home.test")).toBe(1);
    expect(copies(mta.transactions, "authenticated", "bob@home.test")).toBe(1);
    expect(copies(mta.transactions, "authenticated", "later@home.test")).toBe(1);
    const retried = mta.transactions.find(
      (t) => t.subject === "authenticated" && t.rcpts[0]?.address === "later@home.test",
    );
    expect(retried?.rcpts).toEqual([{ address: "later@home.test", notify: undefined, orcpt: undefined }]);
    expect(copies(mta.transactions, "authenticated", "ghost@home.test")).toBe(0);
    expect(remote.messages.filter((m) => m.to.includes("someone@sender.test"))).toHaveLength(1);
  });
});
