import { describe, expect, it } from "vitest";
import { buildDsn, headerBlock, parseNotify, rfc5322Date, wantsFailureDsn } from "../src/dsn.js";

const original = Buffer.from(
  "From: alice@home.test\r\nTo: bob@remote.test\r\nSubject: hello\r\nMessage-ID: <m1@home.test>\r\n\r\nsecret body\r\n",
);

const base = {
  reportingMta: "mx.edge.test",
  sender: "alice@home.test",
  original,
  now: new Date(Date.UTC(2025, 2, 4, 10, 0, 0)),
  arrivalDate: new Date(Date.UTC(2025, 2, 4, 9, 0, 0)),
  boundary: "B0UNDARY",
  messageId: "<dsn1@mx.edge.test>",
};

describe("DSN builder (RFC 3464)", () => {
  it("builds multipart/report with a human part, per-recipient status and the original headers", () => {
    const dsn = buildDsn({
      ...base,
      envelopeId: "ENV123",
      recipients: [
        {
          address: "bob@remote.test",
          originalRecipient: "rfc822;bob@remote.test",
          action: "failed",
          status: "5.1.1",
          diagnostic: "550 5.1.1 no such user",
          remoteMta: "mx.remote.test",
          lastAttempt: new Date(Date.UTC(2025, 2, 4, 9, 30, 0)),
        },
        {
          address: "carol@remote.test",
          action: "delayed",
          status: "4.4.1",
          diagnostic: "connection refused",
        },
      ],
    }).toString("latin1");
    expect(dsn).toContain(
      'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="B0UNDARY"',
    );
    expect(dsn).toContain(
      "From: Mail Delivery System <MAILER-DAEMON@mx.edge.test>\r\nTo: <alice@home.test>\r\n",
    );
    expect(dsn).toContain("Subject: Undelivered Mail Returned to Sender\r\n");
    expect(dsn).toContain("Date: Tue, 04 Mar 2025 10:00:00 +0000\r\n");
    expect(dsn).toContain("Auto-Submitted: auto-replied\r\n");
    expect(dsn).toContain(
      "Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.edge.test\r\nOriginal-Envelope-Id: ENV123\r\nArrival-Date: Tue, 04 Mar 2025 09:00:00 +0000\r\n\r\n" +
        "Original-Recipient: rfc822;bob@remote.test\r\nFinal-Recipient: rfc822; bob@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\n" +
        "Remote-MTA: dns; mx.remote.test\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\nLast-Attempt-Date: Tue, 04 Mar 2025 09:30:00 +0000\r\n\r\n" +
        "Final-Recipient: rfc822; carol@remote.test\r\nAction: delayed\r\nStatus: 4.4.1\r\n",
    );
    expect(dsn).toContain(
      "Content-Type: text/rfc822-headers\r\n\r\nFrom: alice@home.test\r\nTo: bob@remote.test\r\nSubject: hello\r\nMessage-ID: <m1@home.test>\r\n",
    );
    expect(dsn).not.toContain("secret body");
    expect(dsn.endsWith("--B0UNDARY--\r\n")).toBe(true);
    expect(dsn).not.toMatch(/[^\r]\n/); // CRLF only
  });

  it("returns the whole message for RET=FULL", () => {
    const dsn = buildDsn({
      ...base,
      returnFull: true,
      recipients: [{ address: "bob@remote.test", action: "failed", status: "5.0.0" }],
    }).toString();
    expect(dsn).toContain("Content-Type: message/rfc822\r\n\r\nFrom: alice@home.test");
    expect(dsn).toContain("secret body");
  });

  it("refuses input that would make a broken or looping DSN", () => {
    const r = [{ address: "bob@remote.test", action: "failed" as const, status: "5.1.1" }];
    expect(() => buildDsn({ ...base, sender: "", recipients: r })).toThrow(/no DSN|sender/);
    expect(() => buildDsn({ ...base, recipients: [] })).toThrow(/at least one recipient/);
    expect(() => buildDsn({ ...base, recipients: [{ ...r[0]!, status: "550" }] })).toThrow(/X\.Y\.Z/);
    expect(() =>
      buildDsn({ ...base, recipients: [{ ...r[0]!, diagnostic: "x\r\nBcc: evil@x.test" }] }),
    ).toThrow(/line break/);
    expect(() => buildDsn({ ...base, sender: "a@b.test\r\nX: y", recipients: r })).toThrow(/line break/);
  });

  it("adds a note to the human-readable part, one line each, and refuses a line break in it", () => {
    const r = [{ address: "bob@remote.test", action: "failed" as const, status: "5.1.1" }];
    const dsn = buildDsn({ ...base, recipients: r, note: ["first line", "second line"] }).toString();
    expect(dsn).toMatch(
      /<bob@remote\.test>: status 5\.1\.1\r\n\r\nfirst line\r\nsecond line\r\n\r\n--B0UNDARY/,
    );
    expect(() => buildDsn({ ...base, recipients: r, note: ["a\r\nb"] })).toThrow(/note must not contain/);
  });

  it("reads NOTIFY as RFC 3461 defines it", () => {
    expect(parseNotify(undefined)).toEqual(["FAILURE", "DELAY"]);
    expect(parseNotify("never")).toEqual([]);
    expect(parseNotify("Success,FAILURE,success")).toEqual(["SUCCESS", "FAILURE"]);
    expect(parseNotify("NEVER,SUCCESS")).toBeUndefined();
    expect(parseNotify("sometimes")).toBeUndefined();
    expect(wantsFailureDsn(undefined)).toBe(true);
    expect(wantsFailureDsn("DELAY,failure")).toBe(true);
    expect(wantsFailureDsn("NEVER")).toBe(false);
    expect(wantsFailureDsn("SUCCESS,DELAY")).toBe(false);
    // Not valid NOTIFY (a file spooled before it was checked): as if absent.
    expect(wantsFailureDsn("bogus")).toBe(true);
  });

  it("extracts header blocks and formats dates", () => {
    expect(headerBlock(Buffer.from("A: 1\nB: 2\n\nbody"))).toBe("A: 1\r\nB: 2");
    expect(headerBlock(Buffer.from("A: 1\r\n"))).toBe("A: 1\r\n");
    expect(rfc5322Date(new Date(Date.UTC(2024, 11, 31, 23, 59, 59)))).toBe("Tue, 31 Dec 2024 23:59:59 +0000");
  });
});
