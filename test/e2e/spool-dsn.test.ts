// Issue 4: spooled mail that home's Postfix refuses for good gets a DSN only when the sender was
// authenticated at spool time (here: SPF pass); a forged sender's message is quarantined. The same per
// recipient when Postfix takes the message for some recipients: those get one copy, the deferred ones
// are retried alone.
import { readdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cleanupAgents } from "../helpers/agents.js";
import { smtpConnect } from "../helpers/smtp-client.js";
import { edgeWithHomeAway, type Senders, spooledAndChecked, startSenders } from "../helpers/spool-senders.js";
import { swaksTo } from "../helpers/swaks.js";
import { type PostfixLab, startPostfix } from "./lab/postfix.js";
import { requireTools } from "./lab/require-tools.js";
import { waitFor } from "./lab/wait.js";

const ready = requireTools(["postfix", "postconf", "swaks"], "spool DSN suite");

describe.skipIf(!ready)(
  "undeliverable spooled mail: DSN for authenticated senders, quarantine for forged ones",
  () => {
    let postfix: PostfixLab;
    let senders: Senders;

    beforeAll(async () => {
      postfix = await startPostfix();
      senders = await startSenders();
    }, 120_000);

    afterAll(async () => {
      await cleanupAgents();
      await senders?.stop();
      await postfix?.stop();
    });

    /** An edge spooling for `users` of the Postfix lab, whose home has synced them and gone away. */
    const homeAway = (users: string[], homeName: string, retryMax?: number) =>
      edgeWithHomeAway(senders, {
        recipients: users.map((u) => `${u}@${postfix.domain}`),
        home: { "postfix.inject": `127.0.0.1:${postfix.injectPort}` },
        homeName,
        ...(retryMax === undefined ? {} : { retryMax }),
      });

    /** swaks from 127.0.0.2, which sender.test's SPF allows and forged.test's does not. */
    const sendFrom = (port: number, from: string, to: string, subject: string) =>
      swaksTo(port, to, [
        "--local-interface",
        "127.0.0.2",
        "--ehlo",
        "client.example",
        "--from",
        from,
        "--header",
        `Subject: ${subject}`,
      ]);

    it("bounces to an SPF-authenticated sender and quarantines a forged one", async () => {
      // ghost@ is in the synced list but not a Postfix user: Postfix will refuse it with 550 5.1.1.
      const { edge, comeBack } = await homeAway(["alice", "ghost"], "dsn-home");

      for (const from of ["someone@sender.test", "liar@forged.test"]) {
        const sent = await sendFrom(
          edge.smtpPort,
          from,
          `ghost@${postfix.domain}`,
          `to a ghost from ${from}`,
        );
        expect(sent.code, sent.output).toBe(0);
        expect(sent.output).toMatch(/<- +250 .*backup MX/);
      }
      const entries = await spooledAndChecked(edge, 2);
      const bySender = new Map(entries.map((e) => [e.header.envelope.mailFrom, e]));
      expect(bySender.get("someone@sender.test")?.auth).toMatchObject({ spf: "pass", dsnAllowed: true });
      expect(bySender.get("liar@forged.test")?.auth).toMatchObject({ spf: "fail", dsnAllowed: false });
      const forgedId = bySender.get("liar@forged.test")!.id;

      await comeBack();
      const dsn = await waitFor(() => senders.messagesTo("someone@sender.test")[0], {
        what: "the DSN at the sender's server",
        timeoutMs: 30_000,
      });
      expect(dsn.from).toBe("");
      const text = dsn.data.toString("utf8");
      expect(text).toMatch(/Content-Type: multipart\/report; report-type=delivery-status/i);
      expect(text).toMatch(/Final-Recipient: rfc822; ?ghost@home\.test/i);
      expect(text).toMatch(/Status: 5\.1\.1/);
      await waitFor(() => edge.agent.spool.store.size === 0, { what: "spool empty" });
      expect(await readdir(join(edge.dir, "spool", "quarantine"))).toContain(`${forgedId}.spool`);
      expect(senders.messagesTo("liar@forged.test")).toHaveLength(0);
    });

    it("delivers a message Postfix takes for some recipients once, and bounces or quarantines the rest", async () => {
      const { edge, comeBack } = await homeAway(["alice", "ghost"], "partial-home");

      const dsnsBefore = senders.messagesTo("someone@sender.test").length;
      const tag = Date.now().toString(36);
      const to = `alice@${postfix.domain},ghost@${postfix.domain}`;
      for (const from of ["someone@sender.test", "liar@forged.test"]) {
        const sent = await sendFrom(edge.smtpPort, from, to, `partly taken ${tag} from ${from}`);
        expect(sent.code, sent.output).toBe(0);
      }
      const entries = await spooledAndChecked(edge, 2);
      const forgedId = entries.find((e) => e.header.envelope.mailFrom === "liar@forged.test")!.id;

      await comeBack();
      await waitFor(() => edge.agent.spool.store.size === 0, { what: "spool empty", timeoutMs: 30_000 });
      const dsn = await waitFor(() => senders.messagesTo("someone@sender.test")[dsnsBefore], {
        what: "the DSN for ghost@ at the sender's server",
        timeoutMs: 30_000,
      });
      const text = dsn.data.toString("utf8");
      expect(text).toMatch(/Final-Recipient: rfc822; ?ghost@home\.test/i);
      expect(text).not.toMatch(/Final-Recipient: rfc822; ?alice@/i);
      expect(text).toMatch(/Status: 5\.1\.1/);
      expect(
        await readFile(join(edge.dir, "spool", "quarantine", `${forgedId}.partial.reason`), "utf8"),
      ).toMatch(/<ghost@home\.test>: 550 5\.1\.1/);
      // alice@ got each message exactly once.
      const mine = async () =>
        (await postfix.messages("alice")).filter((m) => m.includes(`partly taken ${tag}`));
      await waitFor(async () => ((await mine()).length >= 2 ? true : undefined), { what: "alice's copies" });
      // Nothing is left to send again: after a restart the spool is still empty.
      await edge.restart();
      expect(edge.agent.spool.store.size).toBe(0);
      expect(await mine()).toHaveLength(2);
      expect(senders.messagesTo("liar@forged.test")).toHaveLength(0);
    });

    it("retries only the recipient Postfix deferred, also across an edge restart", async () => {
      // bob@ is deferred by a recipient access map until the map entry goes; ghost@ is unknown (550).
      const access = join(postfix.dir, "rcpt-access");
      await writeFile(access, `bob@${postfix.domain} 450 4.2.0 mailbox busy\n`, { mode: 0o644 });
      await postfix.postconf([
        "-e",
        `smtpd_recipient_restrictions=check_recipient_access texthash:${access}`,
      ]);
      const { edge, comeBack } = await homeAway(["alice", "bob", "ghost"], "deferred-home", 300);

      const dsnsBefore = senders.messagesTo("someone@sender.test").length;
      const tag = `deferred ${Date.now().toString(36)}`;
      const to = ["alice", "bob", "ghost"].map((u) => `${u}@${postfix.domain}`).join(",");
      const sent = await sendFrom(edge.smtpPort, "someone@sender.test", to, tag);
      expect(sent.code, sent.output).toBe(0);
      const id = (await waitFor(() => edge.agent.spool.store.list().find((e) => e.auth), { what: "spooled" }))
        .id;

      await comeBack();
      const entry = await waitFor(
        () => {
          const e = edge.agent.spool.store.get(id);
          return e?.remaining && e.tries >= 2 ? e : undefined;
        },
        { what: "bob@ retried", timeoutMs: 30_000 },
      );
      expect(entry.remaining).toEqual([`bob@${postfix.domain}`]);
      const dsn = await waitFor(() => senders.messagesTo("someone@sender.test")[dsnsBefore], {
        what: "the DSN for ghost@",
        timeoutMs: 30_000,
      });
      expect(dsn.data.toString("utf8")).toMatch(/Final-Recipient: rfc822; ?ghost@home\.test/i);
      expect(dsn.data.toString("utf8")).not.toMatch(/Final-Recipient: rfc822; ?(alice|bob)@/i);

      await edge.restart();
      expect(edge.agent.spool.store.get(id)?.remaining).toEqual([`bob@${postfix.domain}`]);
      await writeFile(access, "", { mode: 0o644 });
      await postfix.reload();
      await waitFor(() => edge.agent.spool.store.size === 0, { what: "spool empty", timeoutMs: 30_000 });
      const copies = async (user: string) =>
        (await postfix.messages(user)).filter((m) => m.includes(`Subject: ${tag}`)).length;
      // Postfix's 250 means queued: local delivery to the Maildir follows.
      await waitFor(async () => (await copies("bob")) >= 1 && (await copies("alice")) >= 1, {
        what: "alice's and bob's copies",
      });
      expect(await copies("alice")).toBe(1);
      expect(await copies("bob")).toBe(1);
      expect(senders.messagesTo("someone@sender.test")).toHaveLength(dsnsBefore + 1);
      await postfix.postconf(["-e", "smtpd_recipient_restrictions="]);
    });

    it("carries the sender's DSN parameters: Postfix's success notice and the edge's failure DSN quote ENVID and ORCPT", async () => {
      const { edge, comeBack } = await homeAway(["alice", "ghost"], "dsn-params-home");

      const tag = Date.now().toString(36);
      const { client } = await smtpConnect(edge.smtpPort);
      expect(await client.command("EHLO client.example")).toMatch(/^250[ -]DSN$/m);
      // bob@ (a local user of Postfix) asks for a success notice; ghost@ is unknown to Postfix.
      const messages = [
        {
          mail: `MAIL FROM:<bob@${postfix.domain}> RET=HDRS ENVID=ok-${tag}`,
          rcpt: `RCPT TO:<alice@${postfix.domain}> NOTIFY=SUCCESS ORCPT=rfc822;first.alice@${postfix.domain}`,
          subject: `dsn success ${tag}`,
        },
        {
          mail: `MAIL FROM:<params@sender.test> ENVID=fail-${tag}`,
          rcpt: `RCPT TO:<ghost@${postfix.domain}> NOTIFY=FAILURE ORCPT=rfc822;old.ghost@${postfix.domain}`,
          subject: `dsn failure ${tag}`,
        },
      ];
      for (const m of messages) {
        expect(await client.command(m.mail)).toMatch(/^250/);
        expect(await client.command(m.rcpt)).toMatch(/^250/);
        expect(await client.command("DATA")).toMatch(/^354/);
        expect(await client.command(`Subject: ${m.subject}\r\n\r\nhello\r\n.`)).toMatch(/^250 .*backup MX/);
      }
      client.close();
      await spooledAndChecked(edge, 2);

      await comeBack();
      await waitFor(() => edge.agent.spool.store.size === 0, { what: "spool empty", timeoutMs: 30_000 });
      // Postfix delivered to alice@ and, as NOTIFY=SUCCESS asked, told bob@ with ENVID and ORCPT.
      const notice = await waitFor(
        async () =>
          (await postfix.messages("bob")).find((m) => m.includes(`Original-Envelope-Id: ok-${tag}`)),
        { what: "Postfix's success notice to bob@", timeoutMs: 30_000 },
      );
      expect(notice).toMatch(/Action: delivered/);
      expect(notice).toMatch(
        new RegExp(`Original-Recipient: rfc822; ?first\\.alice@${postfix.domain.replace(/\./g, "\\.")}`),
      );
      // The edge's own DSN for ghost@ quotes them as well.
      const dsn = await waitFor(() => senders.messagesTo("params@sender.test")[0], {
        what: "the edge's DSN for ghost@",
        timeoutMs: 30_000,
      });
      const text = dsn.data.toString("utf8");
      expect(text).toMatch(new RegExp(`^Original-Envelope-Id: fail-${tag}\r?$`, "m"));
      expect(text).toMatch(/^Original-Recipient: rfc822;old\.ghost@/m);
      expect(text).toMatch(/Status: 5\.1\.1/);
    });
  },
);
