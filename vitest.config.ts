import { fileURLToPath } from "node:url";
import { defineConfig } from "vitest/config";

export default defineConfig({
  resolve: {
    alias: {
      "@mxtunnel/shared": fileURLToPath(new URL("./packages/shared/src/index.ts", import.meta.url)),
      "@mxtunnel/edge": fileURLToPath(new URL("./packages/edge/src/index.ts", import.meta.url)),
      "@mxtunnel/home": fileURLToPath(new URL("./packages/home/src/index.ts", import.meta.url)),
    },
  },
  test: {
    include: ["packages/*/test/**/*.test.ts", "test/**/*.test.ts"],
    testTimeout: 30_000,
    hookTimeout: 60_000,
    reporters: ["default", "./test/plain-summary-reporter.ts"],
    pool: "forks",
  },
});
