// The demo's mailbox (`npm start`, and the stand-in for Postfix in the fault tests) outlives clients
// that reset their connection mid-session, as home does when the tunnel is cut mid-message.
import type net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { type Mailbox, startMailbox } from "../../demo/src/mailbox.js";
import { smtpConnect } from "../helpers/smtp-client.js";

let box: Mailbox | undefined;
afterEach(async () => {
  await box?.close();
  box = undefined;
});

describe("demo mailbox", () => {
  it("a client resetting inside a transaction is not an uncaught error, and the next client is served", async () => {
    const uncaught: unknown[] = [];
    const onUncaught = (error: unknown) => uncaught.push(error);
    process.on("uncaughtException", onUncaught);
    try {
      box = await startMailbox({ proxy: false });
      for (let i = 0; i < 5; i++) {
        const { client, banner } = await smtpConnect(box.port);
        expect(banner).toMatch(/^220 /);
        expect(await client.command("EHLO reset.test")).toMatch(/^250 /m);
        expect(await client.command("MAIL FROM:<a@reset.test>")).toMatch(/^250 /);
        // A reset reaching the mailbox while it waits mid-transaction: it reads ECONNRESET, which
        // smtp-server passes on to the server object.
        (client.socket as net.Socket).resetAndDestroy();
        await client.waitClosed();
      }
      const { client } = await smtpConnect(box.port);
      expect(await client.command("EHLO after.test")).toMatch(/^250 /m);
      expect(await client.command("QUIT")).toMatch(/^221 /);
      client.close();
      expect(box.messages).toHaveLength(0);
    } finally {
      process.off("uncaughtException", onUncaught);
    }
    expect(uncaught).toEqual([]);
  });
});
