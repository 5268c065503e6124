import { describe, it, expect, afterAll } from 'vitest';
import { createServer, connect, type Socket } from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Channel, encodeFrame, F, checkAddress, FRAME_HEADER } from './protocol.js';

const dirs: string[] = [];
afterAll(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }); });

async function pair(): Promise<[Socket, Socket]> {
  const dir = mkdtempSync(join(tmpdir(), 'kvmkit-ch-'));
  dirs.push(dir);
  const path = join(dir, 's');
  const server = createServer();
  await new Promise<void>((r) => server.listen(path, r));
  const accepted = new Promise<Socket>((r) => server.once('connection', r));
  const c = connect(path);
  await new Promise((r) => c.once('connect', r));
  const s = await accepted;
  server.close();
  return [c, s];
}

describe('migration stream', () => {
  it('delivers frames in order across arbitrary chunking, with backpressure', async () => {
    const [a, b] = await pair();
    const tx = new Channel(a);
    const rx = new Channel(b);
    const big = Buffer.alloc(3 << 20, 7);
    await tx.sendJson(F.HELLO, { x: 1 });
    await tx.send(F.PAGES, big);
    await tx.send(F.END);
    expect(JSON.parse((await rx.expect(F.HELLO, 1000)).payload.toString())).toEqual({ x: 1 });
    expect((await rx.expect(F.PAGES, 5000)).payload.equals(big)).toBe(true);
    await rx.expect(F.END, 1000);
    tx.close();
    await expect(rx.recv(1000, 'x')).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_STREAM' });
  });
  it('a flipped bit fails the CRC; a bad magic is a protocol error; a peer ERROR frame is REFUSED', async () => {
    const [a, b] = await pair();
    const rx = new Channel(b);
    const f = encodeFrame(F.STATE, Buffer.from('hello'));
    f[FRAME_HEADER + 1]! ^= 1;
    a.write(f);
    await expect(rx.recv(1000, 'state')).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_PROTOCOL', message: expect.stringMatching(/CRC/) });
    const [c, d] = await pair();
    const rx2 = new Channel(d);
    c.write(Buffer.alloc(16, 0x41));
    await expect(rx2.recv(1000, 'x')).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_PROTOCOL', message: expect.stringMatching(/magic/) });
    const [e, g] = await pair();
    const rx3 = new Channel(g);
    e.write(encodeFrame(F.ERROR, Buffer.from(JSON.stringify({ code: 'KVMKIT_ERR_X', message: 'no' }))));
    await expect(rx3.recv(1000, 'x')).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_REFUSED', details: { peerCode: 'KVMKIT_ERR_X' } });
  });
  it('times out waiting for a frame', async () => {
    const [, b] = await pair();
    await expect(new Channel(b).recv(50, 'RESTORED')).rejects.toMatchObject({ code: 'KVMKIT_ERR_MIGRATE_STREAM', message: expect.stringMatching(/RESTORED/) });
  });
  it('accepts unix paths and loopback TCP only', () => {
    expect(checkAddress('/tmp/x.sock')).toBe('/tmp/x.sock');
    expect(checkAddress('127.0.0.1:4000')).toEqual({ host: '127.0.0.1', port: 4000 });
    expect(checkAddress({ port: 5 })).toEqual({ host: '127.0.0.1', port: 5 });
    expect(() => checkAddress('192.168.1.2:4000')).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_MIGRATE_ADDRESS' }));
    expect(checkAddress('192.168.1.2:4000', true)).toEqual({ host: '192.168.1.2', port: 4000 });
    expect(() => checkAddress(42)).toThrow(expect.objectContaining({ code: 'KVMKIT_ERR_MIGRATE_ADDRESS' }));
  });
});
