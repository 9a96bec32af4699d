import { describe, expect, it } from "vitest";
import { type ErrorCode, ProtocolError } from "../src/errors.js";
import {
  BATCH_HEADER_SIZE,
  BATCH_LENGTH_SIZE,
  batchOverhead,
  decodeFrame,
  decodeMessage,
  encodeDataHeader,
  encodeFrame,
  encodeMessage,
  FRAME_HEADER_SIZE,
  type Frame,
  MAX_BATCHED_FRAME,
  MAX_DATA_PAYLOAD,
  MAX_FRAME_SIZE,
  MAX_MESSAGE_SIZE,
  MAX_META_SIZE,
  MessageBuilder,
  ResetCode,
} from "../src/wire.js";

const fromHex = (hex: string): Uint8Array => new Uint8Array(Buffer.from(hex.replaceAll(" ", ""), "hex"));
const toHex = (bytes: Uint8Array): string => Buffer.from(bytes).toString("hex");
const utf8Hex = (text: string): string => Buffer.from(text, "utf8").toString("hex");

function expectCode(fn: () => unknown, code: ErrorCode): ProtocolError {
  try {
    fn();
  } catch (error) {
    expect(error).toBeInstanceOf(ProtocolError);
    const protocolError = error as ProtocolError;
    expect(protocolError.code).toBe(code);
    expect(protocolError.message.length).toBeGreaterThan(10);
    return protocolError;
  }
  throw new Error(`expected a ProtocolError ${code}`);
}

describe("constants", () => {
  it("fit a frame into one Noise message", () => {
    expect(MAX_FRAME_SIZE).toBe(65519);
    expect(FRAME_HEADER_SIZE).toBe(5);
    expect(MAX_DATA_PAYLOAD).toBe(65514);
    expect(MAX_META_SIZE).toBe(8192);
    expect(ResetCode).toEqual({
      REFUSED: 1,
      CONNECT_FAILED: 2,
      ADDRESS_REFUSED: 3,
      TIMEOUT: 4,
      CANCEL: 5,
      PROTOCOL_ERROR: 6,
      INTERNAL: 7,
      TOO_MANY_STREAMS: 8,
    });
  });
});

// Hex written out by hand from the format (type u8, stream u32 BE, body), not produced by the encoder.
const fixtures: [string, Frame, string][] = [
  [
    "OPEN forward",
    { type: "open", stream: 1, kind: "forward", meta: { service: "smtp" } },
    "01 00000001 01 7b2273657276696365223a22736d7470227d",
  ],
  [
    "OPEN spool",
    { type: "open", stream: 2, kind: "spool", meta: { id: 7 } },
    "01 00000002 02 7b226964223a377d",
  ],
  ["OPEN relay", { type: "open", stream: 3, kind: "relay", meta: {} }, "01 00000003 03 7b7d"],
  [
    "OPEN sync, highest id",
    { type: "open", stream: 0xfffffffe, kind: "sync", meta: {} },
    "01 fffffffe 04 7b7d",
  ],
  ["ACCEPT", { type: "accept", stream: 2 }, "02 00000002"],
  ["DATA", { type: "data", stream: 3, data: fromHex("6869") }, "03 00000003 6869"],
  ["WINDOW tunnel", { type: "window", stream: 0, credit: 4194304 }, "04 00000000 00400000"],
  ["WINDOW max", { type: "window", stream: 5, credit: 0x7fffffff }, "04 00000005 7fffffff"],
  ["WINDOW min", { type: "window", stream: 0x01020304, credit: 1 }, "04 01020304 00000001"],
  ["END", { type: "end", stream: 7 }, "05 00000007"],
  [
    "RESULT object",
    { type: "result", stream: 9, result: { ok: true } },
    "06 00000009 7b226f6b223a747275657d",
  ],
  ["RESULT number", { type: "result", stream: 9, result: 250 }, "06 00000009 323530"],
  ["RESULT null", { type: "result", stream: 9, result: null }, "06 00000009 6e756c6c"],
  [
    "RESET",
    { type: "reset", stream: 0x0102, code: ResetCode.CANCEL, reason: "bye" },
    "07 00000102 0005 627965",
  ],
  ["RESET empty reason", { type: "reset", stream: 1, code: 0xffff, reason: "" }, "07 00000001 ffff"],
  [
    "RESET UTF-8 reason",
    { type: "reset", stream: 1, code: ResetCode.REFUSED, reason: "né" },
    "07 00000001 0001 6ec3a9",
  ],
  ["PING", { type: "ping", payload: fromHex("0102030405060708") }, "08 00000000 0102030405060708"],
  ["PONG", { type: "pong", payload: fromHex("ffffffffffffffff") }, "09 00000000 ffffffffffffffff"],
  ["CONTROL", { type: "control", message: { health: "ok" } }, "0a 00000000 7b226865616c7468223a226f6b227d"],
];

describe("fixtures", () => {
  for (const [name, frame, hex] of fixtures) {
    it(`encodes ${name}`, () => {
      expect(toHex(encodeFrame(frame))).toBe(hex.replaceAll(" ", ""));
    });
    it(`decodes ${name}`, () => {
      expect(decodeFrame(fromHex(hex))).toEqual(frame);
    });
  }
});

describe("decodeFrame", () => {
  it("returns DATA as a view into the input, without copying", () => {
    const bytes = fromHex("03 00000003 616263");
    const frame = decodeFrame(bytes);
    if (frame.type !== "data") throw new Error("expected DATA");
    expect(frame.data.buffer).toBe(bytes.buffer);
    expect(frame.data.byteOffset).toBe(bytes.byteOffset + 5);
    expect(toHex(frame.data)).toBe("616263");
  });

  it("accepts a frame of exactly MAX_FRAME_SIZE and meta of exactly MAX_META_SIZE", () => {
    const data = new Uint8Array(MAX_DATA_PAYLOAD).fill(7);
    const encoded = encodeFrame({ type: "data", stream: 1, data });
    expect(encoded.byteLength).toBe(MAX_FRAME_SIZE);
    const decoded = decodeFrame(encoded);
    expect(decoded.type === "data" && decoded.data.byteLength).toBe(MAX_DATA_PAYLOAD);

    const meta = { pad: "x".repeat(MAX_META_SIZE - '{"pad":""}'.length) };
    const open = encodeFrame({ type: "open", stream: 1, kind: "forward", meta });
    expect(open.byteLength).toBe(FRAME_HEADER_SIZE + 1 + MAX_META_SIZE);
    expect(decodeFrame(open)).toEqual({ type: "open", stream: 1, kind: "forward", meta });
  });

  it("drops __proto__ keys from peer JSON", () => {
    const json = '{"__proto__":{"polluted":1},"a":{"__proto__":{"b":2}},"c":1}';
    const frame = decodeFrame(fromHex(`0a 00000000 ${utf8Hex(json)}`));
    if (frame.type !== "control") throw new Error("expected CONTROL");
    expect(Object.hasOwn(frame.message, "__proto__")).toBe(false);
    expect(frame.message).toEqual({ a: {}, c: 1 });
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it("drops __proto__ keys spelled with escapes, and keeps escaped text that is not one", () => {
    const json = '{"\\u005f_proto__":{"polluted":1},"a":{"__pr\\u006fto__":2},"b":"say \\"hi\\"\\n"}';
    const frame = decodeFrame(fromHex(`0a 00000000 ${utf8Hex(json)}`));
    if (frame.type !== "control") throw new Error("expected CONTROL");
    expect(Object.hasOwn(frame.message, "__proto__")).toBe(false);
    expect(frame.message).toEqual({ a: {}, b: 'say "hi"\n' });
  });

  it("decodes plain meta (no escapes, no __proto__) to the same objects", () => {
    const meta = {
      service: "smtp",
      session: "s1",
      client: { address: "::1", port: 1 },
      list: [1, "x", null],
    };
    const open = encodeFrame({ type: "open", stream: 1, kind: "forward", meta });
    const frame = decodeFrame(open);
    if (frame.type !== "open") throw new Error("expected OPEN");
    expect(frame.meta).toEqual(meta);
    expect(Object.getPrototypeOf(frame.meta)).toBe(Object.prototype);
  });

  const malformed: [string, string, ErrorCode][] = [
    ["an empty message", "", "FRAME_MALFORMED"],
    ["a lone type byte", "01", "FRAME_MALFORMED"],
    ["a truncated header", "03 000000", "FRAME_MALFORMED"],
    ["type 0x00", "00 00000001", "FRAME_UNKNOWN_TYPE"],
    ["type 0x0c", "0c 00000000", "FRAME_UNKNOWN_TYPE"],
    ["a BATCH where a frame belongs", "0b 00000000 0005 0200000001", "FRAME_MALFORMED"],
    ["type 0xff", "ff 00000001 00", "FRAME_UNKNOWN_TYPE"],
    ["OPEN without a kind", "01 00000001", "FRAME_MALFORMED"],
    ["OPEN with kind 0", "01 00000001 00 7b7d", "FRAME_MALFORMED"],
    ["OPEN with kind 5", "01 00000001 05 7b7d", "FRAME_MALFORMED"],
    ["OPEN without meta", "01 00000001 01", "FRAME_MALFORMED"],
    ["OPEN with bad JSON", `01 00000001 01 ${utf8Hex('{"a":')}`, "FRAME_MALFORMED"],
    ["OPEN with invalid UTF-8", "01 00000001 01 7b22ff223a317d", "FRAME_MALFORMED"],
    ["OPEN with a BOM", `01 00000001 01 efbbbf ${utf8Hex("{}")}`, "FRAME_MALFORMED"],
    ["OPEN meta an array", `01 00000001 01 ${utf8Hex("[]")}`, "FRAME_MALFORMED"],
    ["OPEN meta null", `01 00000001 01 ${utf8Hex("null")}`, "FRAME_MALFORMED"],
    ["OPEN meta a string", `01 00000001 01 ${utf8Hex('"x"')}`, "FRAME_MALFORMED"],
    ["OPEN meta a number", `01 00000001 01 ${utf8Hex("1")}`, "FRAME_MALFORMED"],
    ["OPEN on stream 0", "01 00000000 01 7b7d", "FRAME_MALFORMED"],
    ["ACCEPT on stream 0", "02 00000000", "FRAME_MALFORMED"],
    ["ACCEPT with a body", "02 00000001 00", "FRAME_MALFORMED"],
    ["zero-length DATA", "03 00000001", "FRAME_MALFORMED"],
    ["DATA on stream 0", "03 00000000 00", "FRAME_MALFORMED"],
    ["WINDOW credit 0", "04 00000001 00000000", "FRAME_MALFORMED"],
    ["WINDOW credit 2^31", "04 00000001 80000000", "FRAME_MALFORMED"],
    ["WINDOW credit 2^32-1", "04 00000000 ffffffff", "FRAME_MALFORMED"],
    ["WINDOW truncated", "04 00000001 000001", "FRAME_MALFORMED"],
    ["WINDOW padded", "04 00000001 0000000100", "FRAME_MALFORMED"],
    ["END on stream 0", "05 00000000", "FRAME_MALFORMED"],
    ["END with a body", "05 00000001 00", "FRAME_MALFORMED"],
    ["RESULT empty", "06 00000001", "FRAME_MALFORMED"],
    ["RESULT bad JSON", `06 00000001 ${utf8Hex("nope")}`, "FRAME_MALFORMED"],
    ["RESULT on stream 0", `06 00000000 ${utf8Hex("1")}`, "FRAME_MALFORMED"],
    ["RESET without a code", "07 00000001", "FRAME_MALFORMED"],
    ["RESET with half a code", "07 00000001 00", "FRAME_MALFORMED"],
    ["RESET on stream 0", "07 00000000 0005", "FRAME_MALFORMED"],
    ["RESET with invalid UTF-8", "07 00000001 0005 c3", "FRAME_MALFORMED"],
    ["PING of 7 bytes", "08 00000000 01020304050607", "FRAME_MALFORMED"],
    ["PING of 9 bytes", "08 00000000 010203040506070809", "FRAME_MALFORMED"],
    ["PING on stream 1", "08 00000001 0102030405060708", "FRAME_MALFORMED"],
    ["PONG of 0 bytes", "09 00000000", "FRAME_MALFORMED"],
    ["PONG on stream 2", "09 00000002 0102030405060708", "FRAME_MALFORMED"],
    ["CONTROL not an object", `0a 00000000 ${utf8Hex("[1]")}`, "FRAME_MALFORMED"],
    ["CONTROL bad JSON", `0a 00000000 ${utf8Hex("{")}`, "FRAME_MALFORMED"],
    ["CONTROL on stream 3", `0a 00000003 ${utf8Hex("{}")}`, "FRAME_MALFORMED"],
  ];
  for (const [name, hex, code] of malformed) {
    it(`rejects ${name} with ${code}`, () => {
      expectCode(() => decodeFrame(fromHex(hex)), code);
    });
  }

  it("rejects a frame over MAX_FRAME_SIZE with FRAME_TOO_LARGE", () => {
    const bytes = new Uint8Array(MAX_FRAME_SIZE + 1);
    bytes.set(fromHex("03 00000001"));
    expectCode(() => decodeFrame(bytes), "FRAME_TOO_LARGE");
  });

  it("rejects meta over MAX_META_SIZE with META_TOO_LARGE", () => {
    const json = `{"pad":"${"x".repeat(MAX_META_SIZE - 9)}"}`;
    expect(Buffer.byteLength(json)).toBe(MAX_META_SIZE + 1);
    expectCode(() => decodeFrame(fromHex(`01 00000001 01 ${utf8Hex(json)}`)), "META_TOO_LARGE");
  });

  it("rejects a RESET reason over 1024 bytes", () => {
    expectCode(() => decodeFrame(fromHex(`07 00000001 0005 ${"61".repeat(1025)}`)), "FRAME_MALFORMED");
    expect(decodeFrame(fromHex(`07 00000001 0005 ${"61".repeat(1024)}`))).toMatchObject({ code: 5 });
  });
});

describe("encodeFrame", () => {
  const invalid: [string, () => Frame, ErrorCode][] = [
    ["zero-length DATA", () => ({ type: "data", stream: 1, data: new Uint8Array(0) }), "FRAME_MALFORMED"],
    [
      "DATA over MAX_DATA_PAYLOAD",
      () => ({ type: "data", stream: 1, data: new Uint8Array(MAX_DATA_PAYLOAD + 1) }),
      "FRAME_TOO_LARGE",
    ],
    ["DATA on stream 0", () => ({ type: "data", stream: 0, data: new Uint8Array(1) }), "FRAME_MALFORMED"],
    [
      "OPEN on stream 2^32",
      () => ({ type: "open", stream: 2 ** 32, kind: "forward", meta: {} }),
      "FRAME_MALFORMED",
    ],
    ["END on stream 1.5", () => ({ type: "end", stream: 1.5 }), "FRAME_MALFORMED"],
    ["ACCEPT on stream -1", () => ({ type: "accept", stream: -1 }), "FRAME_MALFORMED"],
    ["WINDOW credit 0", () => ({ type: "window", stream: 1, credit: 0 }), "FRAME_MALFORMED"],
    ["WINDOW credit 2^31", () => ({ type: "window", stream: 1, credit: 2 ** 31 }), "FRAME_MALFORMED"],
    ["WINDOW credit 1.5", () => ({ type: "window", stream: 1, credit: 1.5 }), "FRAME_MALFORMED"],
    [
      "OPEN with an unknown kind",
      () => ({ type: "open", stream: 1, kind: "bogus" as "forward", meta: {} }),
      "FRAME_MALFORMED",
    ],
    [
      "OPEN meta an array",
      () => ({ type: "open", stream: 1, kind: "forward", meta: [] as unknown as Record<string, unknown> }),
      "FRAME_MALFORMED",
    ],
    [
      "OPEN meta over 8 KiB",
      () => ({ type: "open", stream: 1, kind: "forward", meta: { pad: "é".repeat(4096) } }),
      "META_TOO_LARGE",
    ],
    ["RESULT undefined", () => ({ type: "result", stream: 1, result: undefined }), "FRAME_MALFORMED"],
    ["RESULT a BigInt", () => ({ type: "result", stream: 1, result: 1n }), "FRAME_MALFORMED"],
    [
      "RESULT circular",
      () => {
        const value: Record<string, unknown> = {};
        value.self = value;
        return { type: "result", stream: 1, result: value };
      },
      "FRAME_MALFORMED",
    ],
    [
      "RESULT over the frame limit",
      () => ({ type: "result", stream: 1, result: "x".repeat(70_000) }),
      "FRAME_TOO_LARGE",
    ],
    [
      "CONTROL over the frame limit",
      () => ({ type: "control", message: { pad: "x".repeat(70_000) } }),
      "FRAME_TOO_LARGE",
    ],
    [
      "CONTROL null",
      () => ({ type: "control", message: null as unknown as Record<string, unknown> }),
      "FRAME_MALFORMED",
    ],
    ["RESET code 65536", () => ({ type: "reset", stream: 1, code: 65536, reason: "" }), "FRAME_MALFORMED"],
    [
      "RESET reason over 1024 bytes",
      () => ({ type: "reset", stream: 1, code: 1, reason: "é".repeat(513) }),
      "FRAME_MALFORMED",
    ],
    ["PING of 7 bytes", () => ({ type: "ping", payload: new Uint8Array(7) }), "FRAME_MALFORMED"],
    ["PONG of 9 bytes", () => ({ type: "pong", payload: new Uint8Array(9) }), "FRAME_MALFORMED"],
  ];
  for (const [name, make, code] of invalid) {
    it(`refuses ${name} with ${code}`, () => {
      expectCode(() => encodeFrame(make()), code);
    });
  }

  it("copies DATA once into a single buffer", () => {
    const payload = new Uint8Array(1000).fill(0xab);
    const slice = payload.subarray(10, 20);
    const encoded = encodeFrame({ type: "data", stream: 4, data: slice });
    expect(encoded.byteLength).toBe(15);
    expect(encoded.byteOffset).toBe(0);
    expect(encoded.buffer.byteLength).toBe(15);
    expect(toHex(encoded)).toBe(`0300000004${"ab".repeat(10)}`);
  });

  it("round-trips every fixture", () => {
    for (const [, frame] of fixtures) expect(decodeFrame(encodeFrame(frame))).toEqual(frame);
  });
});

describe("encodeDataHeader", () => {
  it("is the DATA frame's first 5 bytes, so header ‖ payload equals encodeFrame", () => {
    expect(toHex(encodeDataHeader(0x01020304, 3))).toBe("0301020304");
    expect(toHex(encodeDataHeader(0xffffffff, MAX_DATA_PAYLOAD))).toBe("03ffffffff");
    const data = new Uint8Array(4000).fill(0x5a);
    const joined = Buffer.concat([encodeDataHeader(7, data.byteLength), data]);
    expect(toHex(joined)).toBe(toHex(encodeFrame({ type: "data", stream: 7, data })));
  });

  it("keeps the codec's limits", () => {
    expectCode(() => encodeDataHeader(1, 0), "FRAME_MALFORMED");
    expectCode(() => encodeDataHeader(1, MAX_DATA_PAYLOAD + 1), "FRAME_TOO_LARGE");
    expectCode(() => encodeDataHeader(0, 1), "FRAME_MALFORMED");
    expectCode(() => encodeDataHeader(2 ** 32, 1), "FRAME_MALFORMED");
  });
});

describe("messages (a bare frame or a BATCH)", () => {
  const accept = "02 00000001";
  const window0 = "04 00000000 00400000";
  const data = "03 00000002 68656c6c6f";

  it("fixes the BATCH constants", () => {
    expect(MAX_MESSAGE_SIZE).toBe(65519);
    expect(BATCH_HEADER_SIZE).toBe(5);
    expect(BATCH_LENGTH_SIZE).toBe(2);
    expect(MAX_BATCHED_FRAME).toBe(65512);
  });

  it("encodes one frame bare and several as a BATCH with u16 lengths, in order", () => {
    expect(toHex(encodeMessage([fromHex(accept)]))).toBe(accept.replaceAll(" ", ""));
    const hex = `0b 00000000 0005 ${accept} 0009 ${window0} 000a ${data}`.replaceAll(" ", "");
    expect(toHex(encodeMessage([fromHex(accept), fromHex(window0), fromHex(data)]))).toBe(hex);
  });

  it("decodes a bare frame and a BATCH into frames, DATA as views into the message", () => {
    expect(decodeMessage(fromHex(window0))).toEqual([{ type: "window", stream: 0, credit: 0x400000 }]);
    const message = fromHex(`0b 00000000 0005 ${accept} 000a ${data} 0005 ${accept}`);
    const frames = decodeMessage(message);
    expect(frames).toEqual([
      { type: "accept", stream: 1 },
      { type: "data", stream: 2, data: Uint8Array.from(Buffer.from("hello")) },
      { type: "accept", stream: 1 },
    ]);
    expect((frames[1] as { data: Uint8Array }).data.buffer).toBe(message.buffer);
    expect(batchOverhead(message, 3)).toBe(5 + 3 * 2);
    expect(batchOverhead(fromHex(window0), 1)).toBe(0);
  });

  it("accepts a BATCH of one frame and one of exactly MAX_MESSAGE_SIZE bytes", () => {
    expect(decodeMessage(fromHex(`0b 00000000 0005 ${accept}`))).toEqual([{ type: "accept", stream: 1 }]);
    const big = new Uint8Array(MAX_BATCHED_FRAME - FRAME_HEADER_SIZE).fill(1);
    const message = encodeMessage([encodeFrame({ type: "data", stream: 3, data: big })]);
    expect(message.byteLength).toBe(MAX_BATCHED_FRAME); // alone: bare
    const full = encodeMessage([
      fromHex(accept),
      encodeFrame({ type: "data", stream: 3, data: big.subarray(0, MAX_MESSAGE_SIZE - 5 - 2 - 5 - 2 - 5) }),
    ]);
    expect(full.byteLength).toBe(MAX_MESSAGE_SIZE);
    expect(decodeMessage(full)).toHaveLength(2);
  });

  const malformed: [string, string, ErrorCode][] = [
    ["an empty message", "", "FRAME_MALFORMED"],
    ["an empty BATCH", "0b 00000000", "FRAME_MALFORMED"],
    ["a truncated BATCH header", "0b 0000", "FRAME_MALFORMED"],
    ["a BATCH on stream 1", `0b 00000001 0005 ${accept}`, "FRAME_MALFORMED"],
    ["a truncated length", `0b 00000000 0005 ${accept} 00`, "FRAME_MALFORMED"],
    ["a length past the end", `0b 00000000 0006 ${accept}`, "FRAME_MALFORMED"],
    ["a zero length", `0b 00000000 0000 0005 ${accept}`, "FRAME_MALFORMED"],
    ["a frame shorter than its header", `0b 00000000 0003 020000`, "FRAME_MALFORMED"],
    ["a nested BATCH", `0b 00000000 000c 0b00000000 0005 ${accept}`, "FRAME_MALFORMED"],
    ["a malformed frame after good ones", `0b 00000000 0005 ${accept} 0005 02 00000000`, "FRAME_MALFORMED"],
    ["an unknown frame type inside", `0b 00000000 0005 ${accept} 0005 7f 00000000`, "FRAME_UNKNOWN_TYPE"],
    ["a frame over the batched maximum", `0b 00000000 fff0 ${accept}`, "FRAME_TOO_LARGE"],
  ];
  for (const [name, hex, code] of malformed) {
    it(`refuses ${name} with ${code}`, () => {
      expectCode(() => decodeMessage(fromHex(hex)), code);
    });
  }

  it("refuses a BATCH over MAX_MESSAGE_SIZE with FRAME_TOO_LARGE", () => {
    const bytes = new Uint8Array(MAX_MESSAGE_SIZE + 1);
    bytes.set(fromHex(`0b 00000000 0005 ${accept}`));
    expectCode(() => decodeMessage(bytes), "FRAME_TOO_LARGE");
  });

  it("refuses to encode frames that do not fit one message", () => {
    expectCode(() => encodeMessage([]), "FRAME_MALFORMED");
    const big = encodeFrame({ type: "data", stream: 1, data: new Uint8Array(40_000) });
    expectCode(() => encodeMessage([big, big]), "FRAME_TOO_LARGE");
    expectCode(() => encodeMessage([fromHex(accept), fromHex("02")]), "FRAME_MALFORMED");
  });
});

describe("MessageBuilder", () => {
  it("takes any frame up to MAX_FRAME_SIZE while empty, then only what fits beside it", () => {
    const builder = new MessageBuilder();
    expect(builder.room).toBe(MAX_FRAME_SIZE);
    expect(builder.size).toBe(0);
    expect(builder.add(fromHex("02 00000001"))).toBe(true);
    expect(builder.size).toBe(5);
    expect(builder.room).toBe(MAX_MESSAGE_SIZE - (5 + 2 + 5) - 2);
    expect(builder.addData(3, new Uint8Array(builder.room - FRAME_HEADER_SIZE + 1))).toBe(false);
    expect(builder.frameCount).toBe(1);
    expect(builder.addData(3, new Uint8Array(builder.room - FRAME_HEADER_SIZE))).toBe(true);
    expect(builder.size).toBe(MAX_MESSAGE_SIZE);
    expect(builder.room).toBe(0);
    const parts = builder.take();
    expect(Buffer.concat(parts).byteLength).toBe(MAX_MESSAGE_SIZE);
    expect(decodeMessage(Buffer.concat(parts)).map((f) => f.type)).toEqual(["accept", "data"]);
    expect(builder.take()).toEqual([]);
    expect(builder.frameCount).toBe(0);
  });

  it("keeps large DATA payloads as parts of their own and copies the rest into one buffer", () => {
    const builder = new MessageBuilder();
    const large = new Uint8Array(4096).fill(0x61);
    const small = new Uint8Array(100).fill(0x62);
    builder.add(encodeFrame({ type: "window", stream: 1, credit: 9 }));
    builder.addData(3, large);
    builder.addData(5, small);
    builder.add(encodeFrame({ type: "end", stream: 5 }));
    const parts = builder.take();
    expect(parts.map((p) => p.byteLength)).toEqual([5 + 2 + 9 + 2 + 5, 4096, 2 + 105 + 2 + 5]);
    expect(parts[1]).toBe(large);
    expect(decodeMessage(Buffer.concat(parts))).toEqual([
      { type: "window", stream: 1, credit: 9 },
      { type: "data", stream: 3, data: Buffer.from(large) },
      { type: "data", stream: 5, data: Buffer.from(small) },
      { type: "end", stream: 5 },
    ]);
  });

  it("sends a lone frame bare: a full-size DATA as header and payload, a small one joined", () => {
    const builder = new MessageBuilder();
    const full = new Uint8Array(MAX_DATA_PAYLOAD);
    expect(builder.addData(7, full)).toBe(true);
    expect(builder.add(fromHex("02 00000001"))).toBe(false);
    const parts = builder.take();
    expect(parts.map((p) => p.byteLength)).toEqual([5, MAX_DATA_PAYLOAD]);
    expect(parts[1]).toBe(full);
    builder.addData(7, Buffer.from("hi"));
    expect(builder.take().map((p) => toHex(p))).toEqual(["030000000768 69".replace(" ", "")]);
  });

  it("caps a message of several frames at its maxSize; a lone frame may still be up to MAX_FRAME_SIZE", () => {
    const builder = new MessageBuilder(65_516);
    expect(builder.room).toBe(MAX_FRAME_SIZE);
    expect(builder.add(fromHex("02 00000001"))).toBe(true);
    expect(builder.room).toBe(65_516 - (5 + 2 + 5) - 2);
    expect(builder.addData(3, new Uint8Array(builder.room - FRAME_HEADER_SIZE + 1))).toBe(false);
    expect(builder.addData(3, new Uint8Array(builder.room - FRAME_HEADER_SIZE))).toBe(true);
    expect(builder.size).toBe(65_516);
    expect(Buffer.concat(builder.take()).byteLength).toBe(65_516);
    // Alone, the largest frame the protocol allows still fits: the cap is the sender's preference.
    expect(builder.addData(3, new Uint8Array(MAX_DATA_PAYLOAD))).toBe(true);
    expect(Buffer.concat(builder.take()).byteLength).toBe(MAX_FRAME_SIZE);
    // Above the protocol's limit it is the protocol's limit.
    expect(new MessageBuilder(1 << 20).room).toBe(MAX_FRAME_SIZE);
  });

  it("refuses a maxSize too small for a BATCH of one frame", () => {
    expect(() => new MessageBuilder(11)).toThrow(RangeError);
    expect(() => new MessageBuilder(1.5e4 + 0.5)).toThrow(RangeError);
    expect(new MessageBuilder(12).room).toBe(MAX_FRAME_SIZE);
  });
});
