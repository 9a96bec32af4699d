import net from "node:net";
import { SMTPServer } from "smtp-server";
import { afterEach, describe, expect, it, vi } from "vitest";
import { closeAllClients, type SmtpClient, smtpOver } from "../../../test/helpers/smtp-client.js";
import { greetWithoutDelay } from "../src/smtp-greeting.js";

const servers: { close(callback: () => void): void }[] = [];

afterEach(async () => {
  vi.useRealTimers();
  closeAllClients();
  await Promise.all(servers.splice(0).map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
});

function smtpServer(extra: Record<string, unknown> = {}): SMTPServer {
  const server = new SMTPServer({
    name: "greeting.test",
    disabledCommands: ["AUTH", "STARTTLS"],
    authOptional: true,
    disableReverseLookup: true,
    closeTimeout: 10,
    logger: false,
    // Synchronous, like the edge's spool server: no event-loop turn hidden in the default handler.
    onConnect: (_session: unknown, callback: () => void) => callback(),
    ...extra,
  });
  server.on("error", () => {});
  servers.push(server);
  return server;
}

async function listen(server: SMTPServer): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return (server.server.address() as net.AddressInfo).port;
}

function connect(port: number): SmtpClient {
  return smtpOver(net.connect({ host: "127.0.0.1", port }));
}

function count220(client: SmtpClient): number {
  return client.text().match(/^220 /gm)?.length ?? 0;
}

describe("greetWithoutDelay", () => {
  it("greets without smtp-server's 100 ms timer, exactly once (pins the smtp-server internals it uses)", async () => {
    const server = smtpServer();
    // If an smtp-server upgrade renames connect(), connections or connectionReady(), this is false or
    // the greeting below never comes (the stock timer is frozen): either way this test fails.
    expect(greetWithoutDelay(server)).toBe(true);
    const port = await listen(server);
    vi.useFakeTimers({ toFake: ["setTimeout", "clearTimeout"] });
    const client = connect(port);
    expect(await client.reply()).toMatch(/^220 greeting\.test ESMTP/);
    // Now the stock timer fires: its connectionReady() call must not greet a second time.
    vi.advanceTimersByTime(200);
    vi.useRealTimers();
    expect(await client.command("NOOP")).toMatch(/^250 /);
    expect(await client.command("QUIT")).toMatch(/^221 /);
    await client.waitClosed();
    expect(count220(client)).toBe(1);
  });

  it("still refuses a client that talked before the greeting (421 You talk too soon)", async () => {
    const server = smtpServer();
    expect(greetWithoutDelay(server)).toBe(true);
    // Hand connections over the way the edge does (paused on accept, after a decision), once the
    // client's first bytes are already in the socket's receive queue but not yet read by Node.
    let wrote: () => void = () => {};
    const clientWrote = new Promise<void>((resolve) => {
      wrote = resolve;
    });
    const front = net.createServer({ pauseOnConnect: true }, (socket) => {
      void clientWrote.then(() => server.connect(socket, {} as never));
    });
    servers.push(front);
    await new Promise<void>((resolve) => front.listen(0, "127.0.0.1", resolve));
    const socket = net.connect({ host: "127.0.0.1", port: (front.address() as net.AddressInfo).port });
    const client = smtpOver(socket);
    await new Promise<void>((resolve) => socket.once("connect", resolve));
    socket.write("EHLO early.test\r\n", () => wrote());
    expect(await client.reply()).toMatch(/^421 .*You talk too soon/);
    await client.waitClosed();
    expect(count220(client)).toBe(0);
  });

  it("sends no greeting after a maxClients refusal", async () => {
    const server = smtpServer({ maxClients: 1 });
    expect(greetWithoutDelay(server)).toBe(true);
    const port = await listen(server);
    const first = connect(port);
    expect(await first.reply()).toMatch(/^220 /);
    const second = connect(port);
    expect(await second.reply()).toMatch(/^421 .*Too many connected clients/);
    await second.waitClosed();
    expect(count220(second)).toBe(0);
  });

  it("leaves servers without the expected internals alone", () => {
    expect(greetWithoutDelay({})).toBe(false);
    expect(greetWithoutDelay({ connect: () => {}, connections: [] })).toBe(false);
    // A connection without connectionReady(): connect() still works, nothing is scheduled.
    const created: object[] = [];
    const fake = {
      connections: new Set<object>(),
      connect(this: { connections: Set<object> }) {
        const connection = { needsUpgrade: false, _closing: false, _closed: false };
        this.connections.add(connection);
        created.push(connection);
      },
    };
    expect(greetWithoutDelay(fake)).toBe(true);
    fake.connect();
    expect(created).toHaveLength(1);
    expect(fake.connections.has(created[0] as object)).toBe(true);
    expect(Object.hasOwn(fake.connections, "add")).toBe(false);
  });
});
