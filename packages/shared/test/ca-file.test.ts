import * as fs from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { readCaFile } from "../src/ca-file.js";

const CA_PEM = await fs.readFile(new URL("./fixtures/test-ca.pem", import.meta.url), "utf8");

describe("readCaFile", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await fs.mkdtemp(join(tmpdir(), "mxt-ca-file-"));
  });
  afterAll(() => fs.rm(dir, { recursive: true, force: true }));

  it("returns every certificate of a bundle, ignoring text between them", async () => {
    const path = join(dir, "bundle.pem");
    await fs.writeFile(path, `# partner CA\n${CA_PEM}\nsubject=second copy\n${CA_PEM}`);
    const certificates = readCaFile(path);
    expect(certificates).toHaveLength(2);
    expect(certificates[0]).toBe(CA_PEM.trim());
  });

  it("refuses an empty file", async () => {
    const path = join(dir, "empty.pem");
    await fs.writeFile(path, "");
    expect(() => readCaFile(path)).toThrow(`${path} holds no PEM certificate`);
  });
});
