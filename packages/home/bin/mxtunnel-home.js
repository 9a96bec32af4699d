#!/usr/bin/env -S node --initial-old-space-size=64 --max-semi-space-size=4
// A committed entry point, so npm can link the bin before `tsc -b` has built dist/.
// --initial-old-space-size: with V8's default (a heap limit that starts near 25 MB), a long-lived agent
// can settle into back-to-back mark-compacts that free almost nothing and double its CPU per MB
// relayed (BENCHMARKS.md, "Memory"). --max-semi-space-size=4 (MiB; default 16): a smaller young
// generation frees a stream's dead Buffers (off-heap) as it goes instead of letting tens of MiB pile
// up, and keeps start-up from leaving 32 MiB of it committed at idle. Measured sweep (scenarios 1 and
// 3, same machine, same hour): 1 MiB -> edge peak 96 MiB but 11 % of CPU in GC and +20 % CPU per small
// message; 2 -> 111 MiB, 7.7 %; 4 -> 114 MiB, 4.4 %, within the 120 MB target at the lowest CPU cost.
// Node refuses the first flag in NODE_OPTIONS, so both live here; the bench reads them from this line
// (bench/lib/agents.js).
import "../dist/cli.js";
