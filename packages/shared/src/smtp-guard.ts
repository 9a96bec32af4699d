// SMTP smuggling defence shared by every place mxtunnel receives message data (the edge's spool,
// home's relay listener): a message containing a bare CR, a bare LF or a NUL could be read as two
// messages by another MTA, so it is refused whole (550 5.6.0), never passed on.
/** Scans message bytes chunk by chunk; remembers the first hazard it sees. */
export class LineEndingScanner {
  violation: "NUL" | "bare LF" | "bare CR" | undefined;
  private previous = 0;

  scan(chunk: Uint8Array): void {
    if (this.violation) return;
    for (let i = 0; i < chunk.length; i++) {
      const byte = chunk[i]!;
      if (byte === 0) {
        this.violation = "NUL";
        return;
      }
      if (byte === 0x0a && this.previous !== 0x0d) {
        this.violation = "bare LF";
        return;
      }
      if (this.previous === 0x0d && byte !== 0x0a) {
        this.violation = "bare CR";
        return;
      }
      this.previous = byte;
    }
  }

  finish(): void {
    if (!this.violation && this.previous === 0x0d) this.violation = "bare CR";
  }
}

/** The first smuggling hazard in a whole message, if any. */
export function smugglingViolation(message: Uint8Array): LineEndingScanner["violation"] {
  const scanner = new LineEndingScanner();
  scanner.scan(message);
  scanner.finish();
  return scanner.violation;
}
