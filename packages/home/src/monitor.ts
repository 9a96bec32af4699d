// What the running home remembers for `status` beyond its live objects: since when each edge's
// tunnel is down, each connected edge's clock skew, today's counts (counters since UTC midnight), and
// the last errors.
import { type Mux, PeerClockWatch } from "@mxtunnel/shared";
import type { EdgeLink } from "./edge-link.js";

export interface HomeDailyCounts {
  /** UTC date, YYYY-MM-DD. */
  date: string;
  /** Live connections the edges forwarded to a local service. */
  forwarded: number;
  /** Spooled messages handed to Postfix after the edge held them. */
  injectedFromSpool: number;
  /** Outbound messages the edge queued for us. */
  relayed: number;
  /** Outbound messages refused or deferred (by us or the edge). */
  relayRefused: number;
}

export type HomeTotals = Omit<HomeDailyCounts, "date">;

const MAX_ERRORS = 10;

export class HomeMonitor {
  private readonly downSince = new Map<EdgeLink, number>();
  private readonly clocks = new Map<EdgeLink, PeerClockWatch>();
  private readonly errors: { at: string; message: string }[] = [];
  private day: string;
  private baseline: HomeTotals = { forwarded: 0, injectedFromSpool: 0, relayed: 0, relayRefused: 0 };
  private readonly timer: NodeJS.Timeout;

  constructor(
    private readonly totals: () => HomeTotals,
    readonly startedAt: number,
  ) {
    this.day = new Date().toISOString().slice(0, 10);
    this.timer = setInterval(() => this.roll(), 60_000);
    this.timer.unref();
  }

  watch(link: EdgeLink): void {
    link.on("up", (mux: Mux) => {
      this.downSince.delete(link);
      this.clocks.get(link)?.stop();
      this.clocks.set(link, new PeerClockWatch(mux));
    });
    link.on("down", (reason) => {
      this.downSince.set(link, Date.now());
      this.error(`tunnel to ${link.edge.hostname} down: ${reason}`);
    });
  }

  stop(): void {
    clearInterval(this.timer);
    for (const clock of this.clocks.values()) clock.stop();
  }

  /** The edge's clock minus ours as last measured over its current tunnel (null: not connected or not answered). */
  clockSkewMs(link: EdgeLink): number | null {
    return this.clocks.get(link)?.skewMs ?? null;
  }

  edgeDownSince(link: EdgeLink): number {
    return this.downSince.get(link) ?? this.startedAt;
  }

  error(message: string): void {
    this.errors.push({ at: new Date().toISOString(), message: message.slice(0, 300) });
    if (this.errors.length > MAX_ERRORS) this.errors.shift();
  }

  recentErrors(): { at: string; message: string }[] {
    return [...this.errors].reverse();
  }

  today(): HomeDailyCounts {
    this.roll();
    const current = this.totals();
    return {
      date: this.day,
      forwarded: current.forwarded - this.baseline.forwarded,
      injectedFromSpool: current.injectedFromSpool - this.baseline.injectedFromSpool,
      relayed: current.relayed - this.baseline.relayed,
      relayRefused: current.relayRefused - this.baseline.relayRefused,
    };
  }

  private roll(): void {
    const day = new Date().toISOString().slice(0, 10);
    if (day === this.day) return;
    this.day = day;
    this.baseline = this.totals();
  }
}
