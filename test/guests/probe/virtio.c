/* virtio-mmio v2 transport + split virtqueues for the probe guest (see virtio.h). */
#include "virtio.h"

void virtio_fail(const struct virtio_dev *d, const char *why, u64 v)
{
    puts("PROBE error "); puts(d->name); puts("_"); puts(why); kvx("value", v); puts("\n");
    finish(1);
}

int virtio_mmio_param(unsigned index, u64 *addr, u64 *size, u64 *irq)
{
    const char *key = "virtio_mmio.device=";
    for (const char *p = cmdline; *p; ) {
        while (*p == ' ') p++;
        const char *q = p, *k = key;
        while (*k && *q == *k) { q++; k++; }
        while (*p && *p != ' ') p++;
        if (*k) continue;
        if (index--) continue;
        int ok;
        u64 sz = parse_num(q, &q, &ok);
        if (!ok) return 0;
        if (*q == 'K' || *q == 'k') { sz <<= 10; q++; }
        else if (*q == 'M' || *q == 'm') { sz <<= 20; q++; }
        if (*q++ != '@') return 0;
        u64 a = parse_num(q, &q, &ok);
        if (!ok || *q++ != ':') return 0;
        u64 i = parse_num(q, &q, &ok);
        if (!ok || (*q && *q != ' ')) return 0;
        /* Must be a window the page tables map (identity below 4 GiB) above RAM, holding the registers. */
        if (sz < 0x200 || sz > 0x100000 || a < 0xc0000000ull || a + sz > 0x100000000ull || (a & 3)) return 0;
        *addr = a; *size = sz; *irq = i;
        return 1;
    }
    return -1;
}

static void virtio_find(struct virtio_dev *d)
{
    u64 addr = 0, size = 0, irq = 0;
    for (unsigned i = 0; i < 32; i++) {
        int found = virtio_mmio_param(i, &addr, &size, &irq);
        if (found == 0) virtio_fail(d, "bad_virtio_mmio_device_param", i);
        if (found < 0) {
            if (i == 0) virtio_fail(d, "no_virtio_mmio_device_param", i);
            puts("PROBE error "); puts(d->name); puts("_no_"); puts(d->name); puts("_device"); kvx("value", i); puts("\n");
            finish(1);
        }
        d->base = addr; d->size = size; d->irq = irq;
        if (vm_r(d, VM_MAGIC) != 0x74726976) virtio_fail(d, "magic", vm_r(d, VM_MAGIC));
        if (vm_r(d, VM_DEVICE_ID) == d->device_id) return;
    }
    virtio_fail(d, "too_many_devices", 32);
}

void virtio_begin(struct virtio_dev *d, u64 wanted)
{
    virtio_find(d);
    u32 ver = vm_r(d, VM_VERSION);
    if (ver != 2) virtio_fail(d, "version", ver);     /* legacy (1) transports are not supported */
    vm_w(d, VM_STATUS, 0);
    if (vm_r(d, VM_STATUS) != 0) virtio_fail(d, "reset", vm_r(d, VM_STATUS));
    vm_w(d, VM_STATUS, VS_ACK);
    vm_w(d, VM_STATUS, VS_ACK | VS_DRIVER);
    vm_w(d, VM_DEV_FEAT_SEL, 0); u64 lo = vm_r(d, VM_DEV_FEAT);
    vm_w(d, VM_DEV_FEAT_SEL, 1); u64 hi = vm_r(d, VM_DEV_FEAT);
    d->dev_feat = hi << 32 | lo;
    if (!(d->dev_feat & (1ull << VIRTIO_F_VERSION_1))) virtio_fail(d, "no_version_1", d->dev_feat);
    d->drv_feat = (1ull << VIRTIO_F_VERSION_1) | (d->dev_feat & wanted);
    vm_w(d, VM_DRV_FEAT_SEL, 0); vm_w(d, VM_DRV_FEAT, (u32)d->drv_feat);
    vm_w(d, VM_DRV_FEAT_SEL, 1); vm_w(d, VM_DRV_FEAT, (u32)(d->drv_feat >> 32));
    vm_w(d, VM_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
    if (!(vm_r(d, VM_STATUS) & VS_FEATURES_OK)) virtio_fail(d, "features_not_ok", vm_r(d, VM_STATUS));
}

void virtio_queue_setup(struct virtio_dev *d, struct virtq *q, u16 index, u8 *page, u16 want)
{
    vm_w(d, VM_QUEUE_SEL, index);
    if (vm_r(d, VM_QUEUE_READY) != 0) virtio_fail(d, "queue_already_ready", 1);
    u32 max = vm_r(d, VM_QUEUE_NUM_MAX);
    if (max == 0) virtio_fail(d, "queue_num_max", max);
    if (want > VQ_MAX) want = VQ_MAX;
    u16 num = max < want ? (u16)max : want;
    if (num & (num - 1)) virtio_fail(d, "queue_num_max_not_pow2", max);
    memset(page, 0, 4096);
    q->dev = d; q->index = index; q->num = num; q->num_max = max > 0xffff ? 0xffff : (u16)max;
    q->avail_idx = q->used_seen = q->inflight = 0;
    q->page = page;
    q->desc = (volatile struct vq_desc *)page;
    q->avail = (volatile u16 *)(page + 0x800);
    q->used = (volatile u16 *)(page + 0xa00);
    q->used_elem = (volatile struct vq_used_elem *)(page + 0xa04);
    vm_w(d, VM_QUEUE_NUM, num);
    u64 pa = (u64)page;
    vm_w(d, VM_DESC_LO, (u32)pa);            vm_w(d, VM_DESC_HI, (u32)(pa >> 32));
    vm_w(d, VM_AVAIL_LO, (u32)(pa + 0x800)); vm_w(d, VM_AVAIL_HI, (u32)((pa + 0x800) >> 32));
    vm_w(d, VM_USED_LO, (u32)(pa + 0xa00));  vm_w(d, VM_USED_HI, (u32)((pa + 0xa00) >> 32));
    vm_w(d, VM_QUEUE_READY, 1);
    if (vm_r(d, VM_QUEUE_READY) != 1) virtio_fail(d, "queue_ready", vm_r(d, VM_QUEUE_READY));
}

void virtio_driver_ok(struct virtio_dev *d)
{
    vm_w(d, VM_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
    u32 st = vm_r(d, VM_STATUS);
    if (st & (VS_NEEDS_RESET | VS_FAILED) || !(st & VS_DRIVER_OK)) virtio_fail(d, "driver_ok", st);
}

void virtio_reset(struct virtio_dev *d) { vm_w(d, VM_STATUS, 0); }

int vq_poll(struct virtq *q, u32 *id, u32 *len)
{
    u16 idx = q->used[1];
    if (idx == q->used_seen) return 0;
    barrier();
    if ((u16)(idx - q->used_seen) > q->inflight) virtio_fail(q->dev, "used_idx_jump", idx);
    volatile struct vq_used_elem *e = &q->used_elem[q->used_seen % q->num];
    u32 i = e->id, l = e->len;
    q->used_seen++;
    q->inflight--;
    if (i >= q->num) virtio_fail(q->dev, "used_id", i);
    *id = i; *len = l;
    return 1;
}

void vq_wait(struct virtq *q, u32 *id, u32 *len, u64 timeout_ms)
{
    u64 end = rdtsc() + tsc_per_ms() * timeout_ms;
    while (!vq_poll(q, id, len)) {
        if (rdtsc() > end) virtio_fail(q->dev, "timeout", vm_r(q->dev, VM_STATUS));
        __asm__ volatile("pause");
    }
}

u32 vq_submit(struct virtq *q, const u64 *addr, const u32 *len, const u16 *wr, int n)
{
    for (int i = 0; i < n; i++)
        vq_set_desc(q, (u16)i, addr[i], len[i], (u16)((i + 1 < n ? VD_NEXT : 0) | (wr[i] ? VD_WRITE : 0)),
                    (u16)(i + 1 < n ? i + 1 : 0));
    vq_add(q, 0);                                       /* head: descriptor 0 */
    vq_publish(q);
    vq_kick(q);
    u64 end = rdtsc() + tsc_per_ms() * 5000;            /* 5 s */
    u16 idx;
    while ((idx = q->used[1]) == q->used_seen) {
        if (rdtsc() > end) virtio_fail(q->dev, "timeout", vm_r(q->dev, VM_STATUS));
        __asm__ volatile("pause");
    }
    barrier();
    if ((u16)(idx - q->used_seen) != 1) virtio_fail(q->dev, "used_idx_jump", idx);
    volatile struct vq_used_elem *e = &q->used_elem[q->used_seen % q->num];
    u32 id = e->id, ulen = e->len;
    q->used_seen = idx;
    q->inflight--;
    if (id != 0) virtio_fail(q->dev, "used_id", id);
    u32 max = 0;
    for (int i = 0; i < n; i++) if (wr[i]) max += len[i];
    if (ulen > max) virtio_fail(q->dev, "used_len", ulen);
    if (vm_r(q->dev, VM_INT_STATUS) & 1) vm_w(q->dev, VM_INT_ACK, 1);  /* polled: just acknowledge */
    return ulen;
}
