// Group commit: many callers, few runs of one durable step (an fsync, an append). A caller is served
// by the first run that starts after its request, so whatever it did before asking is covered; the
// requests that arrive while a run is in flight share the next run.

export class GroupCommit {
  #running: Promise<void> | undefined;
  #next: Promise<void> | undefined;

  constructor(private readonly step: () => Promise<void>) {}

  /** Resolves once a run of the step that started after this call has finished; rejects if it failed. */
  request(): Promise<void> {
    if (this.#next) return this.#next;
    if (!this.#running) return this.#start();
    this.#next = this.#running
      .catch(() => {})
      .then(() => {
        this.#next = undefined;
        return this.#start();
      });
    return this.#next;
  }

  #start(): Promise<void> {
    const run = (async () => this.step())().finally(() => {
      if (this.#running === run) this.#running = undefined;
    });
    this.#running = run;
    return run;
  }
}
