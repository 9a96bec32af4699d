// Bounds the dead Buffers a bulk stream leaves between garbage collections. Each 64 KiB that crosses
// an agent costs off-heap memory (the socket read, the cipher's output) whose JS objects are tiny:
// it is freed only when a scavenge finds them dead. V8 scavenges when its young generation fills
// with JS objects (tens of MiB of relayed data apart with a 1-2 MiB semi-space) or when young
// ArrayBuffers hold 2 × its default semi-space maximum (32 MiB on 64-bit, whatever the flags say),
// so up to ≈ 32 MiB of garbage sat on top of an agent's RSS at every peak. The pacer asks for a
// scavenge (a minor GC: a fraction of a millisecond with a small young generation) after a fixed
// amount of tunnel traffic instead. It needs `gc`, i.e. node's --expose-gc (the bins' shebangs);
// without it, it does nothing.

/** Tunnel traffic (Noise messages, both ways) between paced scavenges; ≈ twice that in Buffers dies. */
export const GC_PACE_BYTES = 8 * 1024 * 1024;

export class GcPacer {
  readonly #budget: number;
  readonly #collect: (() => void) | undefined;
  #count = 0;
  #pending = false;

  /** `collect` runs a young-generation GC; undefined makes note() a no-op. */
  constructor(budgetBytes: number, collect: (() => void) | undefined) {
    if (!Number.isSafeInteger(budgetBytes) || budgetBytes < 1) {
      throw new RangeError(`a GC pace must be a positive integer byte count, not ${budgetBytes}`);
    }
    this.#budget = budgetBytes;
    this.#collect = collect;
  }

  get active(): boolean {
    return this.#collect !== undefined;
  }

  /**
   * Counts `bytes` of traffic; past the budget a scavenge runs at the end of this turn's I/O (in a
   * setImmediate, when this turn's transient objects are dead and cheap to skip), at most one queued.
   */
  note(bytes: number): void {
    if (this.#collect === undefined) return;
    this.#count += bytes;
    if (this.#count < this.#budget || this.#pending) return;
    this.#pending = true;
    setImmediate(this.#run);
  }

  readonly #run = (): void => {
    this.#pending = false;
    // Whatever was counted until now is collected now.
    this.#count = 0;
    this.#collect?.();
  };
}

function exposedMinorGc(): (() => void) | undefined {
  const gc = globalThis.gc;
  return typeof gc === "function" ? () => gc({ type: "minor" }) : undefined;
}

/** The process-wide pacer every SecureChannel reports to by default. */
export const defaultGcPacer = new GcPacer(GC_PACE_BYTES, exposedMinorGc());
