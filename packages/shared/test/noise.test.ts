import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import nacl from "tweetnacl";
import { describe, expect, it } from "vitest";
import { CryptoError, HandshakeError } from "../src/errors.js";
import {
  CipherState,
  generateKeyPair,
  type HandshakePattern,
  HandshakeState,
  type KeyPair,
  keyPairFromPrivateKey,
  REKEY_AFTER_MESSAGES,
  x25519,
} from "../src/noise.js";

interface Vector {
  protocol_name: string;
  init_prologue: string;
  init_psks?: string[];
  init_static: string;
  init_ephemeral: string;
  init_remote_static: string;
  resp_prologue: string;
  resp_psks?: string[];
  resp_static: string;
  resp_ephemeral: string;
  handshake_hash?: string;
  messages: { payload: string; ciphertext: string }[];
  _source: string;
}

const fixtures = JSON.parse(
  readFileSync(new URL("./fixtures/noise-vectors.json", import.meta.url), "utf8"),
) as { vectors: Vector[] };

const hex = (bytes: Uint8Array): string => Buffer.from(bytes).toString("hex");
const unhex = (text: string): Uint8Array => Buffer.from(text, "hex");

const ZERO_POINT = new Uint8Array(32);
const ORDER_8_POINT = unhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800");
const PROLOGUE = Buffer.from("mxtunnel/1 tunnel");

function patternOf(vector: Vector): HandshakePattern {
  return vector.protocol_name === "Noise_IKpsk2_25519_ChaChaPoly_SHA256" ? "IKpsk2" : "IK";
}

function pair(pattern: HandshakePattern, options: { psk?: Uint8Array; responderPsk?: Uint8Array } = {}) {
  const initiatorKeys = generateKeyPair();
  const responderKeys = generateKeyPair();
  const initiator = new HandshakeState({
    pattern,
    initiator: true,
    prologue: PROLOGUE,
    staticKeyPair: initiatorKeys,
    remoteStaticPublicKey: responderKeys.publicKey,
    ...(options.psk ? { psk: options.psk } : {}),
  });
  const responder = new HandshakeState({
    pattern,
    initiator: false,
    prologue: PROLOGUE,
    staticKeyPair: responderKeys,
    ...(options.responderPsk ? { psk: options.responderPsk } : {}),
  });
  return { initiator, responder, initiatorKeys, responderKeys };
}

function catchError(run: () => unknown): unknown {
  try {
    run();
  } catch (error) {
    return error;
  }
  throw new Error("expected an exception");
}

describe("published vectors", () => {
  it("holds every IK and IKpsk2 vector, from both cacophony and snow", () => {
    const names = fixtures.vectors.map((vector) => `${vector.protocol_name} ${vector._source}`);
    expect(names).toEqual([
      "Noise_IK_25519_ChaChaPoly_SHA256 mcginty/snow tests/vectors/cacophony.txt",
      "Noise_IKpsk2_25519_ChaChaPoly_SHA256 mcginty/snow tests/vectors/cacophony.txt",
      "Noise_IK_25519_ChaChaPoly_SHA256 mcginty/snow tests/vectors/snow.txt",
    ]);
  });

  for (const vector of fixtures.vectors) {
    it(`reproduces ${vector.protocol_name} (${vector._source}): every message, both directions`, () => {
      const pattern = patternOf(vector);
      const initiatorPsk = vector.init_psks?.[0];
      const responderPsk = vector.resp_psks?.[0];
      const initiatorStatic = keyPairFromPrivateKey(unhex(vector.init_static));
      const responderStatic = keyPairFromPrivateKey(unhex(vector.resp_static));
      expect(hex(responderStatic.publicKey)).toBe(vector.init_remote_static);

      const initiator = new HandshakeState({
        pattern,
        initiator: true,
        prologue: unhex(vector.init_prologue),
        staticKeyPair: initiatorStatic,
        remoteStaticPublicKey: unhex(vector.init_remote_static),
        ephemeralKeyPair: keyPairFromPrivateKey(unhex(vector.init_ephemeral)),
        ...(initiatorPsk ? { psk: unhex(initiatorPsk) } : {}),
      });
      const responder = new HandshakeState({
        pattern,
        initiator: false,
        prologue: unhex(vector.resp_prologue),
        staticKeyPair: responderStatic,
        ephemeralKeyPair: keyPairFromPrivateKey(unhex(vector.resp_ephemeral)),
      });

      const [first, second, ...transport] = vector.messages;
      if (!first || !second) throw new Error("a vector needs both handshake messages");
      expect(transport.length).toBeGreaterThanOrEqual(2);

      const message1 = initiator.writeMessage(unhex(first.payload));
      expect(hex(message1)).toBe(first.ciphertext);
      let seenStatic: Uint8Array | undefined;
      const payload1 = responder.readMessage(message1, {
        onRemoteStatic: (remoteStatic) => {
          seenStatic = remoteStatic;
        },
      });
      expect(hex(payload1)).toBe(first.payload);
      expect(hex(seenStatic!)).toBe(hex(initiatorStatic.publicKey));
      expect(hex(responder.remoteStaticPublicKey!)).toBe(hex(initiatorStatic.publicKey));
      // The responder learns the PSK only after message 1, the way the edge looks up a pairing token.
      if (responderPsk) responder.setPsk(unhex(responderPsk));

      const message2 = responder.writeMessage(unhex(second.payload));
      expect(hex(message2)).toBe(second.ciphertext);
      expect(hex(initiator.readMessage(message2))).toBe(second.payload);

      expect(initiator.isComplete).toBe(true);
      expect(responder.isComplete).toBe(true);
      expect(hex(initiator.handshakeHash)).toBe(hex(responder.handshakeHash));
      if (vector.handshake_hash) expect(hex(initiator.handshakeHash)).toBe(vector.handshake_hash);

      const initiatorCiphers = initiator.split();
      const responderCiphers = responder.split();
      transport.forEach((message, index) => {
        // After the handshake the vectors alternate, initiator first, so each side reaches nonce >= 1.
        const [sender, receiver] =
          index % 2 === 0 ? [initiatorCiphers, responderCiphers] : [responderCiphers, initiatorCiphers];
        const ciphertext = sender.send.encrypt(unhex(message.payload));
        expect(hex(ciphertext)).toBe(message.ciphertext);
        expect(hex(receiver.receive.decrypt(ciphertext))).toBe(message.payload);
      });
      expect(initiatorCiphers.send.nonce).toBe(Math.ceil(transport.length / 2));
      expect(responderCiphers.receive.nonce).toBe(Math.ceil(transport.length / 2));
      expect(responderCiphers.send.nonce).toBe(Math.floor(transport.length / 2));
    });
  }
});

describe("x25519", () => {
  it("agrees with tweetnacl on random keys", () => {
    for (let i = 0; i < 16; i++) {
      const ours = generateKeyPair();
      const theirs = generateKeyPair();
      expect(hex(ours.publicKey)).toBe(hex(nacl.scalarMult.base(ours.privateKey)));
      const privateKey = randomBytes(32);
      const publicKey = nacl.scalarMult.base(randomBytes(32));
      expect(hex(x25519(privateKey, publicKey))).toBe(hex(nacl.scalarMult(privateKey, publicKey)));
      expect(hex(x25519(ours.privateKey, theirs.publicKey))).toBe(
        hex(x25519(theirs.privateKey, ours.publicKey)),
      );
    }
  });

  it("derives the public key from a stored private key", () => {
    const keys = generateKeyPair();
    expect(hex(keyPairFromPrivateKey(keys.privateKey).publicKey)).toBe(hex(keys.publicKey));
  });

  it("notices a private key overwritten in place (no stale cached key object)", () => {
    const privateKey = new Uint8Array(randomBytes(32));
    const peer = nacl.scalarMult.base(randomBytes(32));
    expect(hex(x25519(privateKey, peer))).toBe(hex(nacl.scalarMult(privateKey, peer)));
    privateKey.set(randomBytes(32));
    expect(hex(x25519(privateKey, peer))).toBe(hex(nacl.scalarMult(privateKey, peer)));
  });

  it.each([
    ["the zero point", ZERO_POINT],
    ["the point of order 8", ORDER_8_POINT],
    ["the point 1 (order 1)", unhex("0100000000000000000000000000000000000000000000000000000000000000")],
  ])("refuses %s with LOW_ORDER_KEY", (_name, point) => {
    // tweetnacl returns the zeros this key would produce; we must refuse instead.
    const privateKey = randomBytes(32);
    expect(hex(nacl.scalarMult(privateKey, point))).toBe(hex(ZERO_POINT));
    const error = catchError(() => x25519(privateKey, point));
    expect(error).toBeInstanceOf(CryptoError);
    expect((error as CryptoError).code).toBe("LOW_ORDER_KEY");
  });

  it("rejects keys of the wrong length", () => {
    expect(() => x25519(new Uint8Array(31), ORDER_8_POINT)).toThrow(RangeError);
    expect(() => x25519(randomBytes(32), new Uint8Array(33))).toThrow(RangeError);
  });
});

describe("CipherState", () => {
  it("round-trips with associated data and counts messages", () => {
    const key = randomBytes(32);
    const sender = new CipherState(key);
    const receiver = new CipherState(key);
    const ad = Buffer.from("header");
    for (let i = 0; i < 3; i++) {
      const ciphertext = sender.encrypt(Buffer.from(`message ${i}`), ad);
      expect(ciphertext.byteLength).toBe(`message ${i}`.length + 16);
      expect(Buffer.from(receiver.decrypt(ciphertext, ad)).toString()).toBe(`message ${i}`);
    }
    expect(sender.nonce).toBe(3);
    expect(receiver.nonce).toBe(3);
    expect(Buffer.from(receiver.decrypt(sender.encrypt(new Uint8Array(0)))).byteLength).toBe(0);
  });

  it("encryptParts equals encrypt of the joined parts", () => {
    const key = randomBytes(32);
    const parts = [Buffer.from("header"), new Uint8Array(0), randomBytes(1000)];
    const ad = Buffer.from("ad");
    const joined = new CipherState(key).encrypt(Buffer.concat(parts), ad);
    expect(hex(new CipherState(key).encryptParts(parts, ad))).toBe(hex(joined));
    expect(hex(new CipherState(key).encryptParts(parts))).toBe(
      hex(new CipherState(key).encrypt(Buffer.concat(parts))),
    );
  });

  it("encryptToParts gives the bytes of encrypt, in pieces that end with the tag", () => {
    const key = randomBytes(32);
    const parts = [Buffer.from("header"), new Uint8Array(0), randomBytes(70_000)];
    const joined = new CipherState(key).encrypt(Buffer.concat(parts));
    const pieces = new CipherState(key).encryptToParts(parts);
    expect(pieces.map((piece) => piece.byteLength)).toEqual([6, 70_000, 16]);
    expect(hex(Buffer.concat(pieces))).toBe(hex(joined));
  });

  it("fails a tampered message, wrong associated data or a short one, and keeps its nonce", () => {
    const key = randomBytes(32);
    const sender = new CipherState(key);
    const receiver = new CipherState(key);
    const ciphertext = Buffer.from(sender.encrypt(Buffer.from("hello"), Buffer.from("ad")));
    const tampered = Buffer.from(ciphertext);
    tampered[0]! ^= 1;
    for (const [message, ad] of [
      [tampered, Buffer.from("ad")],
      [ciphertext, Buffer.from("da")],
      [ciphertext.subarray(0, 15), Buffer.from("ad")],
    ] as const) {
      const error = catchError(() => receiver.decrypt(message, ad));
      expect(error).toBeInstanceOf(CryptoError);
      expect((error as CryptoError).code).toBe("DECRYPT_FAILED");
      expect(receiver.nonce).toBe(0);
    }
    expect(Buffer.from(receiver.decrypt(ciphertext, Buffer.from("ad"))).toString()).toBe("hello");
  });

  it("uses the Noise nonce layout: 4 zero bytes then the 64-bit little-endian counter", () => {
    const key = randomBytes(32);
    const counter = 2n ** 40n + 5n;
    const ciphertext = new CipherState(key, counter).encrypt(Buffer.from("x"));
    const receiver = new CipherState(key, counter);
    expect(Buffer.from(receiver.decrypt(ciphertext)).toString()).toBe("x");
    // Any other counter (here differing only in its high half) must not decrypt it.
    expect(() => new CipherState(key, counter + 2n ** 32n).decrypt(ciphertext)).toThrow(CryptoError);
  });

  it("refuses to encrypt or decrypt at nonce 2^64-1", () => {
    const key = randomBytes(32);
    const sender = new CipherState(key, 2n ** 64n - 2n);
    const receiver = new CipherState(key, 2n ** 64n - 2n);
    const last = sender.encrypt(Buffer.from("last"));
    expect(Buffer.from(receiver.decrypt(last)).toString()).toBe("last");
    for (const run of [() => sender.encrypt(Buffer.from("more")), () => receiver.decrypt(last)]) {
      const error = catchError(run);
      expect(error).toBeInstanceOf(CryptoError);
      expect((error as CryptoError).code).toBe("NONCE_EXHAUSTED");
    }
    expect(REKEY_AFTER_MESSAGES).toBe(2 ** 48);
  });

  it("cannot be used after wipe()", () => {
    const state = new CipherState(randomBytes(32));
    const ciphertext = state.encrypt(Buffer.from("before"));
    state.wipe();
    expect(() => state.encrypt(Buffer.from("after"))).toThrow(CryptoError);
    expect(() => state.decrypt(ciphertext)).toThrow(CryptoError);
  });
});

describe("HandshakeState", () => {
  for (const pattern of ["IK", "IKpsk2"] as const) {
    it(`${pattern}: completes with random keys and yields matching, oriented ciphers`, () => {
      const psk = randomBytes(32);
      const { initiator, responder, initiatorKeys, responderKeys } = pair(
        pattern,
        pattern === "IKpsk2" ? { psk } : {},
      );
      const first = responder.readMessage(initiator.writeMessage(Buffer.from("token id")));
      expect(Buffer.from(first).toString()).toBe("token id");
      if (pattern === "IKpsk2") responder.setPsk(psk);
      expect(Buffer.from(initiator.readMessage(responder.writeMessage(Buffer.from("ok")))).toString()).toBe(
        "ok",
      );
      expect(hex(initiator.remoteStaticPublicKey!)).toBe(hex(responderKeys.publicKey));
      expect(hex(responder.remoteStaticPublicKey!)).toBe(hex(initiatorKeys.publicKey));
      expect(hex(initiator.handshakeHash)).toBe(hex(responder.handshakeHash));

      const home = initiator.split();
      const edge = responder.split();
      expect(Buffer.from(edge.receive.decrypt(home.send.encrypt(Buffer.from("up")))).toString()).toBe("up");
      expect(Buffer.from(home.receive.decrypt(edge.send.encrypt(Buffer.from("down")))).toString()).toBe(
        "down",
      );
      expect(() => initiator.split()).toThrow(HandshakeError);
    });
  }

  it("fails every tampered byte of message 1 and of message 2, and cannot continue", () => {
    const probe = pair("IK");
    const message1 = probe.initiator.writeMessage(Buffer.from("hello"));
    for (let index = 0; index < message1.byteLength; index++) {
      const { initiator, responder } = pair("IK");
      const tampered = Buffer.from(initiator.writeMessage(Buffer.from("hello")));
      tampered[index]! ^= 0x40;
      const error = catchError(() => responder.readMessage(tampered));
      expect(error).toBeInstanceOf(HandshakeError);
      expect((error as HandshakeError).code).toBe("HANDSHAKE_FAILED");
      expect(() => responder.writeMessage(Buffer.from("reply"))).toThrow(/already failed/);
    }

    const { initiator, responder } = pair("IK");
    responder.readMessage(initiator.writeMessage(Buffer.from("hello")));
    const message2 = Buffer.from(responder.writeMessage(Buffer.from("reply")));
    message2[message2.length - 1]! ^= 1;
    const error = catchError(() => initiator.readMessage(message2));
    expect(error).toBeInstanceOf(HandshakeError);
    expect((error as HandshakeError).code).toBe("HANDSHAKE_FAILED");
    expect(initiator.isComplete).toBe(false);
    expect(() => initiator.split()).toThrow(HandshakeError);
  });

  it("fails short and oversized messages with a sentence", () => {
    const { initiator, responder } = pair("IK");
    const message1 = initiator.writeMessage(new Uint8Array(0));
    expect(message1.byteLength).toBe(96);
    expect(() => responder.readMessage(message1.subarray(0, 95))).toThrow(
      /handshake message1 is 95 bytes; it needs at least 96/,
    );
    expect(() => pair("IK").responder.readMessage(new Uint8Array(65536))).toThrow(
      /over the 65535-byte limit/,
    );
    expect(() => pair("IK").initiator.writeMessage(new Uint8Array(65535 - 96 + 1))).toThrow(HandshakeError);
    const fresh = pair("IK");
    fresh.responder.readMessage(fresh.initiator.writeMessage(new Uint8Array(0)));
    fresh.responder.writeMessage(new Uint8Array(0));
    expect(() => fresh.initiator.readMessage(new Uint8Array(47))).toThrow(HandshakeError);
  });

  it("refuses a low-order ephemeral key in message 1", () => {
    const { initiator, responder } = pair("IK");
    const message1 = Buffer.from(initiator.writeMessage(Buffer.from("hello")));
    ORDER_8_POINT.forEach((byte, index) => {
      message1[index] = byte;
    });
    const error = catchError(() => responder.readMessage(message1)) as HandshakeError;
    expect(error).toBeInstanceOf(HandshakeError);
    expect(error.message).toMatch(/low-order/);
    expect((error.cause as CryptoError).code).toBe("LOW_ORDER_KEY");
  });

  it("enforces turn order", () => {
    const { initiator, responder } = pair("IK");
    expect(() => responder.writeMessage(new Uint8Array(0))).toThrow(/responder cannot write/);
    expect(() => pair("IK").initiator.readMessage(new Uint8Array(96))).toThrow(/initiator cannot read/);
    responder.readMessage(initiator.writeMessage(new Uint8Array(0)));
  });

  it("onRemoteStatic sees the initiator's key, and throwing from it aborts before the ss DH", () => {
    // The initiator claims a low-order static key: its own ss uses its private key and works, but the
    // responder's ss DH(s, rs) would fail with LOW_ORDER_KEY. Getting the hook's error instead of that
    // proves the hook ran, and the handshake stopped, before ss.
    const responderKeys = generateKeyPair();
    const claimedStatic: KeyPair = { publicKey: ORDER_8_POINT, privateKey: randomBytes(32) };
    const makeMessage1 = (): Uint8Array =>
      new HandshakeState({
        pattern: "IK",
        initiator: true,
        prologue: PROLOGUE,
        staticKeyPair: claimedStatic,
        remoteStaticPublicKey: responderKeys.publicKey,
      }).writeMessage(Buffer.from("hello"));
    const makeResponder = () =>
      new HandshakeState({
        pattern: "IK",
        initiator: false,
        prologue: PROLOGUE,
        staticKeyPair: responderKeys,
      });

    const withoutHook = catchError(() => makeResponder().readMessage(makeMessage1())) as HandshakeError;
    expect((withoutHook.cause as CryptoError).code).toBe("LOW_ORDER_KEY");

    const unknownPeer = new HandshakeError("UNKNOWN_PEER");
    let seen: Uint8Array | undefined;
    const responder = makeResponder();
    const error = catchError(() =>
      responder.readMessage(makeMessage1(), {
        onRemoteStatic: (remoteStatic) => {
          seen = remoteStatic;
          throw unknownPeer;
        },
      }),
    );
    expect(error).toBe(unknownPeer);
    expect(hex(seen!)).toBe(hex(ORDER_8_POINT));
    expect(responder.isComplete).toBe(false);
    expect(() => responder.writeMessage(new Uint8Array(0))).toThrow(/already failed/);
    expect(() => responder.readMessage(makeMessage1())).toThrow(/already failed/);
  });

  it("IKpsk2: a wrong pre-shared key fails on the initiator's side", () => {
    const { initiator, responder } = pair("IKpsk2", { psk: randomBytes(32) });
    responder.readMessage(initiator.writeMessage(Buffer.from("token id")));
    responder.setPsk(randomBytes(32));
    const message2 = responder.writeMessage(new Uint8Array(0));
    const error = catchError(() => initiator.readMessage(message2));
    expect(error).toBeInstanceOf(HandshakeError);
    expect((error as HandshakeError).code).toBe("HANDSHAKE_FAILED");
    expect(initiator.isComplete).toBe(false);
  });

  it("IKpsk2: the PSK is demanded when it is needed, and refused for IK or at the wrong length", () => {
    const { initiator, responder } = pair("IKpsk2", { psk: randomBytes(32) });
    responder.readMessage(initiator.writeMessage(new Uint8Array(0)));
    expect(() => responder.writeMessage(new Uint8Array(0))).toThrow(/pre-shared key is needed now/);
    expect(() => pair("IK").initiator.setPsk(randomBytes(32))).toThrow(HandshakeError);
    expect(() => pair("IKpsk2").responder.setPsk(randomBytes(16))).toThrow(HandshakeError);
  });

  it("keeps working as peers' static keys come and go from its key cache (more peers than it holds)", () => {
    const responderKeys = generateKeyPair();
    const peers = Array.from({ length: 300 }, () => generateKeyPair());
    const handshake = (peer: KeyPair, responderKeyPair = responderKeys) => {
      const initiator = new HandshakeState({
        pattern: "IK",
        initiator: true,
        prologue: Buffer.from("p"),
        staticKeyPair: peer,
        remoteStaticPublicKey: responderKeys.publicKey,
      });
      const responder = new HandshakeState({
        pattern: "IK",
        initiator: false,
        prologue: Buffer.from("p"),
        staticKeyPair: responderKeyPair,
      });
      responder.readMessage(initiator.writeMessage(Buffer.alloc(0)));
      initiator.readMessage(responder.writeMessage(Buffer.alloc(0)));
      const edge = responder.split();
      const home = initiator.split();
      return Buffer.from(edge.receive.decrypt(home.send.encrypt(Buffer.from("hi")))).toString();
    };
    // The first peer again after 299 others (evicted by then), and a peer seen just before (cached).
    for (const peer of [...peers, peers[0]!, peers[299]!]) expect(handshake(peer)).toBe("hi");
    // A peer whose key bytes were cached must still prove it holds the private key: a cached public
    // key never stands in for the ss DH.
    const impostor = { publicKey: peers[299]!.publicKey, privateKey: generateKeyPair().privateKey };
    expect(() => handshake(impostor)).toThrow(HandshakeError);
  });

  it("a different prologue fails the handshake", () => {
    const responderKeys = generateKeyPair();
    const initiator = new HandshakeState({
      pattern: "IK",
      initiator: true,
      prologue: Buffer.from("mxtunnel/1 pair"),
      staticKeyPair: generateKeyPair(),
      remoteStaticPublicKey: responderKeys.publicKey,
    });
    const responder = new HandshakeState({
      pattern: "IK",
      initiator: false,
      prologue: PROLOGUE,
      staticKeyPair: responderKeys,
    });
    expect(() => responder.readMessage(initiator.writeMessage(new Uint8Array(0)))).toThrow(HandshakeError);
  });

  it("the initiator must know the responder's key", () => {
    expect(
      () =>
        new HandshakeState({
          pattern: "IK",
          initiator: true,
          prologue: PROLOGUE,
          staticKeyPair: generateKeyPair(),
        }),
    ).toThrow(/must know the responder's static public key/);
  });
});
