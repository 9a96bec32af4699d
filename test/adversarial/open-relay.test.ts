// Open-relay probes, the way spammers have tried them for thirty years: every classic address trick,
// each with a foreign final destination, against the edge in both inbound modes (spool: the edge's own
// smtp-server; live: spliced to a real Postfix) and against home's outbound relay listener (where the
// trick is on the sender, since any recipient is fair game outbound). Goal: zero accepted.
import { randomBytes } from "node:crypto";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import type { PostfixLab } from "../e2e/lab/postfix.js";
import { requireTools } from "../e2e/lab/require-tools.js";
import { cleanupAgents, type TestEdge } from "../helpers/agents.js";
import {
  closeAllClients,
  liveLab,
  relayLab,
  type SpoolLab,
  smtpConnect,
  spoolLab,
  Tally,
} from "./support.js";

const tally = new Tally("open-relay");
afterAll(() => tally.flush());

const FOREIGN = "elsewhere.example";

/** RCPT TO arguments (verbatim, after the colon) whose final destination is FOREIGN, for our domain D. */
function recipientProbes(D: string): string[] {
  return [
    `<victim@${FOREIGN}>`,
    `victim@${FOREIGN}`,
    // % hack
    `<alice%${FOREIGN}@${D}>`,
    `<alice%${FOREIGN}>`,
    `<"alice%${FOREIGN}"@${D}>`,
    `<alice%ELSEWHERE.Example@${D.toUpperCase()}>`,
    // quoted local parts holding an @
    `<"alice@${FOREIGN}"@${D}>`,
    `<"alice@${FOREIGN}">`,
    `<"alice@${D}"@${FOREIGN}>`,
    `<alice\\@${FOREIGN}@${D}>`,
    // source routes
    `<@${D}:alice@${FOREIGN}>`,
    `<@${D},@mx.${D}:alice@${FOREIGN}>`,
    `<@mx.${FOREIGN}:alice@${FOREIGN}>`,
    // bang paths
    `<${FOREIGN}!alice@${D}>`,
    `<${FOREIGN}!alice>`,
    `<${D}!${FOREIGN}!alice>`,
    // @ inside the local part
    `<alice@${FOREIGN}@${D}>`,
    `<alice@${D}@${FOREIGN}>`,
    // IP and domain literals
    "<alice@[192.0.2.1]>",
    "<alice@[1.2.3.4]>",
    "<alice@[IPv6:2001:db8::1]>",
    `<alice%[192.0.2.1]@${D}>`,
    "<postmaster@[192.0.2.1]>",
    // trailing dots and case
    `<alice@${FOREIGN}.>`,
    `<alice@${D}.${FOREIGN}>`,
    `<alice@${FOREIGN.toUpperCase()}>`,
    `<Alice@ElseWhere.Example.>`,
    `<postmaster@${FOREIGN}>`,
    // parameter injection after the closing bracket
    `<victim@${FOREIGN}> <alice@${D}>`,
    `<victim@${FOREIGN}>alice@${D}`,
    `<victim@${FOREIGN}> ORCPT=rfc822;alice@${D}`,
    `<victim@${FOREIGN}> NOTIFY=NEVER`,
    `<victim@${FOREIGN}> TO:<alice@${D}>`,
    `<alice@${D}>@${FOREIGN}`,
    `<victim@${FOREIGN}>\t<alice@${D}>`,
    `<alice@${FOREIGN}%${D}>`,
  ];
}

/** One session per probe (Postfix slows down and hangs up after repeated errors in one session). */
async function probeRecipients(
  port: number,
  probes: string[],
): Promise<{ tried: number; accepted: { probe: string; reply: string }[] }> {
  const accepted: { probe: string; reply: string }[] = [];
  for (const probe of probes) {
    const { client, banner } = await smtpConnect(port, "127.0.0.2");
    expect(banner).toMatch(/^220 /);
    expect(await client.command("EHLO prober.example.net")).toMatch(/^250[ -]/);
    expect(await client.command("MAIL FROM:<spammer@example.net>")).toMatch(/^250 /);
    const reply = (await client.command(`RCPT TO:${probe}`)) ?? "(closed)";
    if (/^2/.test(reply)) accepted.push({ probe, reply });
    expect(reply, probe).toMatch(/^[45]\d\d /);
    // A polite goodbye: the server closes, so per-IP connection slots free up at once.
    if (!client.closed()) await client.command("QUIT");
    client.close();
  }
  return { tried: probes.length, accepted };
}

afterEach(() => closeAllClients());

describe("open relay: the edge in spool mode (backup MX)", () => {
  let lab: SpoolLab;

  beforeAll(async () => {
    lab = await spoolLab({ "spool.messagesPerIpPerMinute": 100_000 });
  }, 60_000);
  afterAll(cleanupAgents);

  it("refuses every address trick with a foreign final destination, and spools nothing", async () => {
    // Positive control: the same session shape with a real local recipient is accepted.
    const { client } = await smtpConnect(lab.edge.smtpPort);
    await client.command("EHLO control.example");
    await client.command("MAIL FROM:<someone@example.net>");
    expect(await client.command("RCPT TO:<alice@home.test>")).toMatch(/^250 /);
    await client.command("QUIT");
    client.close();

    const probes = recipientProbes("home.test");
    const result = await probeRecipients(lab.edge.smtpPort, probes);
    tally.add("open relay: spool mode (edge smtp-server)", {
      tried: result.tried,
      accepted: result.accepted.length,
    });
    expect(result.accepted).toEqual([]);
    expect(lab.edge.agent.spool.store.size).toBe(0);
  }, 60_000);
});

describe("open relay: home's outbound relay listener", () => {
  let edge: TestEdge;
  let relayPort: number;

  beforeAll(async () => {
    ({ edge, relayPort } = await relayLab());
  }, 60_000);
  afterAll(cleanupAgents);

  /** Sender tricks: the envelope sender must be one of the home's domains (home.test). */
  const senderProbes = [
    `<ceo@${FOREIGN}>`,
    `<"ceo@home.test"@${FOREIGN}>`,
    `<ceo%home.test@${FOREIGN}>`,
    `<@home.test:ceo@${FOREIGN}>`,
    `<home.test!ceo@${FOREIGN}>`,
    `<ceo@home.test@${FOREIGN}>`,
    "<ceo@[127.0.0.1]>",
    "<ceo@[192.0.2.1]>",
    `<ceo@${FOREIGN}.>`,
    `<ceo@home.test.${FOREIGN}>`,
    "<ceo@evilhome.test>",
    "<ceo@home.test.>",
    `<ceo@HOME.TEST.${FOREIGN.toUpperCase()}>`,
    `<ceo@${FOREIGN}> <ceo@home.test>`,
    `<ceo@${FOREIGN}> ENVID=ceo@home.test`,
  ];

  /** Header From tricks with a good envelope sender. */
  const headerProbes = [
    `From: <ceo@${FOREIGN}>`,
    `From: "ceo@home.test" <ceo@${FOREIGN}>`,
    `From: ceo@home.test, ceo@${FOREIGN}`,
    `From: ceo@home.test\r\nFrom: ceo@${FOREIGN}`,
    `From:\r\n <ceo@${FOREIGN}>`,
    `FROM: ceo@${FOREIGN}`,
    `From: ceo@${FOREIGN} (ceo@home.test)`,
    `From: =?utf-8?q?ceo=40home=2Etest?= <ceo@${FOREIGN}>`,
    `From: ceo@home.test.${FOREIGN}`,
    "Sender: ceo@home.test",
  ];

  it("refuses senders outside the home's domains, however written, and From headers likewise", async () => {
    const accepted: string[] = [];
    // Positive control: a sender of the home's domain reaches RCPT.
    {
      const { client } = await smtpConnect(relayPort, "127.0.0.1");
      await client.command("EHLO postfix.home.test");
      expect(await client.command("MAIL FROM:<user@home.test>")).toMatch(/^250 /);
      client.close();
    }
    for (const probe of senderProbes) {
      const { client } = await smtpConnect(relayPort, "127.0.0.1");
      await client.command("EHLO postfix.home.test");
      const reply = (await client.command(`MAIL FROM:${probe}`)) ?? "(closed)";
      if (/^2/.test(reply)) {
        // Not refused at MAIL: finish the transaction and see whether anything is queued.
        await client.command(`RCPT TO:<friend@${FOREIGN}>`);
        const data = await client.command("DATA");
        if (data?.startsWith("354")) {
          client.send(`From: ceo@home.test\r\nSubject: probe\r\n\r\nprobe\r\n.\r\n`);
          const final = (await client.reply()) ?? "";
          if (/^2/.test(final)) accepted.push(`MAIL FROM:${probe} → ${final.trim()}`);
        }
      }
      client.close();
    }
    for (const header of headerProbes) {
      const { client } = await smtpConnect(relayPort, "127.0.0.1");
      await client.command("EHLO postfix.home.test");
      expect(await client.command("MAIL FROM:<user@home.test>")).toMatch(/^250 /);
      expect(await client.command(`RCPT TO:<friend@${FOREIGN}>`)).toMatch(/^250 /);
      expect(await client.command("DATA")).toMatch(/^354 /);
      client.send(`${header}\r\nSubject: probe ${randomBytes(4).toString("hex")}\r\n\r\nprobe\r\n.\r\n`);
      const final = (await client.reply()) ?? "(closed)";
      if (/^2/.test(final)) accepted.push(`${JSON.stringify(header)} → ${final.trim()}`);
      client.close();
    }
    tally.add("open relay: home relay listener (sender / header From)", {
      tried: senderProbes.length + headerProbes.length,
      accepted: accepted.length,
    });
    expect(accepted).toEqual([]);
    expect(edge.agent.outbound.entriesList()).toEqual([]);
  }, 60_000);
});

const ready = requireTools(["postfix", "postconf"], "adversarial open-relay (live) suite");

describe.skipIf(!ready)("open relay: the edge in live mode, spliced to a real Postfix", () => {
  let postfix: PostfixLab;
  let edge: TestEdge;

  beforeAll(async () => {
    ({ postfix, edge } = await liveLab());
  }, 120_000);
  afterAll(cleanupAgents);

  it("Postfix behind the tunnel refuses every trick (the PROXY header keeps the client untrusted)", async () => {
    // Positive control: a local recipient is accepted live (Postfix's banner, not the backup MX).
    const { client, banner } = await smtpConnect(edge.smtpPort);
    expect(banner).toMatch(/mxtunnel lab/);
    await client.command("EHLO control.example");
    await client.command("MAIL FROM:<someone@example.net>");
    expect(await client.command(`RCPT TO:<alice@${postfix.domain}>`)).toMatch(/^250 /);
    client.close();

    const result = await probeRecipients(edge.smtpPort, recipientProbes(postfix.domain));
    tally.add("open relay: live mode (Postfix through the tunnel)", {
      tried: result.tried,
      accepted: result.accepted.length,
    });
    expect(result.accepted).toEqual([]);
    expect(edge.agent.status().sessions.fallbacks).toBe(0);
  }, 90_000);
});
