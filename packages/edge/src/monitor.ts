// What the running edge remembers for `status` and metrics beyond its live objects: since when each
// home's tunnel is down, each connected home's clock skew, today's message counts (counters since UTC
// midnight), and the last errors.
import { PeerClockWatch } from "@mxtunnel/shared";
import type { TunnelServer } from "./tunnel-server.js";

export interface DailyCounts {
  /** UTC date, YYYY-MM-DD. */
  date: string;
  inboundSessions: number;
  spooled: number;
  drained: number;
  relayed: number;
  delivered: number;
  failed: number;
}

export type Totals = Omit<DailyCounts, "date">;

export interface RecentError {
  at: string;
  message: string;
}

const MAX_ERRORS = 10;

export class EdgeMonitor {
  private readonly downSince = new Map<string, number>();
  private readonly clocks = new Map<string, PeerClockWatch>();
  private readonly errors: RecentError[] = [];
  private day: string;
  private baseline: Totals;
  private readonly timer: NodeJS.Timeout;

  constructor(
    tunnels: TunnelServer,
    private readonly totals: () => Totals,
    readonly startedAt: number,
    private readonly now: () => number = Date.now,
  ) {
    this.day = utcDate(now());
    this.baseline = zero();
    tunnels.on("up", (tunnel) => {
      this.downSince.delete(tunnel.home.publicKey);
      this.clocks.get(tunnel.home.publicKey)?.stop();
      this.clocks.set(tunnel.home.publicKey, new PeerClockWatch(tunnel.mux));
    });
    tunnels.on("down", (tunnel, reason) => {
      if (tunnels.tunnelOf(tunnel.home.publicKey)) return; // replaced by a newer tunnel
      this.downSince.set(tunnel.home.publicKey, this.now());
      this.error(`tunnel of home ${tunnel.home.name} down: ${reason}`);
    });
    // Counters roll over at UTC midnight; checked every minute so no status call is needed for it.
    this.timer = setInterval(() => this.roll(), 60_000);
    this.timer.unref();
  }

  stop(): void {
    clearInterval(this.timer);
    for (const clock of this.clocks.values()) clock.stop();
  }

  /** The home's clock minus ours as last measured over its current tunnel (null: not connected or not answered). */
  clockSkewMs(homePublicKey: string): number | null {
    return this.clocks.get(homePublicKey)?.skewMs ?? null;
  }

  /** When the home's tunnel went down (the agent's start if it never came up since). */
  homeDownSince(homePublicKey: string): number {
    return this.downSince.get(homePublicKey) ?? this.startedAt;
  }

  error(message: string): void {
    this.errors.push({ at: new Date(this.now()).toISOString(), message: message.slice(0, 300) });
    if (this.errors.length > MAX_ERRORS) this.errors.shift();
  }

  recentErrors(): RecentError[] {
    return [...this.errors].reverse();
  }

  today(): DailyCounts {
    this.roll();
    const current = this.totals();
    const out = { date: this.day } as DailyCounts;
    for (const key of Object.keys(current) as (keyof Totals)[]) out[key] = current[key] - this.baseline[key];
    return out;
  }

  private roll(): void {
    const day = utcDate(this.now());
    if (day === this.day) return;
    this.day = day;
    this.baseline = this.totals();
  }
}

function zero(): Totals {
  return { inboundSessions: 0, spooled: 0, drained: 0, relayed: 0, delivered: 0, failed: 0 };
}

function utcDate(ms: number): string {
  return new Date(ms).toISOString().slice(0, 10);
}
