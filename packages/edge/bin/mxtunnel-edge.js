#!/usr/bin/env -S node --initial-old-space-size=64 --max-semi-space-size=2 --expose-gc
// A committed entry point, so npm can link the bin before `tsc -b` has built dist/.
// --initial-old-space-size: with V8's default (a heap limit that starts near 25 MB), a long-lived agent
// can settle into back-to-back mark-compacts that free almost nothing and double its CPU per MB
// relayed (BENCHMARKS.md, "Memory"). --max-semi-space-size=2 (MiB; default 16): a smaller young
// generation frees a stream's dead Buffers (off-heap) as it goes instead of letting tens of MiB pile
// up, and keeps start-up from leaving 32 MiB of it committed at idle. Measured (scenarios 1, 3, 5 the
// same hour): 4 MiB left the agents' scenario-3 peak at 118-119 MiB, over the 120 MB target; 1 MiB
// costs the edge 11 % of its CPU in GC (+20 % per small message); 2 keeps the edge at 111-112 MiB
// with 7 % in GC. Home runs with 1 (its peak is the higher one). Node refuses the first flag in
// NODE_OPTIONS, so both live here; the bench reads them from this line (bench/lib/agents.js).
// --expose-gc: lets the tunnel's GcPacer (packages/shared/src/gc-pacer.ts) run a scavenge after every
// 8 MiB of tunnel traffic. Without it V8 lets young Buffers reach 32 MiB before it scavenges for them
// (whatever the semi-space), and that garbage was most of the agents' scenario-3 growth.
import "../dist/cli.js";
