// Group commit: many callers, few runs of one durable step (an fsync, an append). A caller is served
// by the first run that starts after its request, so whatever it did before asking is covered; the
// requests that arrive while a run is in flight, or while the next one waits for its turn, share it.
// With a minimum interval, runs start at least that far apart: a lone request still runs at once,
// a burst right after a run waits and goes out in one.

export class GroupCommit {
  #running: Promise<void> | undefined;
  #next: Promise<void> | undefined;
  #lastStart = Number.NEGATIVE_INFINITY;

  constructor(
    private readonly step: () => Promise<void>,
    private readonly minIntervalMs = 0,
  ) {}

  /** Resolves once a run of the step that started after this call has finished; rejects if it failed. */
  request(): Promise<void> {
    if (this.#next) return this.#next;
    if (!this.#running && this.#untilNextStart() <= 0) return this.#start();
    const before = this.#running?.catch(() => {}) ?? Promise.resolve();
    this.#next = before.then(async () => {
      const wait = this.#untilNextStart();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      this.#next = undefined;
      return this.#start();
    });
    return this.#next;
  }

  #untilNextStart(): number {
    return this.#lastStart + this.minIntervalMs - performance.now();
  }

  #start(): Promise<void> {
    this.#lastStart = performance.now();
    const run = (async () => this.step())().finally(() => {
      if (this.#running === run) this.#running = undefined;
    });
    this.#running = run;
    return run;
  }
}
