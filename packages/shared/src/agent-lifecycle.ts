// What both agents do around their parts: hold the state directory's lock while they run, undo what
// they started in reverse order (once, on stop or when starting fails), hand each stream and CONTROL
// message a peer sends to the feature registered for it, and run until the shutdown signal.
import type net from "node:net";
import type { MuxStream } from "./mux.js";
import { ResetCode, type StreamKind } from "./wire.js";

/** Steps that undo a start, run last-in first-out; a failing step does not stop the others. */
export class CleanupStack {
  readonly #steps: (() => Promise<void>)[] = [];
  #done: Promise<void> | undefined;

  push(step: () => Promise<void>): void {
    this.#steps.push(step);
  }

  /** Runs every step once; later calls wait for the same run. */
  run(): Promise<void> {
    this.#done ??= (async () => {
      for (const step of this.#steps.reverse()) await step().catch(() => {});
    })();
    return this.#done;
  }
}

/**
 * Takes the state directory's lock for an agent's life: the returned stack releases it last.
 * The caller pushes a step for each part it starts and runs the stack on stop or on a failed start.
 */
export async function holdStateLock(
  acquire: () => Promise<{ release(): Promise<void> }>,
): Promise<CleanupStack> {
  const lock = await acquire();
  const cleanups = new CleanupStack();
  cleanups.push(() => lock.release());
  return cleanups;
}

/** A cleanup step that closes a listening server. */
export function closeServer(server: net.Server): () => Promise<void> {
  return () => new Promise<void>((resolve) => server.close(() => resolve()));
}

export type PeerStreamHandler<Peer> = (stream: MuxStream, peer: Peer) => void;
export type PeerControlHandler<Peer> = (message: Record<string, unknown>, peer: Peer) => void;

/**
 * Streams and CONTROL messages from a peer, dispatched by kind: each feature registers its handler;
 * a stream of a kind nobody serves is refused with `refusal(kind)` as the reason.
 */
export class PeerDispatch<Peer> {
  readonly #streams = new Map<StreamKind, PeerStreamHandler<Peer>>();
  readonly #controls: PeerControlHandler<Peer>[] = [];

  constructor(private readonly refusal: (kind: StreamKind) => string) {}

  onStream(kind: StreamKind, handler: PeerStreamHandler<Peer>): void {
    this.#streams.set(kind, handler);
  }

  onControl(handler: PeerControlHandler<Peer>): void {
    this.#controls.push(handler);
  }

  readonly stream = (stream: MuxStream, peer: Peer): void => {
    const handler = this.#streams.get(stream.kind);
    if (handler) handler(stream, peer);
    else stream.reset(ResetCode.REFUSED, this.refusal(stream.kind));
  };

  readonly control = (message: Record<string, unknown>, peer: Peer): void => {
    for (const handler of this.#controls) handler(message, peer);
  };
}

/** Resolves when the signal aborts (at once when it already has). */
export function untilAborted(signal: AbortSignal): Promise<void> {
  return new Promise<void>((resolve) => {
    if (signal.aborted) return resolve();
    signal.addEventListener("abort", () => resolve(), { once: true });
  });
}
