// Loads home.json (written with defaults at the first pairing) and applies flag overrides before
// validation, so a flag is checked exactly like the key it replaces.
import { access } from "node:fs/promises";
import {
  defaultHomeConfig,
  type HomeConfig,
  parseHomeConfig,
  readConfigFile,
  setConfigPath,
  writeFileAtomic,
} from "@mxtunnel/shared";
import { homePaths } from "./state.js";

export async function loadHomeConfigFrom(
  dir: string,
  overrides: Record<string, unknown> = {},
): Promise<HomeConfig> {
  const raw = await readConfigFile(homePaths(dir).config);
  for (const [path, value] of Object.entries(overrides))
    if (value !== undefined) setConfigPath(raw, path, value);
  return parseHomeConfig(raw);
}

/** Writes home.json with defaults if the directory has none yet. */
export async function ensureHomeConfig(dir: string): Promise<void> {
  const path = homePaths(dir).config;
  const exists = await access(path).then(
    () => true,
    () => false,
  );
  if (!exists)
    await writeFileAtomic(path, `${JSON.stringify(defaultHomeConfig(), null, 2)}\n`, { mode: 0o600 });
}
