#!/usr/bin/env -S node --initial-old-space-size=64
// A committed entry point, so npm can link the bin before `tsc -b` has built dist/.
// --initial-old-space-size: with V8's default (a heap limit that starts near 25 MB), a long-lived agent
// can settle into back-to-back mark-compacts that free almost nothing and double its CPU per MB
// relayed (BENCHMARKS.md, "GC"). Node refuses this flag in NODE_OPTIONS, so it lives here; the
// bench reads it from this line (bench/lib/agents.js).
import "../dist/cli.js";
