/*
 * Minimal virtio-mmio v2 (modern) transport and split virtqueues for the probe guest, polled (no
 * interrupts). Generic over the device id and the number of queues; each queue lives in its own
 * static 4 KiB page (descriptors at 0, avail ring at 0x800, used ring at 0xa00: up to 128 entries).
 *
 * Everything after virtio_driver_ok() (vq_* ring operations, config reads, virtio_fail) is plain
 * loads/stores, rdtsc and port I/O: callable from ring 3 (in_user), where the hot loops run.
 * Every value the device writes (used idx, id, len) is checked; a violation prints
 * "PROBE error <name>_<what> value=0x..." and finishes with status 1.
 */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "probe.h"

#define VM_MAGIC        0x000
#define VM_VERSION      0x004
#define VM_DEVICE_ID    0x008
#define VM_DEV_FEAT     0x010
#define VM_DEV_FEAT_SEL 0x014
#define VM_DRV_FEAT     0x020
#define VM_DRV_FEAT_SEL 0x024
#define VM_QUEUE_SEL    0x030
#define VM_QUEUE_NUM_MAX 0x034
#define VM_QUEUE_NUM    0x038
#define VM_QUEUE_READY  0x044
#define VM_QUEUE_NOTIFY 0x050
#define VM_INT_STATUS   0x060
#define VM_INT_ACK      0x064
#define VM_STATUS       0x070
#define VM_DESC_LO      0x080
#define VM_DESC_HI      0x084
#define VM_AVAIL_LO     0x090
#define VM_AVAIL_HI     0x094
#define VM_USED_LO      0x0a0
#define VM_USED_HI      0x0a4
#define VM_CONFIG_GEN   0x0fc
#define VM_CONFIG       0x100

#define VS_ACK 1
#define VS_DRIVER 2
#define VS_DRIVER_OK 4
#define VS_FEATURES_OK 8
#define VS_NEEDS_RESET 64
#define VS_FAILED 128

#define VIRTIO_F_VERSION_1 32
#define VD_NEXT 1
#define VD_WRITE 2
#define VQ_AVAIL_F_NO_INTERRUPT 1
#define VQ_MAX 128                     /* largest queue that fits the one-page layout */

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLK 2
#define VIRTIO_ID_RNG 4

struct vq_desc { u64 addr; u32 len; u16 flags, next; };
struct vq_used_elem { u32 id, len; };

struct virtio_dev {
    const char *name;                  /* error prefix: "PROBE error <name>_<what>" */
    u32 device_id;
    u64 base, size, irq;               /* from the virtio_mmio.device= entry */
    u64 dev_feat, drv_feat;
};

struct virtq {
    struct virtio_dev *dev;
    u16 index, num, num_max;
    u16 avail_idx;                     /* next avail.idx to publish */
    u16 used_seen;                     /* used.idx consumed so far */
    u16 inflight;                      /* published and not yet seen used */
    u8 *page;
    volatile struct vq_desc *desc;
    volatile u16 *avail;               /* flags, idx, ring[num], used_event */
    volatile u16 *used;                /* flags, idx, then elems */
    volatile struct vq_used_elem *used_elem;
};

static inline u32 vm_r(const struct virtio_dev *d, u32 off) { return *(volatile u32 *)(d->base + off); }
static inline void vm_w(const struct virtio_dev *d, u32 off, u32 v) { *(volatile u32 *)(d->base + off) = v; }
static inline u8 virtio_cfg8(const struct virtio_dev *d, u32 off) { return *(volatile u8 *)(d->base + VM_CONFIG + off); }
static inline u16 virtio_cfg16(const struct virtio_dev *d, u32 off) { return *(volatile u16 *)(d->base + VM_CONFIG + off); }
static inline u32 virtio_cfg32(const struct virtio_dev *d, u32 off) { return *(volatile u32 *)(d->base + VM_CONFIG + off); }

__attribute__((noreturn)) void virtio_fail(const struct virtio_dev *d, const char *why, u64 v);

/* The index-th "virtio_mmio.device=<size>[K|M]@<addr>:<irq>" on the cmdline: 1 if found and sane,
 * 0 if malformed or outside the MMIO window, -1 if there is no such entry. */
int virtio_mmio_param(unsigned index, u64 *addr, u64 *size, u64 *irq);

/* Finds the first transport with magic "virt" and d->device_id among the cmdline entries, checks
 * version 2, resets it, ACKNOWLEDGE|DRIVER, negotiates dev_feat & wanted (VERSION_1 required and
 * always included), FEATURES_OK (checked). Fails with <name>_no_<name>_device etc. */
void virtio_begin(struct virtio_dev *d, u64 wanted);
/* Sets up queue `index` in `page` (4 KiB, aligned) with min(want, QueueNumMax) entries (power of 2,
 * want ≤ VQ_MAX). Must come after virtio_begin and before virtio_driver_ok. */
void virtio_queue_setup(struct virtio_dev *d, struct virtq *q, u16 index, u8 *page, u16 want);
/* DRIVER_OK; fails if the device reports NEEDS_RESET/FAILED. */
void virtio_driver_ok(struct virtio_dev *d);
/* Writes 0 to the status register (the device lets go of the queues). */
void virtio_reset(struct virtio_dev *d);

/* ---- ring operations (ring-3 safe) ---- */
static inline void vq_set_desc(struct virtq *q, u16 i, u64 addr, u32 len, u16 flags, u16 next)
{
    q->desc[i].addr = addr; q->desc[i].len = len; q->desc[i].flags = flags; q->desc[i].next = next;
}
/* Puts head into the avail ring (visible to the device only after vq_publish). */
static inline void vq_add(struct virtq *q, u16 head)
{
    q->avail[2 + q->avail_idx % q->num] = head;
    q->avail_idx++;
    q->inflight++;
}
/* Makes added heads visible (store fence + avail.idx). */
static inline void vq_publish(struct virtq *q) { mb(); q->avail[1] = q->avail_idx; mb(); }
static inline void vq_kick(struct virtq *q) { vm_w(q->dev, VM_QUEUE_NOTIFY, q->index); }
/* Whether the device may skip interrupts for this queue (we poll). */
static inline void vq_no_interrupt(struct virtq *q, int on) { q->avail[0] = on ? VQ_AVAIL_F_NO_INTERRUPT : 0; }
/* Consumes one used element if there is one: 1 and *id, *len set; 0 if none. Checks that used.idx
 * did not run ahead of what was published and that id < num. */
int vq_poll(struct virtq *q, u32 *id, u32 *len);
/* vq_poll until one arrives, failing with <name>_timeout after timeout_ms. */
void vq_wait(struct virtq *q, u32 *id, u32 *len, u64 timeout_ms);
/* Synchronous single chain: descriptors 0..n-1 (wr[i]: device-writable), publish, notify, wait
 * 5 s; checks used.idx advanced by exactly 1, id 0, used length ≤ the writable bytes; acks the
 * interrupt status. Returns the used length. Needs an otherwise idle queue. */
u32 vq_submit(struct virtq *q, const u64 *addr, const u32 *len, const u16 *wr, int n);
#endif
