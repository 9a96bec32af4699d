import { randomBytes } from "node:crypto";
import { once } from "node:events";
import { describe, expect, it } from "vitest";
import { CryptoError, ProtocolError } from "../src/errors.js";
import { GcPacer } from "../src/gc-pacer.js";
import { type CipherState, generateKeyPair, HandshakeState } from "../src/noise.js";
import { MAX_SECURE_PLAINTEXT, SecureChannel } from "../src/secure-channel.js";
import {
  CLOSE_GOING_AWAY,
  CLOSE_NORMAL,
  CLOSE_PROTOCOL_ERROR,
  createMemoryTransportPair,
  type MemoryTransport,
} from "../src/transport.js";

type Ciphers = { send: CipherState; receive: CipherState };

function handshake(): { home: Ciphers; edge: Ciphers } {
  const edgeKeys = generateKeyPair();
  const prologue = Buffer.from("mxtunnel/1 tunnel");
  const home = new HandshakeState({
    pattern: "IK",
    initiator: true,
    prologue,
    staticKeyPair: generateKeyPair(),
    remoteStaticPublicKey: edgeKeys.publicKey,
  });
  const edge = new HandshakeState({ pattern: "IK", initiator: false, prologue, staticKeyPair: edgeKeys });
  edge.readMessage(home.writeMessage(new Uint8Array(0)));
  home.readMessage(edge.writeMessage(new Uint8Array(0)));
  return { home: home.split(), edge: edge.split() };
}

interface Setup {
  homeInner: MemoryTransport;
  edgeInner: MemoryTransport;
  homeCiphers: Ciphers;
  edgeCiphers: Ciphers;
  home: SecureChannel;
  edge: SecureChannel;
  /** Plaintexts the edge channel delivered. */
  atEdge: string[];
  /** Raw ciphertexts the edge's inner transport received. */
  wireAtEdge: Uint8Array[];
}

function setup(options: { homeRekeyAfter?: number; edgeRekeyAfter?: number } = {}): Setup {
  const [homeInner, edgeInner] = createMemoryTransportPair();
  const { home: homeCiphers, edge: edgeCiphers } = handshake();
  const wireAtEdge: Uint8Array[] = [];
  edgeInner.on("message", (message) => wireAtEdge.push(message));
  const home = new SecureChannel(
    homeInner,
    homeCiphers,
    options.homeRekeyAfter ? { rekeyAfter: options.homeRekeyAfter } : {},
  );
  const edge = new SecureChannel(
    edgeInner,
    edgeCiphers,
    options.edgeRekeyAfter ? { rekeyAfter: options.edgeRekeyAfter } : {},
  );
  const atEdge: string[] = [];
  edge.on("message", (message) => atEdge.push(Buffer.from(message).toString()));
  return { homeInner, edgeInner, homeCiphers, edgeCiphers, home, edge, atEdge, wireAtEdge };
}

async function nextMessage(channel: SecureChannel): Promise<string> {
  const [message] = (await once(channel, "message")) as [Uint8Array];
  return Buffer.from(message).toString();
}

describe("SecureChannel", () => {
  it("round-trips messages both ways, encrypted on the wire, and counts them", async () => {
    const { home, edge, atEdge, wireAtEdge } = setup();
    home.send(Buffer.from("one"));
    home.send(Buffer.from("two"));
    expect(await nextMessage(edge)).toBe("one");
    expect(await nextMessage(edge)).toBe("two");
    expect(atEdge).toEqual(["one", "two"]);
    expect(wireAtEdge.map((message) => message.byteLength)).toEqual([3 + 16, 3 + 16]);
    expect(Buffer.from(wireAtEdge[0]!).includes("one")).toBe(false);

    edge.send(Buffer.from("three"));
    expect(await nextMessage(home)).toBe("three");
    expect([home.messagesSent, home.messagesReceived, edge.messagesSent, edge.messagesReceived]).toEqual([
      2, 1, 1, 2,
    ]);
  });

  it("sendParts carries the joined parts as one message and shares the size limit", async () => {
    const { home, edge, wireAtEdge } = setup();
    home.sendParts([Buffer.from("head:"), Buffer.from("body")]);
    expect(await nextMessage(edge)).toBe("head:body");
    expect(wireAtEdge).toHaveLength(1);
    expect(() => home.sendParts([new Uint8Array(MAX_SECURE_PLAINTEXT), new Uint8Array(1)])).toThrow(
      ProtocolError,
    );
    expect(home.messagesSent).toBe(1);
  });

  it("a tampered message closes the channel, wipes both ciphers and delivers nothing more", async () => {
    const { homeInner, edgeInner, homeCiphers, edgeCiphers, edge, atEdge } = setup();
    const other = setup();

    const genuine = homeCiphers.send.encrypt(Buffer.from("hello"));
    const tampered = Buffer.from(genuine);
    tampered[1]! ^= 0x80;
    const closed = once(edge, "close");
    homeInner.send(tampered);
    expect(await closed).toEqual([CLOSE_PROTOCOL_ERROR, "decrypt failed"]);
    expect(edge.closed).toBe(true);
    expect(edgeInner.closed).toBe(true);
    expect(() => edgeCiphers.send.encrypt(Buffer.from("x"))).toThrow(CryptoError);
    expect(() => edgeCiphers.receive.decrypt(new Uint8Array(32))).toThrow(CryptoError);

    // The untampered original, pushed straight into the inner transport, is not delivered: no resync.
    edgeInner.emit("message", genuine);
    edge.send(Buffer.from("ignored after close"));
    expect(atEdge).toEqual([]);

    // An unrelated tunnel carries on.
    other.home.send(Buffer.from("still here"));
    expect(await nextMessage(other.edge)).toBe("still here");
    expect(other.edge.closed).toBe(false);
  });

  it("a replayed message fails and closes the channel", async () => {
    const { homeInner, home, edge, atEdge, wireAtEdge } = setup();
    home.send(Buffer.from("pay 10"));
    expect(await nextMessage(edge)).toBe("pay 10");
    const closed = once(edge, "close");
    homeInner.send(wireAtEdge[0]!);
    expect(await closed).toEqual([CLOSE_PROTOCOL_ERROR, "decrypt failed"]);
    expect(atEdge).toEqual(["pay 10"]);
  });

  it("a truncated message (shorter than a tag) fails like any other", async () => {
    const { homeInner, edge } = setup();
    const closed = once(edge, "close");
    homeInner.send(randomBytes(10));
    expect(await closed).toEqual([CLOSE_PROTOCOL_ERROR, "decrypt failed"]);
  });

  it("refuses a plaintext over 65519 bytes and carries one of exactly 65519", async () => {
    const { home, edge, wireAtEdge } = setup();
    let error: unknown;
    try {
      home.send(new Uint8Array(MAX_SECURE_PLAINTEXT + 1));
    } catch (caught) {
      error = caught;
    }
    expect(error).toBeInstanceOf(ProtocolError);
    expect((error as ProtocolError).code).toBe("FRAME_TOO_LARGE");
    expect(home.messagesSent).toBe(0);
    expect(home.closed).toBe(false);

    home.send(new Uint8Array(65519).fill(7));
    const [message] = (await once(edge, "message")) as [Uint8Array];
    expect(message.byteLength).toBe(65519);
    expect(wireAtEdge[0]!.byteLength).toBe(65535);
  });

  it("closes with going-away 'rekey' when the send counter reaches rekeyAfter", async () => {
    const { home, edge } = setup({ homeRekeyAfter: 3 });
    home.send(Buffer.from("a"));
    home.send(Buffer.from("b"));
    expect(home.closed).toBe(false);
    const closed = once(home, "close");
    const peerClosed = once(edge, "close");
    home.send(Buffer.from("c"));
    expect(home.closed).toBe(true);
    expect(await closed).toEqual([CLOSE_GOING_AWAY, "rekey"]);
    expect(await peerClosed).toEqual([CLOSE_GOING_AWAY, "rekey"]);
    expect(home.messagesSent).toBe(3);
  });

  it("closes with going-away 'rekey' when the receive counter reaches rekeyAfter", async () => {
    const { home, edge, atEdge } = setup({ edgeRekeyAfter: 2 });
    home.send(Buffer.from("a"));
    expect(await nextMessage(edge)).toBe("a");
    const closed = once(edge, "close");
    home.send(Buffer.from("b"));
    expect(await closed).toEqual([CLOSE_GOING_AWAY, "rekey"]);
    expect(atEdge).toEqual(["a", "b"]);
  });

  it("passes close, closed, bufferedAmount and drain through", async () => {
    const { homeInner, home, edge } = setup();
    homeInner.pause();
    for (let i = 0; i < 5; i++) home.send(new Uint8Array(MAX_SECURE_PLAINTEXT));
    expect(home.bufferedAmount).toBe(homeInner.bufferedAmount);
    expect(home.bufferedAmount).toBe(5 * 65535);
    const drained = once(home, "drain");
    homeInner.resume();
    await drained;
    expect(home.bufferedAmount).toBeLessThanOrEqual(256 * 1024);
    expect(home.bufferedAmount).toBe(homeInner.bufferedAmount);

    const homeClosed = once(home, "close");
    const edgeClosed = once(edge, "close");
    edge.close(CLOSE_NORMAL, "bye");
    expect(edge.closed).toBe(true);
    expect(await edgeClosed).toEqual([CLOSE_NORMAL, "bye"]);
    expect(await homeClosed).toEqual([CLOSE_NORMAL, "bye"]);
    expect(home.closed).toBe(true);
  });

  it("prefers the inner transport's message size less the tag, and nothing when the inner has none", () => {
    const { homeInner, home } = setup();
    expect(home.preferredMessageSize).toBeUndefined();
    Object.defineProperty(homeInner, "preferredMessageSize", { value: 65_532, configurable: true });
    expect(home.preferredMessageSize).toBe(65_516);
    // Never above what one Noise message carries.
    Object.defineProperty(homeInner, "preferredMessageSize", { value: 70_000 });
    expect(home.preferredMessageSize).toBe(MAX_SECURE_PLAINTEXT);
  });

  it("tells its GC pacer the size of every message it sends and receives, tag included", async () => {
    const [homeInner, edgeInner] = createMemoryTransportPair();
    const { home: homeCiphers, edge: edgeCiphers } = handshake();
    const collected = { home: 0, edge: 0 };
    const budget = 3 * (100 + 16);
    const home = new SecureChannel(homeInner, homeCiphers, {
      gcPacer: new GcPacer(budget, () => collected.home++),
    });
    const edge = new SecureChannel(edgeInner, edgeCiphers, {
      gcPacer: new GcPacer(budget, () => collected.edge++),
    });
    let arrived = 0;
    edge.on("message", () => arrived++);
    const sendAndSettle = async (count: number) => {
      const target = arrived + count;
      for (let i = 0; i < count; i++) home.sendParts([new Uint8Array(40), new Uint8Array(60)]);
      while (arrived < target) await new Promise((resolve) => setImmediate(resolve));
      await new Promise((resolve) => setImmediate(resolve));
    };
    await sendAndSettle(2);
    expect(collected).toEqual({ home: 0, edge: 0 });
    await sendAndSettle(1);
    expect(collected).toEqual({ home: 1, edge: 1 });
    // A message the channel refuses (over the limit) or drops (closed) is not traffic.
    expect(() => home.send(new Uint8Array(MAX_SECURE_PLAINTEXT + 1))).toThrow(ProtocolError);
    home.close();
    home.send(new Uint8Array(10_000));
    await new Promise((resolve) => setImmediate(resolve));
    expect(collected).toEqual({ home: 1, edge: 1 });
  });

  it("emits close exactly once", async () => {
    const { home } = setup();
    let closes = 0;
    home.on("close", () => closes++);
    home.close();
    home.close(CLOSE_PROTOCOL_ERROR, "again");
    await once(home, "close");
    await new Promise((resolve) => setImmediate(resolve));
    expect(closes).toBe(1);
  });
});
