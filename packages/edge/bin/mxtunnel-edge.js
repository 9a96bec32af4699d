#!/usr/bin/env -S node --initial-old-space-size=64 --max-semi-space-size=4 --expose-gc
// A committed entry point, so npm can link the bin before `tsc -b` has built dist/.
// --initial-old-space-size: with V8's default (a heap limit that starts near 25 MB), a long-lived agent
// can settle into back-to-back mark-compacts that free almost nothing and double its CPU per MB
// relayed (BENCHMARKS.md, "Memory").
// --expose-gc: lets the tunnel's GcPacer (packages/shared/src/gc-pacer.ts) run a scavenge after every
// 8 MiB of tunnel traffic. Without it V8 lets young Buffers reach 32 MiB before it scavenges for them
// (whatever the semi-space), and that garbage was most of the agents' scenario-3 growth.
// --max-semi-space-size=4 (MiB; default 16) keeps start-up from committing 32 MiB of young generation
// at idle. With the pacer bounding the dead Buffers, a small young generation is no longer what holds
// the bulk peak down, and 4 costs less CPU per small message than the 2 (edge) / 1 (home) used before
// it. Same hour, two runs each (scenarios 1 and 3): 2/1 gave 0.160 of direct at 0.68-0.76 ms per
// message for both agents and peaks of 95-97 / 94-104 MiB; 4/4 gave 0.172 at 0.65-0.67 ms and
// 99 / 103-105 MiB (the target is 120 MB = 114.4 MiB); 8/8 0.155, 101 / 101 MiB.
// Node refuses --initial-old-space-size in NODE_OPTIONS, so the flags live here; the bench reads them
// from this line (bench/lib/agents.js).
import "../dist/cli.js";
