// Reads a V8 .cpuprofile (node --cpu-prof) and ranks functions by self time.
import { readdir, readFile } from "node:fs/promises";
import { join, relative } from "node:path";

const PSEUDO = new Set(["(idle)", "(program)", "(garbage collector)", "(root)"]);

export async function hottest(file, { top = 3, root = process.cwd() } = {}) {
  const profile = JSON.parse(await readFile(file, "utf8"));
  const nodes = new Map(profile.nodes.map((node) => [node.id, node]));
  const self = new Map();
  let total = 0;
  profile.samples.forEach((id, index) => {
    const dt = profile.timeDeltas[index] ?? 0;
    total += dt;
    self.set(id, (self.get(id) ?? 0) + dt);
  });
  const byFunction = new Map();
  let idle = 0;
  for (const [id, us] of self) {
    const frame = nodes.get(id).callFrame;
    const name = frame.functionName || "(anonymous)";
    if (name === "(idle)") idle += us;
    const where = frame.url
      ? `${relative(root, frame.url.replace(/^file:\/\//, ""))}:${frame.lineNumber + 1}`
      : "";
    const key = `${name} ${where}`.trim();
    byFunction.set(key, (byFunction.get(key) ?? 0) + us);
  }
  const busy = total - idle;
  const ranked = [...byFunction.entries()]
    .map(([fn, us]) => ({ fn, ms: us / 1000, shareOfBusy: us / busy }))
    .sort((a, b) => b.ms - a.ms);
  return {
    busyMs: busy / 1000,
    gcShare: (byFunction.get("(garbage collector)") ?? 0) / busy,
    top: ranked.filter((r) => !PSEUDO.has(r.fn.split(" ")[0])).slice(0, top),
    topIncludingPseudo: ranked.filter((r) => r.fn !== "(idle)").slice(0, top + 2),
  };
}

export async function newestProfile(dir) {
  const files = (await readdir(dir)).filter((f) => f.endsWith(".cpuprofile")).sort();
  return files.length ? join(dir, files.at(-1)) : undefined;
}
