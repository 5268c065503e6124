/*
 * virtio-rng driver (probe.test=rng, DeviceID 4): reads probe.rng.bytes bytes in requests of at most
 * probe.rng.chunk bytes, one request in flight, polled in ring 3. Every used element is checked (id = the
 * posted head, 0 < len ≤ the buffer); the data must look random: ≥ 200 distinct byte values in every
 * full 4096-byte block (a shorter tail: ≥ 3/4 of the expected count), no run of 16 equal bytes.
 */
#include "virtio.h"

#define RNG_MAX (256 * 1024)
#define RNG_QSIZE 8

static u8 rng_vq_page[4096] __attribute__((aligned(4096)));
static u8 rng_buf[RNG_MAX] __attribute__((aligned(4096)));
static struct virtio_dev rng = { .name = "rng", .device_id = VIRTIO_ID_RNG };
static struct virtq rng_vq;

static u64 rng_bytes, rng_chunk, rng_requests, rng_cycles;

/* Ring 3: the request loop. Returns 0 (errors finish() directly). */
static u64 rng_loop(u64 unused)
{
    (void)unused;
    memset(rng_buf, 0, rng_bytes);                   /* poison: a device that writes nothing fails the checks */
    u64 got = 0;
    u64 t0 = rdtsc();
    while (got < rng_bytes) {
        u32 want = (u32)(rng_bytes - got < rng_chunk ? rng_bytes - got : rng_chunk);
        u16 head = (u16)(rng_requests % rng_vq.num);   /* a different descriptor each time */
        vq_set_desc(&rng_vq, head, (u64)(rng_buf + got), want, VD_WRITE, 0);
        vq_add(&rng_vq, head);
        vq_publish(&rng_vq);
        vq_kick(&rng_vq);
        u32 id, len;
        vq_wait(&rng_vq, &id, &len, 5000);
        if (id != head) virtio_fail(&rng, "used_id", id);
        if (len == 0) virtio_fail(&rng, "used_len_zero", rng_requests);
        if (len > want) virtio_fail(&rng, "used_len", len);
        got += len;
        rng_requests++;
    }
    rng_cycles = rdtsc() - t0;
    return 0;
}

/* Expected number of distinct byte values in n uniform random bytes: 256 * (1 - (255/256)^n), fixed point. */
static u64 expected_distinct(u64 n)
{
    u64 p = 1ull << 32;                               /* (255/256)^i scaled by 2^32 */
    for (u64 i = 0; i < n; i++) p = p * 255 / 256;
    return (256 * ((1ull << 32) - p)) >> 32;
}

static u32 distinct_in(const u8 *p, u64 n)
{
    u8 seen[256];
    memset(seen, 0, sizeof(seen));
    u32 d = 0;
    for (u64 i = 0; i < n; i++) if (!seen[p[i]]) { seen[p[i]] = 1; d++; }
    return d;
}

/* Ring 3 (byte loops are slow in the emulated ring 0): the randomness checks. */
static u32 rng_min_distinct;
static int rng_distinct_ok;
static u64 rng_max_run, rng_zero_run;
static u64 rng_check(u64 unused)
{
    (void)unused;
    u32 min_distinct = 256;
    int distinct_ok = 1;
    for (u64 off = 0; off < rng_bytes; off += 4096) {
        u64 n = rng_bytes - off < 4096 ? rng_bytes - off : 4096;
        u32 d = distinct_in(rng_buf + off, n);
        if (d < min_distinct) min_distinct = d;
        u64 need = n == 4096 ? 200 : expected_distinct(n) * 3 / 4;
        if (d < need) distinct_ok = 0;
    }
    u64 max_run = 1, zero_run = 0, run = 1, zrun = 0;
    for (u64 i = 0; i < rng_bytes; i++) {
        if (i > 0 && rng_buf[i] == rng_buf[i - 1]) run++; else run = 1;
        if (run > max_run) max_run = run;
        if (rng_buf[i] == 0) zrun++; else zrun = 0;
        if (zrun > zero_run) zero_run = zrun;
    }
    rng_min_distinct = min_distinct; rng_distinct_ok = distinct_ok; rng_max_run = max_run; rng_zero_run = zero_run;
    return 0;
}

void test_rng(void)
{
    rng_bytes = param_u64("rng.bytes", 4096);
    rng_chunk = param_u64("rng.chunk", 256);
    if (rng_bytes == 0 || rng_bytes > RNG_MAX) virtio_fail(&rng, "bad_bytes_param", rng_bytes);
    if (rng_chunk == 0 || rng_chunk > RNG_MAX) virtio_fail(&rng, "bad_chunk_param", rng_chunk);
    virtio_begin(&rng, 0);
    virtio_queue_setup(&rng, &rng_vq, 0, rng_vq_page, RNG_QSIZE);
    virtio_driver_ok(&rng);
    vq_no_interrupt(&rng_vq, 1);
    puts("PROBE rng_dev"); kvx("addr", rng.base); kvx("size", rng.size); kv("irq", rng.irq); kvx("features", rng.dev_feat);
    kv("queue_num", rng_vq.num); kv("queue_num_max", rng_vq.num_max); puts("\n");
    u64 r = in_user(rng_loop, 0);
    if (r == USER_FAULTED) { puts("PROBE error rng_ring3_fault"); kv("vector", user_fault_vector); puts("\n"); finish(1); }
    r = in_user(rng_check, 0);
    if (r == USER_FAULTED) { puts("PROBE error rng_ring3_fault"); kv("vector", user_fault_vector); puts("\n"); finish(1); }
    int ok = rng_distinct_ok && rng_max_run < 16;
    puts("PROBE rng"); kv("bytes", rng_bytes); kv("chunk", rng_chunk); kv("requests", rng_requests);
    kv("distinct", rng_min_distinct); kv("zero_run", rng_zero_run); kv("max_run", rng_max_run); kv("ok", (u64)ok);
    kv("cycles", rng_cycles); kv("cycles_per_req", rng_requests ? rng_cycles / rng_requests : 0); kv("tsc_khz", tsc_khz);
    puts("\n");
    virtio_reset(&rng);
    finish(ok ? 0 : 1);
}
