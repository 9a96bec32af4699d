// Spool-mode tests: the senders' side (their SPF records and the server their DSNs reach) and an edge
// holding mail for a home that has synced its recipients and gone away.

import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Mailbox, type ReceivedMessage, startMailbox } from "../../demo/src/mailbox.js";
import { waitFor } from "../e2e/lab/wait.js";
import { makeEdge, makeHome, startTestHome, type TestEdge, type TestHome, tempDir } from "./agents.js";
import { startDnsServer, type TestDnsServer } from "./dns-server.js";

export interface Senders {
  dns: TestDnsServer;
  /** The senders' mail server, where the edge's DSNs arrive. */
  remote: Mailbox;
  /** What `remote` received for `address` so far. */
  messagesTo(address: string): ReceivedMessage[];
  stop(): Promise<void>;
}

/** sender.test's SPF passes 127.0.0.2 (where tests send from), forged.test's fails it. */
export async function startSenders(): Promise<Senders> {
  const dns = await startDnsServer({
    "sender.test": { txt: ["v=spf1 ip4:127.0.0.2 -all"] },
    "forged.test": { txt: ["v=spf1 ip4:192.0.2.1 -all"] },
  });
  const remote = await startMailbox({ proxy: false });
  return {
    dns,
    remote,
    messagesTo: (address) => remote.messages.filter((m) => m.to.includes(address)),
    stop: async () => {
      await remote.close();
      await dns.stop();
    },
  };
}

export interface HomeAway {
  edge: TestEdge;
  /** Starts the same home again (same keys and overrides): the edge drains its spool to it. */
  comeBack(): Promise<TestHome>;
}

/**
 * An edge (using the senders' DNS, mail for sender.test and forged.test routed to their server) paired
 * with a home that has synced `recipients` and then stopped, so the edge spools what it accepts.
 */
export async function edgeWithHomeAway(
  senders: Senders,
  options: {
    recipients: string[];
    /** Home's config overrides (where its mail server listens). */
    home: Record<string, unknown>;
    homeName: string;
    /** ms; the edge's default when absent. */
    retryMax?: number;
  },
): Promise<HomeAway> {
  const recipientsFile = join(await tempDir("rcpt"), "list");
  await writeFile(recipientsFile, options.recipients.map((r) => `${r}\n`).join(""));
  const route = `127.0.0.1:${senders.remote.port}`;
  const edge = await makeEdge({
    overrides: {
      dnsServers: [senders.dns.address],
      transports: { "sender.test": route, "forged.test": route },
      "spool.retryMin": 100,
      ...(options.retryMax === undefined ? {} : { "spool.retryMax": options.retryMax }),
    },
  });
  const overrides = { ...options.home, "recipients.file": recipientsFile };
  const home = await makeHome(await edge.token(), overrides, options.homeName);
  await waitFor(() => edge.agent.status().homes[0]?.recipients ?? false, { what: "recipient sync" });
  await home.stop();
  await waitFor(() => !edge.agent.status().homes[0]!.connected, { what: "home gone" });
  return { edge, comeBack: () => startTestHome(home.dir, overrides) };
}

/** Waits until the edge's spool holds `count` messages, each with its sender checks stored. */
export function spooledAndChecked(edge: TestEdge, count: number) {
  return waitFor(
    () => {
      const list = edge.agent.spool.store.list();
      return list.length === count && list.every((e) => e.auth) ? list : undefined;
    },
    { what: "sender checks stored" },
  );
}
