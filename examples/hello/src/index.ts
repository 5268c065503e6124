export { helloImage, LOCK_ADDR } from './guest.js';
export { Asm } from './asm.js';
