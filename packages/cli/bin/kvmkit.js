#!/usr/bin/env node
// The `kvmkit` command. A committed file (not build output) so that `npm ci` can link it into node_modules/.bin
// before `prepare` has built dist/; it only loads the built CLI.
import '../dist/bin.js';
