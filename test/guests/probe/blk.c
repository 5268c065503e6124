/* virtio-blk driver for the probe guest (probe.test=blk): pattern write / flush / read-back on one
 * polled split virtqueue, over the transport in virtio.c. See README.md "virtio-blk driver". */
#include "virtio.h"

#define VBLK_F_RO    5
#define VBLK_F_FLUSH 9
#define VBLK_T_IN 0
#define VBLK_T_OUT 1
#define VBLK_T_FLUSH 4
#define VQ_SIZE 8
#define BLK_BUF_SECTORS 128                       /* 64 KiB data buffer: largest request */

static u8 vq_page[4096] __attribute__((aligned(4096)));
static struct { u32 type, reserved; u64 sector; } blk_hdr __attribute__((aligned(16)));
static volatile u8 blk_status __attribute__((aligned(16)));
static u64 blk_buf[BLK_BUF_SECTORS * 64] __attribute__((aligned(4096)));

static struct virtio_dev blk = { .name = "blk", .device_id = VIRTIO_ID_BLK };
static struct virtq blk_vq;
static u64 blk_dev_feat;

__attribute__((noreturn)) static void blk_fail(const char *why, u64 v) { virtio_fail(&blk, why, v); }

/* One block request; returns the status byte (0 OK, 1 IOERR, 2 UNSUPP). */
static u32 blk_req(u32 type, u64 sector, void *data, u32 bytes)
{
    u64 a[3]; u32 l[3]; u16 w[3]; int n = 0;
    blk_hdr.type = type; blk_hdr.reserved = 0; blk_hdr.sector = sector;
    blk_status = 0xff;
    a[n] = (u64)&blk_hdr; l[n] = 16; w[n++] = 0;
    if (bytes) { a[n] = (u64)data; l[n] = bytes; w[n++] = type == VBLK_T_IN; }
    a[n] = (u64)&blk_status; l[n] = 1; w[n++] = 1;
    u32 ulen = vq_submit(&blk_vq, a, l, w, n);
    u32 st = blk_status;
    if (st > 2) blk_fail("status", st);
    if (ulen < 1) blk_fail("used_len_no_status", ulen);
    if (type == VBLK_T_IN && st == 0 && ulen != bytes + 1) blk_fail("read_len", ulen);
    return st;
}

/* Finds the blk device, negotiates VERSION_1 (+ FLUSH when offered), sets up queue 0. */
static void blk_init(u64 *capacity)
{
    virtio_begin(&blk, 1ull << VBLK_F_FLUSH);
    blk_dev_feat = blk.dev_feat;
    virtio_queue_setup(&blk, &blk_vq, 0, vq_page, VQ_SIZE);
    u32 clo = virtio_cfg32(&blk, 0), chi = virtio_cfg32(&blk, 4);   /* capacity (512-byte sectors) */
    *capacity = (u64)chi << 32 | clo;
    virtio_driver_ok(&blk);
    puts("PROBE blk_dev"); kvx("addr", blk.base); kvx("size", blk.size); kv("irq", blk.irq); kvx("features", blk_dev_feat);
    kv("capacity", *capacity); kv("queue_num", blk_vq.num); kv("queue_num_max", blk_vq.num_max); puts("\n");
}

/* Pattern: 8-byte word i (0..63) of sector s = seed << 32 | (s & 0xffffff) << 8 | i. */
static inline u64 blk_word(u64 seed, u64 s, u64 i) { return seed << 32 | (s & 0xffffff) << 8 | i; }

void test_blk(void)
{
    u64 n = param_u64("blk.sectors", 16), start = param_u64("blk.start", 0);
    u64 seed = param_u64("blk.seed", 0x5eed) & 0xffffffffull, chunk = param_u64("blk.chunk", 8);
    int ro = param_u64("blk.ro", 0) != 0;
    if (chunk == 0 || chunk > BLK_BUF_SECTORS) chunk = 8;
    u64 cap;
    blk_init(&cap);
    if (n == 0 || start + n > cap || start + n < start) blk_fail("range", start + n);
    int dev_ro = (blk_dev_feat >> VBLK_F_RO) & 1;
    if (ro) {
        /* A write must come back IOERR; a read must still work. */
        for (u64 i = 0; i < 64; i++) blk_buf[i] = blk_word(seed, start, i);
        u32 w = blk_req(VBLK_T_OUT, start, blk_buf, 512);
        u32 r = blk_req(VBLK_T_IN, start, blk_buf, 512);
        puts("PROBE blk"); kv("ro", 1); kv("dev_ro", (u64)dev_ro); kv("write_status", w); kv("read_status", r);
        int ok = w == 1 && r == 0;
        kv("ok", (u64)ok); puts("\n");
        finish(ok ? 0 : 1);
    }
    u64 wcyc = 0, rcyc = 0, reqs = 0, written = 0, read = 0, bad = 0, first_bad = ~0ull;
    for (u64 s = start; s < start + n; s += chunk) {
        u64 c = start + n - s < chunk ? start + n - s : chunk;
        for (u64 k = 0; k < c; k++)
            for (u64 i = 0; i < 64; i++) blk_buf[k * 64 + i] = blk_word(seed, s + k, i);
        u64 t0 = rdtsc();
        u32 st = blk_req(VBLK_T_OUT, s, blk_buf, (u32)(c * 512));
        wcyc += rdtsc() - t0; reqs++;
        if (st) blk_fail("write_status", st);
        written += c;
    }
    u32 fst = 2;
    u64 fcyc = 0;
    if (blk_dev_feat & (1ull << VBLK_F_FLUSH)) {
        u64 t0 = rdtsc();
        fst = blk_req(VBLK_T_FLUSH, 0, 0, 0);
        fcyc = rdtsc() - t0;
        if (fst) blk_fail("flush_status", fst);
    }
    u64 rreqs = 0;
    for (u64 s = start; s < start + n; s += chunk) {
        u64 c = start + n - s < chunk ? start + n - s : chunk;
        for (u64 k = 0; k < c * 64; k++) blk_buf[k] = 0xdeaddeaddeaddeadull;
        u64 t0 = rdtsc();
        u32 st = blk_req(VBLK_T_IN, s, blk_buf, (u32)(c * 512));
        rcyc += rdtsc() - t0; rreqs++;
        if (st) blk_fail("read_status", st);
        for (u64 k = 0; k < c; k++)
            for (u64 i = 0; i < 64; i++)
                if (blk_buf[k * 64 + i] != blk_word(seed, s + k, i)) { bad++; if (first_bad == ~0ull) first_bad = s + k; }
        read += c;
    }
    int ok = bad == 0 && read == n && written == n;
    puts("PROBE blk"); kv("sectors", n); kv("start", start); kvx("seed", seed); kv("chunk", chunk);
    kv("written", written); kv("read", read); kv("flush", fst); kv("ok", (u64)ok);
    if (bad) { kv("bad_words", bad); kv("first_bad_sector", first_bad); }
    kv("cycles_per_req", (wcyc + rcyc) / (reqs + rreqs)); kv("write_cycles_per_req", wcyc / reqs);
    kv("read_cycles_per_req", rcyc / rreqs); kv("flush_cycles", fcyc); kv("tsc_khz", tsc_khz); puts("\n");
    virtio_reset(&blk);                                /* the device lets go of the queue */
    finish(ok ? 0 : 1);
}


/* ---- probe.test=blkbench: ring-3 polled sequential throughput ----
 * Params: blk.mode=read|write (read), blk.req=<bytes per request> (4096; a multiple of 512, ≤ 65536),
 * blk.bytes=<total> (16 MiB; rounded up to whole requests), blk.depth=<requests in flight> (8; clamped to
 * the queue size, and to a third of it without VIRTIO_F_INDIRECT_DESC), blk.start=<first sector> (0),
 * blk.verify=0|1 (0), blk.seed (0x5eed).
 * Requests walk the disk sequentially from blk.start and wrap at the end of the largest whole-request span.
 * With INDIRECT_DESC (kvmkit and QEMU offer it) each request is one ring descriptor pointing at a 3-entry
 * table (header, data, status), as Linux does; else 3 ring descriptors. Interrupts are suppressed
 * (avail.flags NO_INTERRUPT): completions are polled. Notifications honour the device's used.flags
 * NO_NOTIFY (as Linux does without EVENT_IDX; `kicks=` counts the QueueNotify writes). Every used element is checked (id names a request in
 * flight, used length = req + 1 for reads, ≥ 1 for writes, status byte 0). verify=1: writes carry the
 * `blk` test's pattern (word i of sector s = seed << 32 | (s & 0xffffff) << 8 | i) and reads are compared
 * against it (the host pre-fills the image), costing guest time per request — for correctness runs only.
 * cycles = TSC from the first submission to the last completion (ring 3). */
#define VIRTIO_F_INDIRECT_DESC 28
#define VD_INDIRECT 4
#define VQ_USED_F_NO_NOTIFY 1
#define BENCH_SLOTS VQ_MAX
#define BENCH_MAX_REQ 65536

struct bench_slot {
    struct { u32 type, reserved; u64 sector; } hdr;
    u8 status;
    u8 busy;
    u64 sector;
} __attribute__((aligned(16)));

static u8 bench_vq_page[4096] __attribute__((aligned(4096)));
static struct vq_desc bench_ind[BENCH_SLOTS][3] __attribute__((aligned(16)));
static struct bench_slot bench_slot[BENCH_SLOTS];
static u8 bench_data[BENCH_SLOTS][BENCH_MAX_REQ] __attribute__((aligned(4096)));

static struct {
    int write, verify, indirect;
    u32 req, depth;
    u64 seed, start, span_sectors, total, issued, done, next_off, bad, kicks;
} bb;

static void bench_fill(u32 slot, u64 sector)
{
    u64 *w = (u64 *)bench_data[slot];
    for (u64 k = 0; k < bb.req / 512; k++)
        for (u64 i = 0; i < 64; i++) w[k * 64 + i] = blk_word(bb.seed, sector + k, i);
}

static void bench_check(u32 slot, u64 sector)
{
    const u64 *w = (const u64 *)bench_data[slot];
    for (u64 k = 0; k < bb.req / 512; k++)
        for (u64 i = 0; i < 64; i++)
            if (w[k * 64 + i] != blk_word(bb.seed, sector + k, i)) bb.bad++;
}

/* Prepares request `slot` for the next sector and puts it on the avail ring (published later). */
static void bench_issue(u32 slot)
{
    struct bench_slot *s = &bench_slot[slot];
    u64 sector = bb.start + bb.next_off / 512;
    bb.next_off += bb.req;
    if (bb.next_off >= bb.span_sectors * 512) bb.next_off = 0;
    s->sector = sector;
    s->hdr.type = bb.write ? VBLK_T_OUT : VBLK_T_IN;
    s->hdr.reserved = 0;
    s->hdr.sector = sector;
    s->status = 0xff;
    s->busy = 1;
    if (bb.verify && bb.write) bench_fill(slot, sector);
    if (bb.verify && !bb.write) memset(bench_data[slot], 0xa5, bb.req);   /* the device must overwrite it */
    u16 dflags = bb.write ? 0 : VD_WRITE;
    if (bb.indirect) {
        struct vq_desc *t = bench_ind[slot];
        t[0] = (struct vq_desc){ (u64)&s->hdr, 16, VD_NEXT, 1 };
        t[1] = (struct vq_desc){ (u64)bench_data[slot], bb.req, (u16)(dflags | VD_NEXT), 2 };
        t[2] = (struct vq_desc){ (u64)&s->status, 1, VD_WRITE, 0 };
        vq_set_desc(&blk_vq, (u16)slot, (u64)t, 3 * sizeof(struct vq_desc), VD_INDIRECT, 0);
        vq_add(&blk_vq, (u16)slot);
    } else {
        u16 d = (u16)(3 * slot);
        vq_set_desc(&blk_vq, d, (u64)&s->hdr, 16, VD_NEXT, (u16)(d + 1));
        vq_set_desc(&blk_vq, (u16)(d + 1), (u64)bench_data[slot], bb.req, (u16)(dflags | VD_NEXT), (u16)(d + 2));
        vq_set_desc(&blk_vq, (u16)(d + 2), (u64)&s->status, 1, VD_WRITE, 0);
        vq_add(&blk_vq, d);
    }
    bb.issued++;
}

/* Ring 3: keeps `depth` requests in flight until `total` completed. Returns the TSC cycles taken. */
static u64 bench_loop(u64 arg)
{
    (void)arg;
    u64 t0 = rdtsc();
    for (u32 i = 0; i < bb.depth && bb.issued < bb.total; i++) bench_issue(i);
    vq_publish(&blk_vq);
    vq_kick(&blk_vq);
    bb.kicks++;
    /* rdtsc only every 4096 idle polls (for the timeout): it may trap to the hypervisor (it does on the
     * nested-PVM dev host), which would make each poll iteration an exit. */
    u64 progress = rdtsc();
    u32 idle = 0;
    while (bb.done < bb.total) {
        u32 id, len, got = 0;
        while (vq_poll(&blk_vq, &id, &len)) {
            u32 slot = bb.indirect ? id : id / 3;
            if ((!bb.indirect && id % 3) || slot >= bb.depth || !bench_slot[slot].busy) blk_fail("bench_used_id", id);
            struct bench_slot *s = &bench_slot[slot];
            if (bb.write ? len < 1 || len > 1 : len != bb.req + 1) blk_fail("bench_used_len", len);
            if (s->status != 0) blk_fail("bench_status", s->status);
            if (bb.verify && !bb.write) bench_check(slot, s->sector);
            s->busy = 0;
            bb.done++;
            got++;
            if (bb.issued < bb.total) bench_issue(slot);
        }
        if (got) {
            idle = 0;
            if (blk_vq.inflight && (u16)(blk_vq.avail_idx - blk_vq.avail[1])) {
                vq_publish(&blk_vq);                   /* ends with a full fence: used.flags is read after */
                if (!(blk_vq.used[0] & VQ_USED_F_NO_NOTIFY)) { vq_kick(&blk_vq); bb.kicks++; }
            }
        } else if (++idle % 4096 == 0) {
            u64 now = rdtsc();
            if (idle == 4096) progress = now;           /* first check of an idle stretch */
            else if (now - progress > tsc_per_ms() * 10000) blk_fail("bench_timeout", bb.done);
        } else {
            __asm__ volatile("pause");
        }
    }
    return rdtsc() - t0;
}

void test_blkbench(void)
{
    char mode[16];
    if (!param("blk.mode", mode, sizeof(mode))) memcpy(mode, "read", 5);
    if (!streq(mode, "read") && !streq(mode, "write")) { puts("PROBE error blkbench_mode="); puts(mode); puts("\n"); finish(2); }
    bb.write = streq(mode, "write");
    u64 req = param_u64("blk.req", 4096), bytes = param_u64("blk.bytes", 16ull << 20), depth = param_u64("blk.depth", 8);
    bb.verify = param_u64("blk.verify", 0) != 0;
    bb.seed = param_u64("blk.seed", 0x5eed) & 0xffffffffull;
    bb.start = param_u64("blk.start", 0);
    if (req == 0 || req % 512 || req > BENCH_MAX_REQ) blk_fail("bench_req", req);
    if (bytes == 0) blk_fail("bench_bytes", bytes);
    if (depth == 0) blk_fail("bench_depth", depth);
    bb.req = (u32)req;

    virtio_begin(&blk, (1ull << VBLK_F_FLUSH) | (1ull << VIRTIO_F_INDIRECT_DESC));
    blk_dev_feat = blk.dev_feat;
    bb.indirect = (blk.drv_feat >> VIRTIO_F_INDIRECT_DESC) & 1;
    virtio_queue_setup(&blk, &blk_vq, 0, bench_vq_page, VQ_MAX);
    u64 cap = (u64)virtio_cfg32(&blk, 4) << 32 | virtio_cfg32(&blk, 0);
    vq_no_interrupt(&blk_vq, 1);
    virtio_driver_ok(&blk);
    if (bb.write && (blk_dev_feat >> VBLK_F_RO) & 1) blk_fail("bench_read_only", blk_dev_feat);
    u64 maxdepth = bb.indirect ? blk_vq.num : blk_vq.num / 3;
    bb.depth = (u32)(depth < maxdepth ? depth : maxdepth);
    if (bb.depth == 0) blk_fail("bench_queue_too_small", blk_vq.num);
    if (bb.start >= cap || (cap - bb.start) * 512 < req) blk_fail("bench_range", cap);
    bb.span_sectors = (cap - bb.start) / (req / 512) * (req / 512);
    bb.total = (bytes + req - 1) / req;
    puts("PROBE blk_dev"); kvx("addr", blk.base); kvx("size", blk.size); kv("irq", blk.irq); kvx("features", blk_dev_feat);
    kv("capacity", cap); kv("queue_num", blk_vq.num); kv("queue_num_max", blk_vq.num_max); kv("indirect", (u64)bb.indirect); puts("\n");

    u64 cycles = in_user(bench_loop, 0);
    if (cycles == USER_FAULTED) blk_fail("bench_ring3_fault", user_fault_vector);
    int ok = bb.done == bb.total && bb.bad == 0 && blk_vq.inflight == 0;
    puts("PROBE blkbench"); puts(" mode="); puts(mode); kv("req", bb.req); kv("depth", bb.depth);
    kv("bytes", bb.total * bb.req); kv("requests", bb.done); kv("cycles", cycles); kv("tsc_khz", tsc_khz);
    kv("kicks", bb.kicks); kv("start", bb.start); kv("span_sectors", bb.span_sectors); kv("verify", (u64)bb.verify);
    if (bb.verify) kv("bad_words", bb.bad);
    kv("ok", (u64)ok); puts("\n");
    virtio_reset(&blk);
    finish(ok ? 0 : 1);
}
