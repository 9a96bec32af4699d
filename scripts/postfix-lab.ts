// A private Postfix (and optionally Dovecot) for trying mxtunnel by hand or from a benchmark:
//   npx tsx scripts/postfix-lab.ts start [--dir D] [--size BYTES] [--user NAME]... [--no-tls] [--dovecot]
//     prints one JSON line (ports, folders), keeps running until SIGINT/SIGTERM/SIGHUP, then tears down.
//   npx tsx scripts/postfix-lab.ts stop --dir D
//     stops a lab left behind in D (e.g. after kill -9) and removes D.
import { parseArgs } from "node:util";
import { type DovecotLab, startDovecot } from "../test/e2e/lab/dovecot.js";
import { type PostfixOptions, startPostfix, stopPostfixDir } from "../test/e2e/lab/postfix.js";

const usage = `usage:
  postfix-lab start [--dir D] [--size BYTES] [--user NAME]... [--no-tls] [--no-ipv6] [--dovecot]
  postfix-lab stop --dir D`;

async function main(argv: string[]): Promise<number> {
  const { positionals, values } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      dir: { type: "string" },
      size: { type: "string" },
      user: { type: "string", multiple: true },
      "no-tls": { type: "boolean", default: false },
      "no-ipv6": { type: "boolean", default: false },
      dovecot: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  const command = positionals[0];
  if (values.help || positionals.length !== 1 || (command !== "start" && command !== "stop")) {
    process.stderr.write(`${usage}\n`);
    return values.help ? 0 : 2;
  }
  if (command === "stop") {
    if (values.dir === undefined) {
      process.stderr.write(`stop needs --dir\n${usage}\n`);
      return 2;
    }
    await stopPostfixDir(values.dir);
    return 0;
  }

  const options: PostfixOptions = { tls: !values["no-tls"], ipv6: !values["no-ipv6"] };
  if (values.dir !== undefined) options.dir = values.dir;
  if (values.user !== undefined) options.users = values.user;
  if (values.size !== undefined) {
    const size = Number(values.size);
    if (!Number.isInteger(size) || size <= 0) {
      process.stderr.write(`--size must be a positive integer (bytes), got ${values.size}\n`);
      return 2;
    }
    options.messageSizeLimit = size;
  }

  let dovecot: DovecotLab | undefined;
  if (values.dovecot) {
    const first = options.users?.[0];
    dovecot = await startDovecot(
      first === undefined ? { authListener: true } : { authListener: true, user: first },
    );
    if (dovecot.authPort !== undefined) options.dovecotAuthPort = dovecot.authPort;
  }
  const lab = await startPostfix(options).catch(async (error: unknown) => {
    await dovecot?.stop();
    throw error;
  });

  const summary = {
    dir: lab.dir,
    host: lab.host,
    smtpPort: lab.smtpPort,
    injectPort: lab.injectPort,
    submissionPort: lab.submissionPort ?? null,
    ipv6: lab.ipv6,
    domain: lab.domain,
    users: lab.users,
    maildirs: Object.fromEntries(lab.users.map((u) => [u, lab.maildir(u)])),
    log: `${lab.dir}/maillog`,
    masterPid: lab.masterPid,
    dovecot: dovecot
      ? {
          dir: dovecot.dir,
          imapPort: dovecot.imapPort,
          plainImapPort: dovecot.plainImapPort,
          user: dovecot.user,
          password: dovecot.password,
        }
      : null,
  };
  process.stdout.write(`${JSON.stringify(summary)}\n`);

  // Signal listeners alone do not keep Node's event loop alive.
  const keepAlive = setInterval(() => {}, 1 << 30);
  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once("SIGINT", () => resolve("SIGINT"));
    process.once("SIGTERM", () => resolve("SIGTERM"));
    process.once("SIGHUP", () => resolve("SIGHUP"));
  });
  clearInterval(keepAlive);
  process.stderr.write(`postfix-lab: ${signal}, tearing down\n`);
  await lab.stop();
  await dovecot?.stop();
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    process.stderr.write(`postfix-lab: ${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode = 1;
  },
);
