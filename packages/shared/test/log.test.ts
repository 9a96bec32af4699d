import { Writable } from "node:stream";
import { describe, expect, it } from "vitest";
import { createLogger, REDACTED } from "../src/log.js";

function capture() {
  const lines: string[] = [];
  const stream = new Writable({
    write(chunk, _encoding, callback) {
      lines.push(...chunk.toString().split("\n").filter(Boolean));
      callback();
    },
  });
  return { stream, records: () => lines.map((line) => JSON.parse(line) as Record<string, unknown>) };
}

describe("createLogger", () => {
  it("writes JSON lines with name, level and message", () => {
    const out = capture();
    const log = createLogger({ name: "edge", level: "debug", destination: out.stream });
    log.debug({ session: "s1" }, "hello");
    log.trace("hidden");
    const [record, ...rest] = out.records();
    expect(rest).toEqual([]);
    expect(record).toMatchObject({ name: "edge", level: 20, session: "s1", msg: "hello" });
  });

  it("censors secrets at any reasonable depth", () => {
    const out = capture();
    const log = createLogger({ name: "home", destination: out.stream });
    const token = "mxt1_AQAAAAAAsecretTOKENtext";
    log.info(
      {
        token,
        secret: "s3cr3t-top",
        privateKey: "PRIVATEKEY-top",
        pair: { token, psk: "PSK-nested" },
        config: { relayAuth: { users: { postfix: "hunter2" } }, deep: { a: { b: { password: "pw-deep" } } } },
        relayAuth: { users: { alice: "alice-pw" } },
        auth: { user: "u", pass: "nodemailer-pass" },
        list: [{ secret: "in-array" }],
      },
      "pairing",
    );
    const line = JSON.stringify(out.records()[0]);
    for (const leak of [
      token,
      "s3cr3t-top",
      "PRIVATEKEY-top",
      "PSK-nested",
      "hunter2",
      "pw-deep",
      "alice-pw",
      "nodemailer-pass",
      "in-array",
    ]) {
      expect(line).not.toContain(leak);
    }
    expect(line).toContain(REDACTED);
    expect(out.records()[0]).toMatchObject({
      token: REDACTED,
      pair: { token: REDACTED },
      auth: { user: "u" },
    });
  });

  it("child loggers keep redaction", () => {
    const out = capture();
    const child = createLogger({ name: "edge", destination: out.stream }).child({ stream: 3 });
    child.warn({ secret: "child-secret" }, "x");
    expect(JSON.stringify(out.records())).not.toContain("child-secret");
  });

  it("refuses an unknown level", () => {
    expect(() => createLogger({ name: "x", level: "verbose" })).toThrow(/verbose/);
  });
});
