export { default, migrate } from './plugin.js';
export { runPrecopy, precopyStrategy } from './source.js';
export type { MigrateOptions, MigrationReport } from './source.js';
export { receiveMigration } from './dest.js';
export type { ReceiveOptions, ReceiveReport } from './dest.js';
export { MigrateErrorCodes, migErr, Channel, encodeFrame, allocFrame, sealFrame, checkAddress, F as FRAME, PROTOCOL, PROTOCOL_VERSION, FRAME_MAGIC, MAX_PAYLOAD } from './protocol.js';
export type { MigrateErrorCode, Address, Frame } from './protocol.js';
