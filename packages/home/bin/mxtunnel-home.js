#!/usr/bin/env -S node --initial-old-space-size=64 --max-semi-space-size=1 --expose-gc
// A committed entry point, so npm can link the bin before `tsc -b` has built dist/.
// --initial-old-space-size: with V8's default (a heap limit that starts near 25 MB), a long-lived agent
// can settle into back-to-back mark-compacts that free almost nothing and double its CPU per MB
// relayed (BENCHMARKS.md, "Memory"). --max-semi-space-size=1 (MiB; default 16): a smaller young
// generation frees a stream's dead Buffers (off-heap) as it goes instead of letting tens of MiB pile
// up, and keeps start-up from leaving 32 MiB of it committed at idle. Measured (scenarios 1, 3, 5 the
// same hour): with 4 MiB home's scenario-3 peak was 118-119 MiB, over the 120 MB target; with 1 it
// is 111-113 MiB, for ≈ 9 % of its CPU in GC. The edge runs with 2. Node refuses the first flag in
// NODE_OPTIONS, so both live here; the bench reads them from this line (bench/lib/agents.js).
// --expose-gc: lets the tunnel's GcPacer (packages/shared/src/gc-pacer.ts) run a scavenge after every
// 8 MiB of tunnel traffic. Without it V8 lets young Buffers reach 32 MiB before it scavenges for them
// (whatever the semi-space), and that garbage was most of the agents' scenario-3 growth.
import "../dist/cli.js";
