#!/usr/bin/env -S node --initial-old-space-size=64 --max-semi-space-size=1
// A committed entry point, so npm can link the bin before `tsc -b` has built dist/.
// --initial-old-space-size: with V8's default (a heap limit that starts near 25 MB), a long-lived agent
// can settle into back-to-back mark-compacts that free almost nothing and double its CPU per MB
// relayed (BENCHMARKS.md, "GC"). --max-semi-space-size=1 (MiB; default 16): a young generation that
// small is scavenged often, which frees the dead Buffers of a stream (off-heap) as it goes instead of
// letting tens of MiB of them pile up, and keeps start-up from leaving 32 MiB of young generation
// committed at idle. Measured: no CPU cost per MB streamed (scenarios 3, 7), but many small messages
// (scenario 1) spend more in GC (3 % -> 11 % of the edge's CPU; 4 MiB costs none there but keeps more
// of the memory). Node refuses the first flag in NODE_OPTIONS, so both live here; the bench reads
// them from this line (bench/lib/agents.js).
import "../dist/cli.js";
