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

