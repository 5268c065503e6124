import { KvmkitError } from '@kvmkit/kernel';

/** Error codes raised by @kvmkit/control (documented in the README). */
export const ControlErrorCodes = {
  KVMKIT_ERR_CONTROL_REQUEST: 'a control request is not valid JSON-lines RPC (or too long)',
  KVMKIT_ERR_CONTROL_METHOD: 'the control method does not exist',
  KVMKIT_ERR_CONTROL_BUSY: 'another snapshot/migration is running on this VM',
  KVMKIT_ERR_CONTROL_IN_USE: 'another live process serves this control socket',
  KVMKIT_ERR_CONTROL_CONNECT: 'cannot connect to the control socket (no such VM, or it stopped)',
  KVMKIT_ERR_CONTROL_CLOSED: 'the control connection closed before the answer came',
  KVMKIT_ERR_CONTROL_TIMEOUT: 'no answer within the timeout',
} as const;
export type ControlErrorCode = keyof typeof ControlErrorCodes;

export function ctlErr(code: ControlErrorCode, message: string, details: Record<string, unknown> = {}, cause?: unknown): KvmkitError {
  return new KvmkitError(code, message, { details, ...(cause === undefined ? {} : { cause }) });
}

/** One request line. */
export interface ControlRequest {
  id: number | string;
  method: string;
  params?: Record<string, unknown>;
}

/** One response line: `result` or `error`. */
export interface ControlResponse {
  id: number | string | null;
  result?: unknown;
  error?: { code: string; message: string; details?: Record<string, unknown> };
}

export const MAX_LINE = 1 << 20;

/** JSON with bigint as strings (status and reports carry none today; snapshot results may in the future). */
export function toLine(o: unknown): string {
  return JSON.stringify(o, (_k, v) => (typeof v === 'bigint' ? v.toString() : v)) + '\n';
}

/** Splits a byte stream into lines; calls `onLine` per line, `onTooLong` once a line exceeds MAX_LINE. */
export function lineSplitter(onLine: (l: string) => void, onTooLong: () => void): (d: Buffer) => void {
  let buf = '';
  return (d) => {
    buf += d.toString('utf8');
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.trim().length > 0) onLine(line);
    }
    if (buf.length > MAX_LINE) {
      buf = '';
      onTooLong();
    }
  };
}
