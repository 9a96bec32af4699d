// Prints one closing line in the plain form CI reads: "Tests: N passed, N failed, N skipped".
import type { Reporter, TestCase } from "vitest/node";

export default class PlainSummaryReporter implements Reporter {
  private passed = 0;
  private failed = 0;
  private skipped = 0;

  onTestCaseResult(testCase: TestCase): void {
    const state = testCase.result().state;
    if (state === "passed") this.passed++;
    else if (state === "failed") this.failed++;
    else this.skipped++;
  }

  onTestRunEnd(): void {
    process.stdout.write(`\nTests: ${this.passed} passed, ${this.failed} failed, ${this.skipped} skipped\n`);
  }
}
