// Whether a spooled message's sender is genuine, decided at spool time: SPF for the envelope
// sender, or a DKIM signature aligned with its domain. A backup MX that later cannot deliver
// sends a DSN only when this passed; otherwise the message is quarantined, so a forged sender
// never receives backscatter. DKIM needs the body, which the edge cannot read once it is sealed,
// so the check runs while the message streams in.
import { promises as dns } from "node:dns";
import { PassThrough } from "node:stream";
import { authenticate } from "mailauth";

export interface SenderAuth {
  spf: string;
  dkimAligned: boolean;
  /** SPF pass or aligned DKIM pass: a DSN to the envelope sender is safe. */
  dsnAllowed: boolean;
  checkedAt: string;
}

export type DnsResolve = (name: string, rrtype: string) => Promise<unknown>;

export function resolverFor(servers: readonly string[]): DnsResolve {
  if (servers.length === 0) return (name, rrtype) => dns.resolve(name, rrtype as "TXT");
  const resolver = new dns.Resolver({ timeout: 3000, tries: 2 });
  resolver.setServers([...servers]);
  return (name, rrtype) => resolver.resolve(name, rrtype as "TXT");
}

/** Feeds the message as it arrives; `result` settles once the message ended and DNS answered. */
export class SenderAuthCheck {
  private readonly input = new PassThrough();
  readonly result: Promise<SenderAuth | undefined>;

  constructor(context: {
    ip: string;
    helo: string;
    sender: string;
    mta: string;
    resolve: DnsResolve;
    timeoutMs: number;
  }) {
    const checking = authenticate(this.input, {
      ip: context.ip,
      helo: context.helo,
      sender: context.sender,
      mta: context.mta,
      resolver: context.resolve,
      // Only SPF and DKIM decide; DMARC would cost DNS lookups and CPU for a result nobody reads.
      disableArc: true,
      disableDmarc: true,
      disableBimi: true,
    } as never) as Promise<{
      spf?: { status?: { result?: string } };
      dkim?: { results?: { status?: { result?: string }; signingDomain?: string }[] };
    }>;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), context.timeoutMs);
      timer.unref();
    });
    this.result = Promise.race([
      checking.then((outcome) => {
        const spf = outcome.spf?.status?.result ?? "none";
        const domain = context.sender.slice(context.sender.lastIndexOf("@") + 1).toLowerCase();
        const dkimAligned = (outcome.dkim?.results ?? []).some(
          (r) => r.status?.result === "pass" && aligned(domain, (r.signingDomain ?? "").toLowerCase()),
        );
        return {
          spf,
          dkimAligned,
          dsnAllowed: Boolean(domain) && (spf === "pass" || dkimAligned),
          checkedAt: new Date().toISOString(),
        };
      }),
      timeout,
    ])
      .catch(() => undefined)
      .finally(() => clearTimeout(timer));
  }

  write(chunk: Buffer): void {
    this.input.write(chunk);
  }

  end(): void {
    this.input.end();
  }
}

/** Relaxed alignment: the signing domain is the sender's domain or a parent of it. */
function aligned(senderDomain: string, signingDomain: string): boolean {
  return (
    Boolean(signingDomain) && (senderDomain === signingDomain || senderDomain.endsWith(`.${signingDomain}`))
  );
}
