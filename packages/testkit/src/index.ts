export * from './guest-kernel.js';
export * from './probe.js';
