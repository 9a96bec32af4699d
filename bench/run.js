// `npm run bench [-- --quick] [-- --scenario 1[,2…]] [-- --runs N]`: runs the issue-7 scenarios against
// their anchors on loopback and writes bench/results/latest.json. Benchmarks print and record; they
// never assert timings. Needs `npm run build` first (the agents run from packages/*/dist).
import { existsSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import os from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
const SCENARIOS = {
  1: "./scenarios/s1-live-inbound.js",
  2: "./scenarios/s2-latency.js",
  3: "./scenarios/s3-bulk.js",
  4: "./scenarios/s4-idle-sessions.js",
  "4-spool": "./scenarios/s4-spool.js",
  5: "./scenarios/s5-spool.js",
  6: "./scenarios/s6-outbound.js",
  7: "./scenarios/s7-tunnel.js",
};
// Part of another scenario, selectable on its own but not run twice by default (4 includes 4-spool).
const ALSO_IN = { "4-spool": "4" };
const DEFAULT_SCENARIOS = Object.keys(SCENARIOS).filter((id) => !ALSO_IN[id]);
const NOT_YET = {};

function parseArgs(argv) {
  const options = { quick: false, scenarios: DEFAULT_SCENARIOS, runs: undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--quick") options.quick = true;
    else if (arg === "--scenario" || arg === "-s") options.scenarios = String(argv[++i]).split(",");
    else if (arg.startsWith("--scenario=")) options.scenarios = arg.slice(11).split(",");
    else if (arg === "--runs") options.runs = Number(argv[++i]);
    else if (arg === "--help" || arg === "-h") {
      console.log("usage: npm run bench [-- --quick] [-- --scenario 1,2,3,4,4-spool,5,6,7] [-- --runs N]");
      process.exit(0);
    } else throw new Error(`unknown argument ${arg} (try --help)`);
  }
  for (const s of options.scenarios) {
    if (!SCENARIOS[s]) throw new Error(`no scenario ${s}; choose from ${Object.keys(SCENARIOS).join(", ")}`);
  }
  return options;
}

async function main() {
  const options = parseArgs(process.argv.slice(2));
  for (const cli of ["packages/edge/dist/cli.js", "packages/home/dist/cli.js"]) {
    if (!existsSync(join(HERE, "..", cli))) throw new Error(`${cli} is missing: run npm run build first`);
  }
  const runs = options.runs ?? 3;
  const resultsDir = join(HERE, "results");
  await mkdir(resultsDir, { recursive: true });
  const machine = {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model,
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    node: process.version,
  };
  const report = {
    date: new Date().toISOString(),
    command: `npm run bench -- ${process.argv.slice(2).join(" ")}`.trim(),
    machine,
    quick: options.quick,
    runs,
    scenarios: {},
    notYetMeasurable: NOT_YET,
  };
  console.log(
    `mxtunnel benchmarks: ${machine.cpus} × ${machine.cpuModel}, Node ${machine.node}, ${runs} runs each`,
  );
  const started = performance.now();
  for (const id of options.scenarios) {
    const scenario = await import(SCENARIOS[id]);
    console.log(`\n${scenario.title}`);
    const t0 = performance.now();
    try {
      report.scenarios[id] = await scenario.run({
        quick: options.quick,
        runs,
        resultsDir,
        log: (line) => console.log(line),
      });
    } catch (error) {
      console.log(`  FAILED: ${error.stack ?? error}`);
      report.scenarios[id] = { error: String(error.message ?? error) };
      process.exitCode = 1;
    }
    console.log(`  (${((performance.now() - t0) / 1000).toFixed(1)} s)`);
  }
  for (const [id, why] of Object.entries(NOT_YET)) console.log(`\n${id}: ${why}`);
  const name =
    DEFAULT_SCENARIOS.every((id) => options.scenarios.includes(id)) && !options.quick
      ? "latest"
      : "latest-partial";
  await writeFile(join(resultsDir, `${name}.json`), `${JSON.stringify(report, null, 2)}\n`);
  console.log(
    `\nwrote bench/results/${name}.json in ${((performance.now() - started) / 1000).toFixed(0)} s total`,
  );
}

main().catch((error) => {
  console.error(error.stack ?? String(error));
  process.exitCode = 1;
});
