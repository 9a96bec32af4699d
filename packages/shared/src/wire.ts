// The tunnel's frame format: the one module that turns typed frames into bytes and back.
// Every frame is `type u8 | stream id u32 BE | body`; all limits are checked here, where bytes are
// parsed, so the multiplexer and the agents only ever see well-formed, typed frames.
//
// One Noise transport message (protocol v2) carries either one bare frame or a BATCH of frames:
// `0x0b | stream 0 u32 | (length u16 BE | frame)+`, at most MAX_MESSAGE_SIZE bytes in all, so a turn's
// frames cost one cipher and one WebSocket frame instead of one each. A bare frame keeps the full
// MAX_FRAME_SIZE (a full-size DATA frame fills a message on its own).
import { ProtocolError } from "./errors.js";

/** A Noise transport message is at most 65535 bytes including its 16-byte tag. */
export const MAX_FRAME_SIZE = 65519;
export const FRAME_HEADER_SIZE = 5;
/** The plaintext of one Noise transport message: one bare frame or one BATCH. */
export const MAX_MESSAGE_SIZE = MAX_FRAME_SIZE;
/** A BATCH starts with a frame header (type 0x0b, stream 0); each frame in it is preceded by a u16 length. */
export const BATCH_HEADER_SIZE = FRAME_HEADER_SIZE;
export const BATCH_LENGTH_SIZE = 2;
/** The largest frame a BATCH can hold (alone in it); a larger one travels bare. */
export const MAX_BATCHED_FRAME = MAX_MESSAGE_SIZE - BATCH_HEADER_SIZE - BATCH_LENGTH_SIZE;
export const MAX_DATA_PAYLOAD = MAX_FRAME_SIZE - FRAME_HEADER_SIZE;
export const MAX_META_SIZE = 8192;
export const MAX_RESET_REASON_SIZE = 1024;
/** WINDOW credit is a positive signed 31-bit value (as in HTTP/2). */
export const MAX_CREDIT = 0x7fffffff;
/**
 * Credit each side implicitly holds for a new stream before any WINDOW frame, in both directions,
 * so an opener may write before ACCEPT. Tunnel-level credit starts at zero and is granted by WINDOW on
 * stream 0 as soon as a multiplexer starts.
 */
export const INITIAL_STREAM_CREDIT = 1024 * 1024;

export type StreamKind = "forward" | "spool" | "relay" | "sync";

export type Frame =
  | { type: "open"; stream: number; kind: StreamKind; meta: Record<string, unknown> }
  | { type: "accept"; stream: number }
  | { type: "data"; stream: number; data: Uint8Array }
  | { type: "window"; stream: number; credit: number }
  | { type: "end"; stream: number }
  | { type: "result"; stream: number; result: unknown }
  | { type: "reset"; stream: number; code: number; reason: string }
  | { type: "ping"; payload: Uint8Array }
  | { type: "pong"; payload: Uint8Array }
  | { type: "control"; message: Record<string, unknown> };

export const ResetCode = {
  REFUSED: 1,
  CONNECT_FAILED: 2,
  ADDRESS_REFUSED: 3,
  TIMEOUT: 4,
  CANCEL: 5,
  PROTOCOL_ERROR: 6,
  INTERNAL: 7,
  TOO_MANY_STREAMS: 8,
} as const;

const TYPE_ID = {
  open: 0x01,
  accept: 0x02,
  data: 0x03,
  window: 0x04,
  end: 0x05,
  result: 0x06,
  reset: 0x07,
  ping: 0x08,
  pong: 0x09,
  control: 0x0a,
} as const satisfies Record<Frame["type"], number>;

const TYPE_NAME: readonly (Frame["type"] | undefined)[] = [
  undefined,
  "open",
  "accept",
  "data",
  "window",
  "end",
  "result",
  "reset",
  "ping",
  "pong",
  "control",
];

/** Not a Frame: the envelope of several frames in one message; never nested. */
const BATCH_TYPE_ID = 0x0b;

const KIND_ID = { forward: 1, spool: 2, relay: 3, sync: 4 } as const satisfies Record<StreamKind, number>;
const KIND_NAME: readonly (StreamKind | undefined)[] = [undefined, "forward", "spool", "relay", "sync"];

const PING_PAYLOAD_SIZE = 8;
const MAX_STREAM_ID = 0xffffffff;

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** Encodes one frame; throws ProtocolError when the frame could not be sent as given. */
export function encodeFrame(frame: Frame): Uint8Array {
  switch (frame.type) {
    case "open": {
      checkStreamId(frame.type, frame.stream);
      const kindId: number | undefined = KIND_ID[frame.kind];
      if (kindId === undefined) {
        throw new ProtocolError(
          "FRAME_MALFORMED",
          `OPEN names an unknown stream kind "${String(frame.kind)}"`,
        );
      }
      const meta = encodeJsonObject(frame.meta, "OPEN meta");
      if (meta.byteLength > MAX_META_SIZE) {
        throw new ProtocolError(
          "META_TOO_LARGE",
          `OPEN meta is ${meta.byteLength} bytes of JSON; the limit is ${MAX_META_SIZE}`,
        );
      }
      const bytes = header(TYPE_ID.open, frame.stream, 1 + meta.byteLength);
      bytes[FRAME_HEADER_SIZE] = kindId;
      bytes.set(meta, FRAME_HEADER_SIZE + 1);
      return bytes;
    }
    case "accept":
    case "end":
      checkStreamId(frame.type, frame.stream);
      return header(TYPE_ID[frame.type], frame.stream, 0);
    case "data": {
      checkStreamId(frame.type, frame.stream);
      const size = frame.data.byteLength;
      if (size === 0) throw new ProtocolError("FRAME_MALFORMED", "a DATA frame must carry at least one byte");
      if (size > MAX_DATA_PAYLOAD) {
        throw new ProtocolError(
          "FRAME_TOO_LARGE",
          `a DATA frame carries at most ${MAX_DATA_PAYLOAD} bytes, not ${size}`,
        );
      }
      const bytes = header(TYPE_ID.data, frame.stream, size);
      bytes.set(frame.data, FRAME_HEADER_SIZE);
      return bytes;
    }
    case "window": {
      if (!Number.isInteger(frame.stream) || frame.stream < 0 || frame.stream > MAX_STREAM_ID) {
        throw new ProtocolError("FRAME_MALFORMED", `stream id ${frame.stream} is not a u32`);
      }
      if (!Number.isInteger(frame.credit) || frame.credit < 1 || frame.credit > MAX_CREDIT) {
        throw new ProtocolError("FRAME_MALFORMED", `WINDOW credit must be 1..2^31-1, not ${frame.credit}`);
      }
      const bytes = header(TYPE_ID.window, frame.stream, 4);
      writeU32(bytes, FRAME_HEADER_SIZE, frame.credit);
      return bytes;
    }
    case "result": {
      checkStreamId(frame.type, frame.stream);
      const body = encodeJson(frame.result, "RESULT value");
      return withBody(TYPE_ID.result, frame.stream, body, "RESULT");
    }
    case "reset": {
      checkStreamId(frame.type, frame.stream);
      if (!Number.isInteger(frame.code) || frame.code < 0 || frame.code > 0xffff) {
        throw new ProtocolError("FRAME_MALFORMED", `RESET code must be a u16, not ${frame.code}`);
      }
      const reason = utf8Encoder.encode(frame.reason);
      if (reason.byteLength > MAX_RESET_REASON_SIZE) {
        throw new ProtocolError(
          "FRAME_MALFORMED",
          `a RESET reason is at most ${MAX_RESET_REASON_SIZE} bytes of UTF-8, not ${reason.byteLength}`,
        );
      }
      const bytes = header(TYPE_ID.reset, frame.stream, 2 + reason.byteLength);
      bytes[FRAME_HEADER_SIZE] = frame.code >>> 8;
      bytes[FRAME_HEADER_SIZE + 1] = frame.code & 0xff;
      bytes.set(reason, FRAME_HEADER_SIZE + 2);
      return bytes;
    }
    case "ping":
    case "pong": {
      if (frame.payload.byteLength !== PING_PAYLOAD_SIZE) {
        throw new ProtocolError(
          "FRAME_MALFORMED",
          `a ${frame.type.toUpperCase()} payload is exactly ${PING_PAYLOAD_SIZE} bytes, not ${frame.payload.byteLength}`,
        );
      }
      const bytes = header(TYPE_ID[frame.type], 0, PING_PAYLOAD_SIZE);
      bytes.set(frame.payload, FRAME_HEADER_SIZE);
      return bytes;
    }
    case "control": {
      const body = encodeJsonObject(frame.message, "CONTROL message");
      return withBody(TYPE_ID.control, 0, body, "CONTROL");
    }
    default:
      throw new ProtocolError(
        "FRAME_MALFORMED",
        `cannot encode a frame of type "${String((frame as { type: unknown }).type)}"`,
      );
  }
}

/**
 * The 5-byte header of a DATA frame whose payload the caller sends as a separate part, so a transport
 * that takes parts (the secure channel encrypts them one after the other) never copies the payload
 * into a frame first. header ‖ payload is byte for byte `encodeFrame({ type: "data", stream, data })`.
 */
export function encodeDataHeader(stream: number, size: number): Uint8Array {
  checkStreamId("data", stream);
  if (!Number.isInteger(size) || size < 1) {
    throw new ProtocolError("FRAME_MALFORMED", "a DATA frame must carry at least one byte");
  }
  if (size > MAX_DATA_PAYLOAD) {
    throw new ProtocolError(
      "FRAME_TOO_LARGE",
      `a DATA frame carries at most ${MAX_DATA_PAYLOAD} bytes, not ${size}`,
    );
  }
  return header(TYPE_ID.data, stream, 0);
}

/** Decodes one frame. Pure; a DATA frame's `data` is a view into `bytes`, not a copy. */
export function decodeFrame(bytes: Uint8Array): Frame {
  if (bytes.byteLength > MAX_FRAME_SIZE) {
    throw new ProtocolError(
      "FRAME_TOO_LARGE",
      `a ${bytes.byteLength}-byte frame exceeds the ${MAX_FRAME_SIZE}-byte limit`,
    );
  }
  if (bytes.byteLength < FRAME_HEADER_SIZE) {
    throw new ProtocolError(
      "FRAME_MALFORMED",
      `a frame is at least ${FRAME_HEADER_SIZE} bytes; this one is ${bytes.byteLength} (truncated)`,
    );
  }
  const typeId = bytes[0]!;
  const type = TYPE_NAME[typeId];
  if (typeId === BATCH_TYPE_ID) {
    throw new ProtocolError("FRAME_MALFORMED", "a BATCH is not a frame: it is never nested in a BATCH");
  }
  if (type === undefined) {
    throw new ProtocolError(
      "FRAME_UNKNOWN_TYPE",
      `frame type 0x${typeId.toString(16).padStart(2, "0")} is not known to this version`,
    );
  }
  const stream = readU32(bytes, 1);
  const bodySize = bytes.byteLength - FRAME_HEADER_SIZE;
  const name = type.toUpperCase();

  switch (type) {
    case "open": {
      requireStream(name, stream);
      if (bodySize < 1) throw new ProtocolError("FRAME_MALFORMED", "an OPEN frame has no stream kind");
      const kindId = bytes[FRAME_HEADER_SIZE]!;
      const kind = KIND_NAME[kindId];
      if (kind === undefined) {
        throw new ProtocolError("FRAME_MALFORMED", `OPEN names unknown stream kind ${kindId}`);
      }
      if (bodySize - 1 > MAX_META_SIZE) {
        throw new ProtocolError(
          "META_TOO_LARGE",
          `OPEN meta is ${bodySize - 1} bytes; the limit is ${MAX_META_SIZE}`,
        );
      }
      const meta = decodeJsonObject(bytes.subarray(FRAME_HEADER_SIZE + 1), "OPEN meta");
      return { type, stream, kind, meta };
    }
    case "accept":
    case "end":
      requireStream(name, stream);
      requireBodySize(name, bodySize, 0);
      return { type, stream };
    case "data":
      requireStream(name, stream);
      if (bodySize === 0) throw new ProtocolError("FRAME_MALFORMED", "a DATA frame carries no bytes");
      return { type, stream, data: bytes.subarray(FRAME_HEADER_SIZE) };
    case "window": {
      requireBodySize(name, bodySize, 4);
      const credit = readU32(bytes, FRAME_HEADER_SIZE);
      if (credit < 1 || credit > MAX_CREDIT) {
        throw new ProtocolError("FRAME_MALFORMED", `WINDOW credit must be 1..2^31-1, not ${credit}`);
      }
      return { type, stream, credit };
    }
    case "result": {
      requireStream(name, stream);
      const result = decodeJson(bytes.subarray(FRAME_HEADER_SIZE), "RESULT value");
      return { type, stream, result };
    }
    case "reset": {
      requireStream(name, stream);
      if (bodySize < 2) throw new ProtocolError("FRAME_MALFORMED", "a RESET frame has no code");
      if (bodySize - 2 > MAX_RESET_REASON_SIZE) {
        throw new ProtocolError(
          "FRAME_MALFORMED",
          `a RESET reason is at most ${MAX_RESET_REASON_SIZE} bytes, not ${bodySize - 2}`,
        );
      }
      const code = (bytes[FRAME_HEADER_SIZE]! << 8) | bytes[FRAME_HEADER_SIZE + 1]!;
      const reason = decodeUtf8(bytes.subarray(FRAME_HEADER_SIZE + 2), "RESET reason");
      return { type, stream, code, reason };
    }
    case "ping":
    case "pong":
      requireStreamZero(name, stream);
      requireBodySize(name, bodySize, PING_PAYLOAD_SIZE);
      return { type, payload: bytes.slice(FRAME_HEADER_SIZE) };
    case "control": {
      requireStreamZero(name, stream);
      const message = decodeJsonObject(bytes.subarray(FRAME_HEADER_SIZE), "CONTROL message");
      return { type, message };
    }
  }
}

/**
 * Decodes the plaintext of one transport message: a bare frame or a BATCH, into its frames in order.
 * The whole message is decoded before any frame is returned, so a malformed BATCH is refused as a
 * whole. DATA payloads are views into `bytes`.
 */
export function decodeMessage(bytes: Uint8Array): Frame[] {
  if (bytes.byteLength === 0 || bytes[0] !== BATCH_TYPE_ID) return [decodeFrame(bytes)];
  if (bytes.byteLength > MAX_MESSAGE_SIZE) {
    throw new ProtocolError(
      "FRAME_TOO_LARGE",
      `a ${bytes.byteLength}-byte BATCH exceeds the ${MAX_MESSAGE_SIZE}-byte limit`,
    );
  }
  if (bytes.byteLength < BATCH_HEADER_SIZE) {
    throw new ProtocolError("FRAME_MALFORMED", `a BATCH header is ${BATCH_HEADER_SIZE} bytes (truncated)`);
  }
  const stream = readU32(bytes, 1);
  if (stream !== 0) {
    throw new ProtocolError("FRAME_MALFORMED", `a BATCH belongs to stream 0, not stream ${stream}`);
  }
  if (bytes.byteLength === BATCH_HEADER_SIZE) {
    throw new ProtocolError("FRAME_MALFORMED", "an empty BATCH: a BATCH carries at least one frame");
  }
  const frames: Frame[] = [];
  let offset = BATCH_HEADER_SIZE;
  while (offset < bytes.byteLength) {
    const index = frames.length + 1;
    if (offset + BATCH_LENGTH_SIZE > bytes.byteLength) {
      throw new ProtocolError("FRAME_MALFORMED", `BATCH frame ${index}: its length is truncated`);
    }
    const length = (bytes[offset]! << 8) | bytes[offset + 1]!;
    offset += BATCH_LENGTH_SIZE;
    if (length > MAX_BATCHED_FRAME) {
      throw new ProtocolError(
        "FRAME_TOO_LARGE",
        `BATCH frame ${index} is ${length} bytes; a batched frame is at most ${MAX_BATCHED_FRAME}`,
      );
    }
    if (offset + length > bytes.byteLength) {
      throw new ProtocolError(
        "FRAME_MALFORMED",
        `BATCH frame ${index} claims ${length} bytes; ${bytes.byteLength - offset} remain (truncated)`,
      );
    }
    frames.push(decodeFrame(bytes.subarray(offset, offset + length)));
    offset += length;
  }
  return frames;
}

/** Bytes of a decoded message that were BATCH header and lengths rather than frames. */
export function batchOverhead(message: Uint8Array, frameCount: number): number {
  return message[0] === BATCH_TYPE_ID ? BATCH_HEADER_SIZE + BATCH_LENGTH_SIZE * frameCount : 0;
}

/** Joins encoded frames into one message: a lone frame stays bare, several become a BATCH. */
export function encodeMessage(frames: readonly Uint8Array[]): Uint8Array {
  if (frames.length === 0) throw new ProtocolError("FRAME_MALFORMED", "a message carries at least one frame");
  const builder = new MessageBuilder();
  for (const frame of frames) {
    if (frame.byteLength < FRAME_HEADER_SIZE) {
      throw new ProtocolError(
        "FRAME_MALFORMED",
        `a ${frame.byteLength}-byte frame is shorter than its header`,
      );
    }
    if (!builder.add(frame)) {
      throw new ProtocolError(
        "FRAME_TOO_LARGE",
        `${frames.length} frames of ${frames.map((f) => f.byteLength).join(", ")} bytes do not fit one ${MAX_MESSAGE_SIZE}-byte message`,
      );
    }
  }
  return Buffer.concat(builder.take());
}

/**
 * Fills one transport message with frames (see the module comment). Small frames are copied into one
 * buffer when the message is taken; DATA payloads of SPLIT_PART_FROM bytes or more stay separate parts,
 * for a transport whose sendParts encrypts part after part without joining them.
 */
export class MessageBuilder {
  /** Each frame as the parts it was handed in (a DATA header and payload are two). */
  #frames: Uint8Array[][] = [];
  /** Size of the message if taken now as a BATCH (header and length prefixes included). */
  #batchSize = BATCH_HEADER_SIZE;
  readonly #maxSize: number;

  /**
   * `maxSize` caps a message of several frames (a BATCH) below MAX_MESSAGE_SIZE, for a transport that
   * carries smaller messages more cheaply; a lone frame may still be up to MAX_FRAME_SIZE.
   */
  constructor(maxSize: number = MAX_MESSAGE_SIZE) {
    if (!Number.isInteger(maxSize) || maxSize < BATCH_HEADER_SIZE + BATCH_LENGTH_SIZE + FRAME_HEADER_SIZE) {
      throw new RangeError(`a message size cap must be an integer of at least 12 bytes, not ${maxSize}`);
    }
    this.#maxSize = Math.min(maxSize, MAX_MESSAGE_SIZE);
  }

  get frameCount(): number {
    return this.#frames.length;
  }

  /** Bytes the message would take if taken now (0 when empty). */
  get size(): number {
    if (this.#frames.length === 0) return 0;
    if (this.#frames.length === 1) return this.#batchSize - BATCH_HEADER_SIZE - BATCH_LENGTH_SIZE;
    return this.#batchSize;
  }

  /** The largest frame `add` accepts now: anything up to MAX_FRAME_SIZE while empty. */
  get room(): number {
    if (this.#frames.length === 0) return MAX_FRAME_SIZE;
    return Math.max(0, this.#maxSize - this.#batchSize - BATCH_LENGTH_SIZE);
  }

  /** Adds one encoded frame; false (and nothing added) when it does not fit. */
  add(frame: Uint8Array): boolean {
    return this.#push([frame], frame.byteLength);
  }

  /**
   * Adds DATA as header and payload without copying the payload, which may come in pieces (one frame
   * cut across the chunks an application wrote); false when it does not fit.
   */
  addData(stream: number, payload: Uint8Array | readonly Uint8Array[]): boolean {
    const pieces = payload instanceof Uint8Array ? [payload] : payload;
    let length = 0;
    for (const piece of pieces) length += piece.byteLength;
    const size = FRAME_HEADER_SIZE + length;
    if (size > this.room) return false;
    return this.#push([encodeDataHeader(stream, length), ...pieces], size);
  }

  #push(parts: Uint8Array[], size: number): boolean {
    if (size < FRAME_HEADER_SIZE || size > this.room) return false;
    this.#frames.push(parts);
    this.#batchSize += BATCH_LENGTH_SIZE + size;
    return true;
  }

  /** The message as parts to send in order, and an empty builder; [] when nothing was added. */
  take(): Uint8Array[] {
    const frames = this.#frames;
    const batchSize = this.#batchSize;
    this.#frames = [];
    this.#batchSize = BATCH_HEADER_SIZE;
    if (frames.length === 0) return [];
    if (frames.length === 1) {
      const parts = frames[0]!;
      // A lone small DATA frame is cheaper joined than encrypted as several parts.
      return parts.length > 1 && batchSize - BATCH_HEADER_SIZE - BATCH_LENGTH_SIZE < SPLIT_PART_FROM
        ? [Buffer.concat(parts)]
        : parts;
    }
    let copied = BATCH_HEADER_SIZE + BATCH_LENGTH_SIZE * frames.length;
    for (const parts of frames) {
      for (const part of parts) if (part.byteLength < SPLIT_PART_FROM) copied += part.byteLength;
    }
    const buffer = Buffer.allocUnsafe(copied);
    buffer[0] = BATCH_TYPE_ID;
    writeU32(buffer, 1, 0);
    const out: Uint8Array[] = [];
    let start = 0;
    let offset = BATCH_HEADER_SIZE;
    for (const parts of frames) {
      let length = 0;
      for (const part of parts) length += part.byteLength;
      buffer[offset] = length >>> 8;
      buffer[offset + 1] = length & 0xff;
      offset += BATCH_LENGTH_SIZE;
      for (const part of parts) {
        if (part.byteLength < SPLIT_PART_FROM) {
          buffer.set(part, offset);
          offset += part.byteLength;
        } else {
          if (offset > start) out.push(buffer.subarray(start, offset));
          out.push(part);
          start = offset;
        }
      }
    }
    if (offset > start) out.push(buffer.subarray(start, offset));
    if (offset !== copied || batchSize > MAX_MESSAGE_SIZE) {
      throw new Error(`MessageBuilder accounting is off (${offset}/${copied}, ${batchSize})`);
    }
    return out;
  }
}

/**
 * Parts from this size on stay separate when a BATCH is taken; smaller ones are cheaper to copy than to
 * encrypt as parts of their own.
 */
const SPLIT_PART_FROM = 2048;

function header(typeId: number, stream: number, bodySize: number): Uint8Array {
  const bytes = new Uint8Array(FRAME_HEADER_SIZE + bodySize);
  bytes[0] = typeId;
  writeU32(bytes, 1, stream);
  return bytes;
}

// Big-endian by hand rather than through a DataView per frame: these run for every frame.
function writeU32(bytes: Uint8Array, offset: number, value: number): void {
  bytes[offset] = value >>> 24;
  bytes[offset + 1] = (value >>> 16) & 0xff;
  bytes[offset + 2] = (value >>> 8) & 0xff;
  bytes[offset + 3] = value & 0xff;
}

function readU32(bytes: Uint8Array, offset: number): number {
  return (
    ((bytes[offset]! << 24) | (bytes[offset + 1]! << 16) | (bytes[offset + 2]! << 8) | bytes[offset + 3]!) >>>
    0
  );
}

function withBody(typeId: number, stream: number, body: Uint8Array, name: string): Uint8Array {
  if (FRAME_HEADER_SIZE + body.byteLength > MAX_FRAME_SIZE) {
    throw new ProtocolError(
      "FRAME_TOO_LARGE",
      `a ${name} frame would be ${FRAME_HEADER_SIZE + body.byteLength} bytes; the limit is ${MAX_FRAME_SIZE}`,
    );
  }
  const bytes = header(typeId, stream, body.byteLength);
  bytes.set(body, FRAME_HEADER_SIZE);
  return bytes;
}

function checkStreamId(type: Frame["type"], stream: number): void {
  if (!Number.isInteger(stream) || stream < 1 || stream > MAX_STREAM_ID) {
    throw new ProtocolError(
      "FRAME_MALFORMED",
      `a ${type.toUpperCase()} frame needs a stream id in 1..2^32-1, not ${stream}`,
    );
  }
}

function requireStream(name: string, stream: number): void {
  if (stream === 0) throw new ProtocolError("FRAME_MALFORMED", `a ${name} frame may not use stream 0`);
}

function requireStreamZero(name: string, stream: number): void {
  if (stream !== 0) {
    throw new ProtocolError("FRAME_MALFORMED", `a ${name} frame belongs to stream 0, not stream ${stream}`);
  }
}

function requireBodySize(name: string, actual: number, expected: number): void {
  if (actual !== expected) {
    throw new ProtocolError(
      "FRAME_MALFORMED",
      `a ${name} frame has a ${expected}-byte body, not ${actual} (truncated or padded)`,
    );
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function encodeJson(value: unknown, what: string): Uint8Array {
  let text: string | undefined;
  try {
    text = JSON.stringify(value);
  } catch (error) {
    throw new ProtocolError("FRAME_MALFORMED", `${what} cannot be serialised as JSON`, { cause: error });
  }
  if (text === undefined) throw new ProtocolError("FRAME_MALFORMED", `${what} is not a JSON value`);
  // Buffer.from takes small strings from Node's pool; TextEncoder allocates each time (2 % of the
  // edge's CPU in scenario 1, one OPEN per session). Same bytes: JSON.stringify output is well-formed.
  return Buffer.from(text, "utf8");
}

function encodeJsonObject(value: Record<string, unknown>, what: string): Uint8Array {
  if (!isPlainObject(value)) throw new ProtocolError("FRAME_MALFORMED", `${what} must be a JSON object`);
  return encodeJson(value, what);
}

function decodeUtf8(bytes: Uint8Array, what: string): string {
  try {
    return utf8Decoder.decode(bytes);
  } catch (error) {
    throw new ProtocolError("FRAME_MALFORMED", `${what} is not valid UTF-8`, { cause: error });
  }
}

/** Drops "__proto__" keys so a peer's JSON can never reach a prototype through later merges. */
function safeReviver(key: string, value: unknown): unknown {
  return key === "__proto__" ? undefined : value;
}

function decodeJson(bytes: Uint8Array, what: string): unknown {
  const text = decodeUtf8(bytes, what);
  try {
    // A reviver makes JSON.parse about 3× slower (one OPEN per session: 2 % of home's CPU in
    // scenario 1). Without a backslash no key can spell "__proto__" in escapes, so text without
    // either has nothing for the reviver to drop.
    if (!text.includes("\\") && !text.includes("__proto__")) return JSON.parse(text);
    return JSON.parse(text, safeReviver);
  } catch (error) {
    throw new ProtocolError("FRAME_MALFORMED", `${what} is not valid JSON`, { cause: error });
  }
}

function decodeJsonObject(bytes: Uint8Array, what: string): Record<string, unknown> {
  const value = decodeJson(bytes, what);
  if (!isPlainObject(value)) throw new ProtocolError("FRAME_MALFORMED", `${what} is not a JSON object`);
  return value;
}
