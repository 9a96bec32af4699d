// Loads edge.json from the state directory and applies command-line overrides before validation,
// so a flag is checked exactly like the key it replaces.
import {
  configWarnings,
  type EdgeConfig,
  parseEdgeConfig,
  readConfigFile,
  setConfigPath,
} from "@mxtunnel/shared";
import { edgePaths } from "./state.js";

export async function loadEdgeConfigFrom(
  dir: string,
  overrides: Record<string, unknown> = {},
): Promise<EdgeConfig> {
  const raw = await readConfigFile(edgePaths(dir).config);
  for (const [path, value] of Object.entries(overrides))
    if (value !== undefined) setConfigPath(raw, path, value);
  return parseEdgeConfig(raw);
}

export { configWarnings };
