export * from './guest-kernel.js';
export * from './probe.js';
export { pluginHarness, debugExitPlugin, realModeBoot, REAL_MODE_LOAD, runToStop, kvmkitRejection } from './harness.js';
export type { HarnessOptions } from './harness.js';
