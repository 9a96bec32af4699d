#!/usr/bin/env node
// A committed entry point, so npm can link the bin before `tsc -b` has built dist/.
import "../dist/cli.js";
