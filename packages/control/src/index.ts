export { serveControl, controlSocketPath } from './server.js';
export type { ControlOptions, ControlServer } from './server.js';
export { connectControl, ControlClient } from './client.js';
export type { ControlStatus } from './client.js';
export { ControlErrorCodes, ctlErr, MAX_LINE } from './protocol.js';
export type { ControlErrorCode, ControlRequest, ControlResponse } from './protocol.js';
