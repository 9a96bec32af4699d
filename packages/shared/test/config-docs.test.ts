// docs/config.md documents every key of edge.json and home.json (as written by init/pair, which spell
// every key out), and documents no key the schemas do not know.
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { defaultEdgeConfig, defaultHomeConfig, parseEdgeConfig, parseHomeConfig } from "../src/config.js";

const docs = await readFile(fileURLToPath(new URL("../../../docs/config.md", import.meta.url)), "utf8");

/** Leaf key paths; maps keyed by user data (transports, services, relayAuth) and lists stay whole. */
function keyPaths(value: Record<string, unknown>, prefix = ""): string[] {
  const whole = new Set(["transports", "services", "relayAuth", "forwards"]);
  return Object.entries(value).flatMap(([key, item]) => {
    const path = `${prefix}${key}`;
    if (item && typeof item === "object" && !Array.isArray(item) && !whole.has(path))
      return keyPaths(item as Record<string, unknown>, `${path}.`);
    return [path];
  });
}

/** The first-column keys of the table under a heading. */
function documented(heading: string): string[] {
  const section = docs.split(/^## /m).find((s) => s.startsWith(heading)) ?? "";
  return [...section.matchAll(/^\| `([^`]+)`/gm)].map((m) => m[1]!);
}

describe("docs/config.md", () => {
  it("documents every edge.json key, and only keys edge.json accepts", () => {
    const keys = keyPaths(defaultEdgeConfig({ hostname: "mx.example.test", domains: ["example.test"] }));
    const table = documented("edge.json");
    for (const key of keys) expect(table, key).toContain(key);
    for (const key of table.filter((k) => !k.includes(",") && !k.includes("[]")))
      expect(keys, key).toContain(key);
    // What init writes is itself valid.
    expect(() =>
      parseEdgeConfig(defaultEdgeConfig({ hostname: "mx.example.test", domains: ["example.test"] })),
    ).not.toThrow();
  });

  it("documents every home.json key, and only keys home.json accepts", () => {
    const keys = keyPaths(defaultHomeConfig());
    const table = documented("home.json");
    for (const key of keys) expect(table, key).toContain(key);
    for (const key of table) expect(keys, key).toContain(key);
    expect(() => parseHomeConfig(defaultHomeConfig())).not.toThrow();
  });
});
