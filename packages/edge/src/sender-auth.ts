// Whether a spooled message's sender is genuine, decided at spool time: SPF for the envelope
// sender, or a DKIM signature aligned with its domain. A backup MX that later cannot deliver
// sends a DSN only when this passed; otherwise the message is quarantined, so a forged sender
// never receives backscatter. DKIM needs the body, which the edge cannot read once it is sealed,
// so the check runs while the message streams in; a message whose header has no DKIM-Signature
// field is not parsed further (it cannot pass DKIM), and DNS answers are shared for a short while.
import { promises as dns } from "node:dns";
import { PassThrough, type Readable } from "node:stream";

// mailauth (and the public-suffix data it loads) costs ≈ 24 MiB of RSS: loaded on the first sender
// check, i.e. only once the edge spools, not by an edge that only splices live mail.
let mailauth: Promise<typeof import("mailauth")> | undefined;
const loadMailauth = () => {
  mailauth ??= import("mailauth");
  return mailauth;
};

export interface SenderAuth {
  spf: string;
  dkimAligned: boolean;
  /** SPF pass or aligned DKIM pass: a DSN to the envelope sender is safe. */
  dsnAllowed: boolean;
  checkedAt: string;
}

export type DnsResolve = (name: string, rrtype: string) => Promise<unknown>;

/** How long a DNS answer (or "no such name") is reused: a burst from one sender costs one lookup. */
const DNS_CACHE_MS = 30_000;
const DNS_CACHE_ENTRIES = 10_000;
/** Answers worth reusing when negative: the name or record does not exist. */
const CACHEABLE_DNS_ERRORS = new Set(["ENOTFOUND", "ENODATA"]);

export function resolverFor(servers: readonly string[]): DnsResolve {
  if (servers.length === 0) return cachingResolver((name, rrtype) => dns.resolve(name, rrtype as "TXT"));
  const resolver = new dns.Resolver({ timeout: 3000, tries: 2 });
  resolver.setServers([...servers]);
  return cachingResolver((name, rrtype) => resolver.resolve(name, rrtype as "TXT"));
}

/**
 * Shares each answer (and each "no such name or record") for DNS_CACHE_MS, including a lookup
 * still in flight; a timeout or server failure is asked again next time.
 */
export function cachingResolver(lookup: DnsResolve, now: () => number = Date.now): DnsResolve {
  const answers = new AnswerCache(now, (error) =>
    CACHEABLE_DNS_ERRORS.has((error as NodeJS.ErrnoException).code ?? ""),
  );
  return (name, rrtype) => answers.get(`${rrtype} ${name.toLowerCase()}`, () => lookup(name, rrtype));
}

/**
 * Promises shared by key for DNS_CACHE_MS (at most DNS_CACHE_ENTRIES, oldest dropped first). A
 * rejection stays only if `keepRejection` says so.
 */
export class AnswerCache {
  private readonly entries = new Map<string, { expires: number; answer: Promise<unknown> }>();

  constructor(
    private readonly now: () => number = Date.now,
    private readonly keepRejection: (error: unknown) => boolean = () => false,
  ) {}

  get<T>(key: string, compute: () => Promise<T>): Promise<T> {
    const cached = this.entries.get(key);
    if (cached && cached.expires > this.now()) return cached.answer as Promise<T>;
    this.entries.delete(key);
    if (this.entries.size >= DNS_CACHE_ENTRIES)
      this.entries.delete(this.entries.keys().next().value as string);
    const answer = compute();
    this.entries.set(key, { expires: this.now() + DNS_CACHE_MS, answer });
    answer.catch((error: unknown) => {
      if (!this.keepRejection(error) && this.entries.get(key)?.answer === answer) this.entries.delete(key);
    });
    return answer;
  }
}

/** The header section is scanned for DKIM-Signature up to this size; a longer one is verified in full. */
const MAX_HEADER_SCAN = 256 * 1024;
const DKIM_SIGNATURE_FIELD = /(?:^|\n)dkim-signature[ \t]*:/i;

/** Feeds the message as it arrives; `result` settles once the message ended and DNS answered. */
export class SenderAuthCheck {
  /** The message for DKIM, once its header shows a signature. */
  private input: PassThrough | undefined;
  private header: Buffer[] = [];
  private headerLength = 0;
  private decided = false;
  private startWith: (input: Readable | Buffer) => void = () => {};
  readonly result: Promise<SenderAuth | undefined>;

  constructor(context: {
    ip: string;
    helo: string;
    sender: string;
    mta: string;
    resolve: DnsResolve;
    timeoutMs: number;
    /**
     * Shares the outcome for unsigned messages by client IP, HELO and sender: with DNS answers
     * shared too, checking again within DNS_CACHE_MS would give the same SPF result.
     */
    unsignedOutcomes?: AnswerCache;
  }) {
    const input = new Promise<Readable | Buffer>((resolve) => {
      this.startWith = resolve;
    });
    const authenticateMessage = async (message: Readable | Buffer) =>
      (await loadMailauth()).authenticate(message, {
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
    const checking = input.then((message) => {
      const outcomes = context.unsignedOutcomes;
      // An unsigned message is checked as an empty one (see decide()): SPF alone, shareable.
      if (!Buffer.isBuffer(message) || !outcomes) return authenticateMessage(message);
      const key = `${context.ip} ${context.helo} ${context.sender.toLowerCase()}`;
      return outcomes.get(key, () => authenticateMessage(message));
    });
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
    if (this.input) {
      this.input.write(chunk);
      return;
    }
    if (this.decided) return;
    this.header.push(chunk);
    this.headerLength += chunk.length;
    const text = Buffer.concat(this.header).toString("latin1");
    const end = text.indexOf("\r\n\r\n");
    if (end >= 0) this.decide(text.slice(0, end));
    else if (this.headerLength > MAX_HEADER_SCAN) this.decide(undefined);
  }

  end(): void {
    if (!this.decided) this.decide(Buffer.concat(this.header).toString("latin1"));
    this.input?.end();
  }

  /** Unsigned (no DKIM-Signature field in `header`): SPF alone, on an empty message. */
  private decide(header: string | undefined): void {
    this.decided = true;
    if (header !== undefined && !DKIM_SIGNATURE_FIELD.test(header)) {
      this.startWith(Buffer.alloc(0));
    } else {
      this.input = new PassThrough();
      for (const chunk of this.header) this.input.write(chunk);
      this.startWith(this.input);
    }
    this.header = [];
  }
}

/** Relaxed alignment: the signing domain is the sender's domain or a parent of it. */
function aligned(senderDomain: string, signingDomain: string): boolean {
  return (
    Boolean(signingDomain) && (senderDomain === signingDomain || senderDomain.endsWith(`.${signingDomain}`))
  );
}
