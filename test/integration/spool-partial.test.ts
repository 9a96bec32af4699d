// Spooled mail that home's mail server takes for some recipients only: the accepted ones get exactly
// one copy (also after an edge restart), the ones refused for good a DSN when the sender was
// authenticated (quarantine otherwise), the deferred ones are retried alone; and every recipient
// keeps its own DSN parameters (NOTIFY, ORCPT). Home's "Postfix" is an smtp-server here, so the test
// can script each recipient's answer and see every RCPT's parameters.
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { decodeKey, SpoolFileWriter, SpoolSealer } from "@mxtunnel/shared";
import { SMTPServer } from "smtp-server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { waitFor } from "../e2e/lab/wait.js";
import { cleanupAgents } from "../helpers/agents.js";
import { smtpConnect } from "../helpers/smtp-client.js";
import { edgeWithHomeAway, type Senders, spooledAndChecked, startSenders } from "../helpers/spool-senders.js";

interface Transaction {
  from: string;
  /** RET and ENVID as home's injector passed them on. */
  mailArgs: { ret: string | undefined; envid: string | undefined };
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
          mailArgs: {
            ret: ((session.envelope.mailFrom || { args: {} }).args as Record<string, string>).RET,
            envid: ((session.envelope.mailFrom || { args: {} }).args as Record<string, string>).ENVID,
          },
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
  // smtp-server re-emits a session's socket errors (a reset mid-transaction) on the server.
  server.on("error", () => {});
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
async function spool(
  port: number,
  from: string,
  rcptLines: string[],
  subject: string,
  mailParams = "",
): Promise<void> {
  const { client, banner } = await smtpConnect(port);
  expect(banner).toMatch(/^220 .*backup MX/);
  expect(await client.command("EHLO client.example")).toMatch(/^250/);
  expect(await client.command(`MAIL FROM:<${from}>${mailParams}`)).toMatch(/^250/);
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
  let senders: Senders;

  beforeAll(async () => {
    mta = await startHomeMta();
    senders = await startSenders();
  }, 60_000);

  afterAll(async () => {
    await cleanupAgents();
    await senders?.stop();
    await mta?.close();
  });

  /** An edge spooling for `users` @home.test, whose home (injecting into `mta`) synced them and went away. */
  const homeAway = (users: string[], homeName: string) =>
    edgeWithHomeAway(senders, {
      recipients: users.map((u) => `${u}@home.test`),
      home: { "postfix.inject": `127.0.0.1:${mta.port}`, "postfix.proxyProtocol": "off" },
      homeName,
      retryMax: 200,
    });

  it("delivers once, bounces or quarantines the refused, retries only the deferred, per-recipient NOTIFY", async () => {
    const { edge, comeBack } = await homeAway(["alice", "bob", "ghost", "later"], "partial-home");

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
    const entries = await spooledAndChecked(edge, 2);
    const bySender = new Map(entries.map((e) => [e.header.envelope.mailFrom, e]));
    const authenticatedId = bySender.get("someone@sender.test")!.id;
    const forgedId = bySender.get("liar@forged.test")!.id;

    await comeBack();
    // ghost@ failed for good: a DSN to the authenticated sender, naming ghost@ alone.
    const dsn = await waitFor(() => senders.messagesTo("someone@sender.test")[0], {
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
    expect(senders.messagesTo("liar@forged.test")).toHaveLength(0);
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
    expect(senders.messagesTo("someone@sender.test")).toHaveLength(1);
  });

  it("offers DSN, refuses bad DSN parameters, honours NOTIFY, ORCPT, ENVID and RET; old files still drain", async () => {
    const { edge, comeBack } = await homeAway(["alice", "ghost"], "dsn-params-home");

    // EHLO lists DSN; bad DSN parameters get a 501 and spool nothing.
    const { client } = await smtpConnect(edge.smtpPort);
    expect(await client.command("EHLO client.example")).toMatch(/^250[ -]DSN$/m);
    const refusals: [string, RegExp][] = [
      ["MAIL FROM:<someone@sender.test> RET=BODY", /^501 .*RET/],
      ["MAIL FROM:<someone@sender.test> RET", /^501 .*RET parameter requires a value/],
      [`MAIL FROM:<someone@sender.test> ENVID=${"x".repeat(101)}`, /^501 5\.5\.4 ENVID .*100/],
      ["MAIL FROM:<someone@sender.test> ENVID=caf+E9", /^501 5\.5\.4 ENVID .*US-ASCII/],
    ];
    for (const [line, refusal] of refusals) expect(await client.command(line), line).toMatch(refusal);
    expect(await client.command("MAIL FROM:<someone@sender.test> ENVID=ok")).toMatch(/^250/);
    const rcptRefusals: [string, RegExp][] = [
      ["RCPT TO:<ghost@home.test> NOTIFY=NEVER,SUCCESS", /^501 .*NOTIFY=NEVER cannot be combined/],
      ["RCPT TO:<ghost@home.test> NOTIFY=SOMETIMES", /^501 .*NOTIFY parameter must be/],
      ["RCPT TO:<ghost@home.test> ORCPT=ghost@home.test", /^501 .*ORCPT/],
      [`RCPT TO:<ghost@home.test> ORCPT=rfc822;${"g".repeat(500)}@home.test`, /^501 5\.5\.4 ORCPT .*500/],
      ["RCPT TO:<ghost@home.test> NOTIFY=FAILURE NOTIFY=DELAY", /^501 .*duplicate NOTIFY/],
    ];
    for (const [line, refusal] of rcptRefusals) expect(await client.command(line), line).toMatch(refusal);
    expect(await client.command("DATA")).toMatch(/^503/);
    client.close();
    expect(edge.agent.spool.store.size).toBe(0);

    // ghost@ is refused for good by home's server: NOTIFY=NEVER means no DSN; NOTIFY=FAILURE a DSN
    // with the ORCPT and ENVID quoted, and a note that the sealed message cannot be returned.
    await spool(edge.smtpPort, "never@sender.test", ["<ghost@home.test> NOTIFY=never"], "never");
    await spool(
      edge.smtpPort,
      "tell@sender.test",
      [
        "<ghost@home.test> NOTIFY=FAILURE ORCPT=rfc822;Ghost+2Borig@home.test",
        "<alice@home.test> NOTIFY=SUCCESS",
      ],
      "tell",
      " RET=HDRS ENVID=env+2B42",
    );
    // A file spooled before the edge offered DSN: parameters nobody checked (lower case, invalid).
    const spoolKey = decodeKey(edge.agent.state.homes()[0]!.spoolPublicKey, "spool key");
    const oldId = `old-${Date.now().toString(36)}`;
    const sealer = new SpoolSealer({
      spoolPublicKey: spoolKey,
      id: oldId,
      receivedAt: new Date(),
      envelope: {
        mailFrom: "old@sender.test",
        mailParams: { RET: "everything" },
        rcptTo: [
          { address: "alice@home.test", params: { NOTIFY: "whenever" } },
          { address: "ghost@home.test", params: {} },
        ],
      },
      client: { address: "127.0.0.2", port: 25000, helo: "client.example", tls: false },
      extra: { homeKey: edge.agent.state.homes()[0]!.publicKey },
    });
    const { store } = edge.agent.spool;
    const writer = await SpoolFileWriter.create(store.dir, sealer, { tmpDir: store.tmpDir });
    await writer.write(Buffer.from("From: <old@sender.test>\r\nSubject: old\r\n\r\nhello\r\n"));
    const committed = await writer.commit();
    await store.add(committed.path);
    await store.setAuth(oldId, {
      spf: "pass",
      dkimAligned: false,
      dsnAllowed: true,
      checkedAt: new Date().toISOString(),
    });
    await waitFor(() => (store.list().every((e) => e.auth) ? true : undefined), {
      what: "sender checks stored",
    });
    expect(store.size).toBe(3);
    const neverId = store.list().find((e) => e.header.envelope.mailFrom === "never@sender.test")!.id;
    expect(
      store.list().find((e) => e.header.envelope.mailFrom === "never@sender.test")?.header.envelope.rcptTo,
    ).toEqual([{ address: "ghost@home.test", params: { NOTIFY: "NEVER" } }]);

    await comeBack();
    await waitFor(() => (store.size === 0 ? true : undefined), { what: "spool empty", timeoutMs: 30_000 });
    const told = await waitFor(() => senders.messagesTo("tell@sender.test")[0], {
      what: "the DSN for tell@",
    });
    const text = told.data.toString("utf8");
    expect(text).toMatch(/^Original-Envelope-Id: env\+42\r?$/m);
    expect(text).toMatch(/^Original-Recipient: rfc822;Ghost\+orig@home\.test\r?$/m);
    expect(text).toMatch(/Final-Recipient: rfc822; ?ghost@home\.test/);
    expect(text).not.toMatch(/Final-Recipient: rfc822; ?alice@/);
    expect(text).toMatch(/its headers cannot be returned \(RET=HDRS\)/);
    // The old file: alice@ delivered without the unreadable NOTIFY/RET, ghost@ bounced (no NOTIFY: failures are reported).
    const old = await waitFor(() => senders.messagesTo("old@sender.test")[0], {
      what: "the DSN for the old file",
    });
    expect(old.data.toString("utf8")).toMatch(/Final-Recipient: rfc822; ?ghost@home\.test/);
    expect(copies(mta.transactions, "old", "alice@home.test")).toBe(1);
    const oldAlice = mta.transactions.find(
      (t) => t.subject === "old" && t.rcpts[0]?.address === "alice@home.test",
    );
    expect(oldAlice?.rcpts[0]?.notify).toBeUndefined();
    expect(oldAlice?.mailArgs.ret).toBeUndefined();
    // ENVID and RET went on to home's server with the message, so its own notices carry them.
    const tellAlice = mta.transactions.find(
      (t) => t.subject === "tell" && t.rcpts[0]?.address === "alice@home.test",
    );
    expect(tellAlice?.mailArgs).toEqual({ ret: "HDRS", envid: "env+42" });
    expect(tellAlice?.rcpts[0]?.notify).toBe("SUCCESS");
    // NOTIFY=NEVER: no DSN, although the sender was authenticated (every queued DSN has gone out).
    await waitFor(() => (edge.agent.outbound.size === 0 ? true : undefined), {
      what: "outbound queue empty",
    });
    expect(senders.messagesTo("never@sender.test")).toHaveLength(0);
    expect(await readdir(join(edge.dir, "spool", "quarantine")).catch(() => [])).not.toContain(
      `${neverId}.spool`,
    );
  });
});
