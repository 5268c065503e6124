import { defineConfig } from 'vitest/config';
import { readdirSync, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

// One vitest project per package (packages/*, plugins/*, examples/*), plus the cross-package e2e suite.
const groups = ['packages', 'plugins', 'examples'];
const projects = groups.flatMap((g) =>
  readdirSync(g, { withFileTypes: true })
    .filter((d) => d.isDirectory() && existsSync(join(g, d.name, 'package.json')))
    .map((d) => {
      const dir = join(g, d.name);
      const name = (JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name: string }).name;
      return { extends: true as const, test: { name, root: dir, include: ['src/**/*.test.ts', 'test/**/*.test.ts'] } };
    }),
);

export default defineConfig({
  test: {
    testTimeout: 60_000,
    // The JSON report feeds scripts/test-summary.mjs (CI prints a plain 'N passed, N failed' line from it).
    reporters: ['default', 'json'],
    outputFile: { json: 'test-results.json' },
    hookTimeout: 60_000,
    projects: [
      ...projects,
      { extends: true, test: { name: 'e2e', root: 'test/e2e', include: ['**/*.test.ts'], testTimeout: 600_000, hookTimeout: 120_000 } },
    ],
  },
});
