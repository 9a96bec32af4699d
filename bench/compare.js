// `npm run bench:compare -- [--runs N] [--sessions N] [--messages N] [--sealed-mux] NAME=CHECKOUT[+VAR=VALUE…][@FLAG…] …`
// Scenario 1's load (smtp-source, 4 KiB messages, one session each, into smtp-sink) through several
// agent builds in one invocation, interleaved run by run with direct and with two bare Node proxies in
// a row: the A/B of a change. Separate invocations of `npm run bench` differ by up to ± 0.02 of direct
// on a 2-vCPU VM, more than most changes move, so a change is judged against its base in the same
// minutes. CHECKOUT is a tree whose agents are built (`npm ci && npm run build`; "." is this one);
// `+VAR=VALUE` sets an environment variable for its agents, `@--flag` adds a node flag to both.
// Prints each run and the medians; records nothing and asserts nothing.
import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import { startAgents } from "./lib/agents.js";
import { fmt, median } from "./lib/stats.js";
import { measuredLoad, smtpSource, startBareMux, startNodeProxy, startSink } from "./lib/tools.js";

const USAGE =
  "usage: npm run bench:compare -- [--runs N] [--sessions N] [--messages N] [--sealed-mux] " +
  "NAME=CHECKOUT[+VAR=VALUE…][@--node-flag…] …\n" +
  "example: npm run bench:compare -- --runs 5 base=../base new=. new-gc1=.@--single-threaded-gc";

export function parseBuild(spec) {
  const eq = spec.indexOf("=");
  if (eq <= 0) throw new Error(`"${spec}" is not NAME=CHECKOUT\n${USAGE}`);
  const name = spec.slice(0, eq);
  const [target, ...flags] = spec.slice(eq + 1).split("@");
  const [checkout, ...assignments] = target.split("+");
  if (!checkout) throw new Error(`"${spec}" names no checkout\n${USAGE}`);
  const env = {};
  for (const assignment of assignments) {
    const at = assignment.indexOf("=");
    if (at <= 0) throw new Error(`"${assignment}" in "${spec}" is not VAR=VALUE`);
    env[assignment.slice(0, at)] = assignment.slice(at + 1);
  }
  const root = resolve(checkout);
  for (const cli of ["packages/edge/dist/cli.js", "packages/home/dist/cli.js"]) {
    if (!existsSync(join(root, cli))) {
      throw new Error(`${name}: ${join(root, cli)} is missing: run npm ci && npm run build in ${root}`);
    }
  }
  return { name, checkout: root, env, flags };
}

export function parseArgs(argv) {
  const options = { runs: 5, sessions: 20, messages: 5000, sealedMux: false, builds: [] };
  const number = (flag, value) => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 1)
      throw new Error(`${flag} takes a positive whole number, not "${value}"`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--runs") options.runs = number(arg, argv[++i]);
    else if (arg === "--sessions") options.sessions = number(arg, argv[++i]);
    else if (arg === "--messages") options.messages = number(arg, argv[++i]);
    else if (arg === "--sealed-mux") options.sealedMux = true;
    else if (arg === "--help" || arg === "-h") return { help: true };
    else if (arg.startsWith("-")) throw new Error(`unknown option ${arg}\n${USAGE}`);
    else options.builds.push(parseBuild(arg));
  }
  if (options.builds.length === 0) throw new Error(`name at least one build\n${USAGE}`);
  const names = options.builds.map((b) => b.name);
  const twice = names.find((name, i) => names.indexOf(name) !== i);
  if (twice) throw new Error(`the name ${twice} is given twice`);
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  if (options.help) {
    console.log(USAGE);
    return;
  }
  const { runs, sessions, messages } = options;
  const size = 4096;
  const sink = await startSink();
  const second = await startNodeProxy(sink.port);
  const first = await startNodeProxy(second.port);
  const stops = [() => first.stop(), () => second.stop(), () => sink.stop()];
  try {
    const paths = [
      { name: "direct", port: sink.port, pids: {} },
      { name: "two proxies", port: first.port, pids: { first: first.pid, second: second.pid } },
    ];
    if (options.sealedMux) {
      const mux = await startBareMux(sink.port, { chacha: true });
      stops.unshift(() => mux.stop());
      paths.push({ name: "sealed bare mux", port: mux.port, pids: mux.pids });
    }
    for (const build of options.builds) {
      const agents = await startAgents({
        inject: `127.0.0.1:${sink.port}`,
        checkout: build.checkout,
        env: { ...process.env, ...build.env },
        nodeArgs: { edge: build.flags, home: build.flags },
      });
      stops.unshift(() => agents.stop());
      paths.push({ name: build.name, port: agents.smtpPort, pids: agents.pids() });
    }
    console.log(
      `${sessions} sessions × ${messages} messages of ${size} bytes, ${runs} runs, paths interleaved`,
    );
    for (const path of paths) await smtpSource(path.port, { sessions, messages: 1000, size }); // warm-up
    const ratios = new Map(paths.map((p) => [p.name, []]));
    for (let run = 1; run <= runs; run++) {
      const line = [];
      let direct;
      for (const path of paths) {
        const load = await measuredLoad(path.port, path.pids, { sessions, messages, size });
        const { rate, idle, totalCpuPerMsgMs: cpu } = load;
        direct ??= rate;
        ratios.get(path.name).push(rate / direct);
        const cpuPart = path.name === "direct" ? "" : `, ${fmt(cpu)} ms/msg`;
        line.push(
          `${path.name} ${fmt(rate)} (${fmt(rate / direct)}${cpuPart}, idle ${fmt(idle * 100, 2)} %)`,
        );
      }
      console.log(`run ${run}: ${line.join(" | ")}`);
    }
    console.log(
      `median ratio to direct: ${[...ratios].map(([name, r]) => `${name} ${fmt(median(r))}`).join(", ")}`,
    );
  } finally {
    for (const stop of stops) await stop();
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((error) => {
    console.error(`bench:compare: ${error.message}`);
    process.exit(1);
  });
}
