/*
 * Probe guest: a tiny long-mode program for kvmkit tests and benchmarks.
 *
 * Cmdline: probe.test=<hello|pio|mmio|smp|timer|exit|fault|blk> [probe.iters=N] [probe.ring=0|3]
 *          [probe.status=N] [probe.ms=N] [probe.period=N] [probe.tsc=pit]
 * Output (16550 UART at 0x3f8): "PROBE <test> key=value ..." lines, then
 * "PROBE DONE status=N", then `out 0xf4` with N (0 = pass). An unexpected exception
 * prints "PROBE FAULT ..." and exits with 0x7f.
 *
 * Ring 0 is slow on the nested-PVM development host (emulated, ~1 us per instruction),
 * so hot loops run in ring 3 (run_user) and ring-0 work is kept short.
 */
#include "probe.h"

#define COM1        0x3f8
#define DEBUG_EXIT  0xf4
#define PIO_PORT    0xe0
#define MMIO_ADDR   0xd0000000ull
#define LAPIC       0xfee00000ull
#define USER_FAULTED (~0ull)
#define MAX_CPUS    64

/* ---- low-level helpers ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{ __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0)); }
static inline void wrmsr(u32 msr, u64 v)
{ __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
#define barrier() __asm__ volatile("" ::: "memory")

void *memcpy(void *d, const void *s, unsigned long n)
{ u8 *dp = d; const u8 *sp = s; while (n--) *dp++ = *sp++; return d; }
void *memset(void *d, int c, unsigned long n)
{ u8 *dp = d; while (n--) *dp++ = (u8)c; return d; }

/* ---- serial output (polling LSR.THRE) ---- */
static volatile u32 print_lock;
static void lock(void) { while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE)) __asm__ volatile("pause"); }
static void unlock(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

static void serial_putc(char c)
{
    for (u32 spins = 0; !(inb(COM1 + 5) & 0x20) && spins < 100000; spins++)
        ;
    outb(COM1, (u8)c);
}
static void puts(const char *s) { while (*s) { if (*s == '\n') serial_putc('\r'); serial_putc(*s++); } }
static void putu(u64 v)
{
    char buf[21]; int i = 20; buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(buf + i);
}
static void putx(u64 v)
{
    char buf[19]; int i = 18; buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x'; buf[--i] = '0';
    puts(buf + i);
}
static void kv(const char *k, u64 v) { puts(" "); puts(k); puts("="); putu(v); }
static void kvx(const char *k, u64 v) { puts(" "); puts(k); puts("="); putx(v); }

__attribute__((noreturn)) static void finish(u32 status)
{
    puts("PROBE DONE status="); putu(status); puts("\n");
    for (;;) {
        outb(DEBUG_EXIT, (u8)status);
        __asm__ volatile("cli; hlt");
    }
}

/* ---- cmdline ---- */
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
#define HVM_START_MAGIC 0x336ec578
static char cmdline[1024];

static void copy_cmdline(void)
{
    const struct hvm_start_info *si = (const void *)start_info_pa;
    if (!start_info_pa || si->magic != HVM_START_MAGIC || !si->cmdline_paddr ||
        si->cmdline_paddr >= 0xc0000000ull)
        return;
    const char *src = (const char *)si->cmdline_paddr;
    for (unsigned i = 0; i < sizeof(cmdline) - 1 && src[i]; i++) cmdline[i] = src[i];
}

/* Value of "probe.<name>=" in the cmdline, or 0. Writes the token into out[]. */
static const char *param(const char *name, char *out, unsigned outlen)
{
    for (const char *p = cmdline; *p; ) {
        while (*p == ' ') p++;
        const char *tok = p;
        while (*p && *p != ' ') p++;
        const char *q = tok, *pre = "probe.";
        while (*pre && *q == *pre) { q++; pre++; }
        if (*pre) continue;
        const char *n = name;
        while (*n && *q == *n) { q++; n++; }
        if (*n || *q != '=') continue;
        q++;
        unsigned i = 0;
        while (q < p && i < outlen - 1) out[i++] = *q++;
        out[i] = 0;
        return out;
    }
    return 0;
}

static u64 param_u64(const char *name, u64 dflt)
{
    char buf[32];
    const char *s = param(name, buf, sizeof(buf));
    if (!s || !*s) return dflt;
    u64 v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2; *s; s++) {
            char c = *s;
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
                    c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0) return dflt;
            v = v * 16 + (u64)d;
        }
    } else {
        for (; *s; s++) { if (*s < '0' || *s > '9') return dflt; v = v * 10 + (u64)(*s - '0'); }
    }
    return v;
}

static int streq(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }

/* ---- CPU setup: IDT, TSS ---- */
struct idt_entry { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, zero; };
extern struct idt_entry idt[256];
/* 64-bit TSS + an all-zero I/O permission bitmap (every port allowed) + 0xff terminator.
 * This host ignores IOPL in guest ring 3 but honours the bitmap, so ring-3 in/out works. */
#define TSS_SIZE (104 + 8192 + 1)
static u8 tss[TSS_SIZE] __attribute__((aligned(16)));
static u8 trap_stack[8192] __attribute__((aligned(16)));

static void set_gate(int vec, int stub)
{
    u64 a = (u64)isr_table + 32 * (u64)stub;
    idt[vec] = (struct idt_entry){ (u16)a, SEL_KCODE, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0 };
}

static void cpu_init(void)
{
    for (int v = 0; v < 32; v++) set_gate(v, v);
    set_gate(0x20, 32);
    set_gate(0xff, 33);
    struct { u16 limit; u64 base; } __attribute__((packed)) d = { 256 * 16 - 1, (u64)idt };
    __asm__ volatile("lidt %0" :: "m"(d));
    /* TSS: RSP0 = trap_stack, used when ring 3 traps into ring 0. */
    u64 rsp0 = (u64)trap_stack + sizeof(trap_stack);
    memcpy(tss + 4, &rsp0, 8);
    tss[102] = 104;              /* I/O map base: the bitmap follows the TSS */
    tss[TSS_SIZE - 1] = 0xff;    /* bitmap terminator */
    u64 b = (u64)tss, lim = TSS_SIZE - 1;
    gdt[5] = (lim & 0xffff) | ((b & 0xffffff) << 16) | (0x89ull << 40) | (((lim >> 16) & 0xf) << 48) |
             (((b >> 24) & 0xff) << 56);
    gdt[6] = b >> 32;
    __asm__ volatile("ltr %w0" :: "r"(SEL_TSS));
}

/* ---- traps ---- */
static volatile int user_fault_ok;      /* a ring-3 fault aborts run_user instead of failing */
static volatile u64 user_fault_vector;
static volatile u64 timer_ticks;

void trap(struct frame *f)
{
    if (f->vector == 0x20) { timer_ticks++; lapic_write(0xb0, 0); return; }
    if (f->vector == 0xff) return;
    if ((f->cs & 3) == 3 && user_fault_ok) {
        user_fault_vector = f->vector;
        user_abort(USER_FAULTED);
    }
    u64 cr2; __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    puts("PROBE FAULT"); kv("vector", f->vector); kvx("error", f->error); kvx("rip", f->rip);
    kvx("cs", f->cs); kvx("rsp", f->rsp); kvx("cr2", cr2); puts("\n");
    finish(0x7f);
}

/* ---- ring 3 ---- */
static u8 user_stack[16384] __attribute__((aligned(16)));
static u64 in_user(u64 (*fn)(u64), u64 arg)
{
    user_fault_ok = 1; user_fault_vector = 0;
    u64 r = run_user(fn, arg, (u64)user_stack + sizeof(user_stack));
    user_fault_ok = 0;
    return r;
}

/* ---- TSC frequency: kvmclock, else PIT channel 2, else unknown (0) ---- */
static u64 tsc_khz;
static const char *tsc_src = "none";
struct pvclock { u32 version, pad0; u64 tsc_timestamp, system_time; u32 mul; int8_t shift; u8 flags, pad[2]; };
static volatile struct pvclock pvclock __attribute__((aligned(64)));

static void tsc_calibrate(void)
{
    u32 a, b, c, d;
    char how[16];
    int force_pit = param("tsc", how, sizeof(how)) && streq(how, "pit");   /* probe.tsc=pit */
    cpuid(0x40000000, &a, &b, &c, &d);
    if (!force_pit && b == 0x4b4d564b && c == 0x564b4d56 && d == 0x4d && a >= 0x40000001) {   /* "KVMKVMKVM" */
        cpuid(0x40000001, &a, &b, &c, &d);
        if (a & (1u << 3)) {                                        /* KVM_FEATURE_CLOCKSOURCE2 */
            wrmsr(0x4b564d01, (u64)&pvclock | 1);                   /* MSR_KVM_SYSTEM_TIME_NEW */
            for (int i = 0; i < 1000 && !pvclock.mul; i++) barrier();
            u32 mul = pvclock.mul; int sh = pvclock.shift;
            wrmsr(0x4b564d01, 0);
            if (mul) {
                u64 khz = (1000000ull << 32) / mul;
                tsc_khz = sh >= 0 ? khz >> sh : khz << -sh;
                tsc_src = "kvmclock";
                return;
            }
        }
    }
    /* PIT channel 2, mode 0, 20 ms; gate via port 0x61, OUT2 read back in bit 5. Best of 3
     * (a late poll only lengthens the interval). No PIT/speaker port: 0x61 reads 0xff, rejected. */
    const u32 latch = 1193182 / 50;
    u64 best = ~0ull;
    for (int round = 0; round < 3; round++) {
        outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
        outb(0x43, 0xb0);
        outb(0x42, latch & 0xff);
        outb(0x42, (u8)(latch >> 8));
        u64 t0 = rdtsc();
        u32 n = 0;
        while (!(inb(0x61) & 0x20) && ++n < 200000) ;
        u64 t1 = rdtsc();
        if (n <= 1 || n >= 200000) return;
        if (t1 - t0 < best) best = t1 - t0;
    }
    tsc_khz = best * 50 / 1000;
    tsc_src = "pit";
}

static void delay_us(u64 us)
{
    u64 end = rdtsc() + us * (tsc_khz ? tsc_khz / 1000 : 3000);
    while (rdtsc() < end) __asm__ volatile("pause");
}

static void report_rate(u64 iters, u64 cycles)
{
    kv("iters", iters); kv("cycles", cycles);
    if (iters) kv("cycles_per_exit", cycles / iters);
    if (iters && tsc_khz) kv("ns_per_exit", cycles * 1000000 / tsc_khz / iters);
    kv("tsc_khz", tsc_khz); puts(" tsc_src="); puts(tsc_src);
}

/* ---- MP table (Intel MP spec 1.4) ---- */
static u32 cpu_apic_ids[MAX_CPUS];
static u32 ncpus;

static int csum_ok(const u8 *p, u32 len) { u8 s = 0; while (len--) s += *p++; return s == 0; }

static const u8 *mp_find_fp(u64 start, u64 end)
{
    for (u64 a = start; a + 16 <= end; a += 16)
        if (*(const u32 *)a == 0x5f504d5f /* "_MP_" */ && csum_ok((const u8 *)a, 16))
            return (const u8 *)a;
    return 0;
}

static void mp_parse(void)
{
    ncpus = 0;
    const u8 *fp = mp_find_fp(0xf0000, 0x100000);
    if (!fp) fp = mp_find_fp(0x9fc00, 0xa0000);
    if (fp) {
        u32 cfg = *(const u32 *)(fp + 4);
        const u8 *ct = (const u8 *)(u64)cfg;
        if (cfg && cfg < 0x100000 && *(const u32 *)ct == 0x504d4350 /* "PCMP" */) {
            u32 len = *(const u16 *)(ct + 4), count = *(const u16 *)(ct + 34);
            const u8 *e = ct + 44, *end = ct + len;
            for (u32 i = 0; i < count && e < end; i++) {
                if (e[0] == 0) {                               /* processor entry, 20 bytes */
                    if ((e[3] & 1) && ncpus < MAX_CPUS) cpu_apic_ids[ncpus++] = e[1];
                    e += 20;
                } else if (e[0] <= 4) {
                    e += 8;
                } else {
                    break;
                }
            }
        }
    }
    if (!ncpus) { ncpus = 1; cpu_apic_ids[0] = lapic_read(0x20) >> 24; }
}

/* ---- tests ---- */
static u64 user_pio(u64 n)
{
    u64 t0 = rdtsc();
    for (u64 i = 0; i < n; i++) outb(PIO_PORT, (u8)i);
    return rdtsc() - t0;
}

static u64 user_mmio(u64 n)
{
    u64 t0 = rdtsc();
    for (u64 i = 0; i < n; i++) *(volatile u32 *)MMIO_ADDR = (u32)i;
    return rdtsc() - t0;
}

/* Runs loop in ring 3 (probe.ring=0 forces ring 0); if ring 3 faults (e.g. port I/O
 * without the TSS bitmap), runs it in ring 0 and reports the fault vector. */
static void loop_test(const char *name, u64 (*loop)(u64))
{
    u64 iters = param_u64("iters", 10000);
    int ring = param_u64("ring", 3) == 0 ? 0 : 3;
    u64 cycles = 0, fault = 0;
    if (ring == 3) {
        cycles = in_user(loop, iters);
        fault = user_fault_vector;
        if (cycles == USER_FAULTED) ring = 0;
    }
    if (ring == 0) cycles = loop(iters);
    puts("PROBE "); puts(name); kv("ring", (u64)ring);
    if (fault) kv("ring3_fault", fault);
    report_rate(iters, cycles); puts("\n");
    finish(0);
}

/* Deliberate fault: ring 0 runs ud2 (#UD); ring 3 writes above 4 GiB (unmapped: #PF).
 * Either must end in "PROBE FAULT vector=N ..." and status 0x7f. */
static u64 user_fault(u64 addr)
{
    *(volatile u32 *)addr = 1;
    return 0;
}

static void test_fault(void)
{
    u64 ring = param_u64("ring", 0);
    puts("PROBE fault"); kv("ring", ring == 3 ? 3 : 0); puts("\n");
    if (ring == 3) run_user(user_fault, 0x100000000ull, (u64)user_stack + sizeof(user_stack));
    else __asm__ volatile("ud2");
    puts("PROBE error fault_not_raised\n");
    finish(3);
}

static volatile u32 ap_up;

void ap_main(void)
{
    u32 id = lapic_read(0x20) >> 24;
    lock(); puts("PROBE smp cpu="); putu(id); puts(" up\n"); unlock();
    __atomic_store_n(&ap_up, 1, __ATOMIC_RELEASE);
    for (;;) __asm__ volatile("cli; hlt");
}

static u8 ap_stacks[MAX_CPUS][8192] __attribute__((aligned(16)));

static void test_smp(void)
{
    u32 bsp = lapic_read(0x20) >> 24, up = 1;
    lapic_write(0xf0, 0x1ff);                          /* software-enable the BSP's LAPIC */
    memcpy((void *)TRAMPOLINE, tramp_start, (u64)(tramp_end - tramp_start));
    lock(); puts("PROBE smp cpu="); putu(bsp); puts(" up\n"); unlock();
    for (u32 i = 0; i < ncpus; i++) {
        u32 id = cpu_apic_ids[i];
        if (id == bsp) continue;
        ap_stack_top = (u64)ap_stacks[i] + sizeof(ap_stacks[i]);
        __atomic_store_n(&ap_up, 0, __ATOMIC_RELEASE);
        lapic_write(0x310, id << 24); lapic_write(0x300, 0x4500);              /* INIT */
        delay_us(10000);
        for (int s = 0; s < 2 && !ap_up; s++) {
            lapic_write(0x310, id << 24); lapic_write(0x300, 0x4600 | (TRAMPOLINE >> 12)); /* SIPI */
            delay_us(200);
        }
        u64 end = rdtsc() + (tsc_khz ? tsc_khz : 3000000) * 2000;            /* 2 s */
        while (!__atomic_load_n(&ap_up, __ATOMIC_ACQUIRE) && rdtsc() < end) __asm__ volatile("pause");
        if (ap_up) up++;
        else { lock(); puts("PROBE smp cpu="); putu(id); puts(" timeout\n"); unlock(); }
    }
    lock(); puts("PROBE smp"); kv("cpus", up); kv("expected", ncpus); puts("\n"); unlock();
    finish(up == ncpus ? 0 : 1);
}

static void test_timer(void)
{
    u64 ms = param_u64("ms", 200), period = param_u64("period", 1000000);
    outb(0x21, 0xff); outb(0xa1, 0xff);               /* mask the 8259s */
    lapic_write(0xf0, 0x1ff);                          /* enable, spurious vector 0xff */
    lapic_write(0x3e0, 0x3);                           /* divide by 16 */
    lapic_write(0x320, 0x20 | (1u << 17));            /* vector 0x20, periodic */
    lapic_write(0x380, (u32)period);
    u64 cycles = ms * (tsc_khz ? tsc_khz : 3000000);
    u64 t0 = rdtsc(), end = t0 + cycles;
    __asm__ volatile("sti");
    while (rdtsc() < end) __asm__ volatile("pause");
    __asm__ volatile("cli");
    lapic_write(0x320, 1u << 16);                      /* mask */
    lapic_write(0x380, 0);
    puts("PROBE timer"); kv("ticks", timer_ticks); kv("ms", ms); kv("period", period);
    kv("cycles", rdtsc() - t0); kv("tsc_khz", tsc_khz); puts("\n");
    finish(timer_ticks > 0 ? 0 : 1);
}

/* ---- virtio-mmio (v2, modern) block driver: one split virtqueue, polled ---- */
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
#define VM_CONFIG       0x100
#define VS_ACK 1
#define VS_DRIVER 2
#define VS_DRIVER_OK 4
#define VS_FEATURES_OK 8
#define VS_NEEDS_RESET 64
#define VS_FAILED 128
#define VBLK_F_RO    5
#define VBLK_F_FLUSH 9
#define VIRTIO_F_VERSION_1 32
#define VBLK_T_IN 0
#define VBLK_T_OUT 1
#define VBLK_T_FLUSH 4
#define VQ_SIZE 8
#define VD_NEXT 1
#define VD_WRITE 2
#define BLK_BUF_SECTORS 128                       /* 64 KiB data buffer: largest request */

struct vq_desc { u64 addr; u32 len; u16 flags, next; };
struct vq_used_elem { u32 id, len; };
/* One page: descriptors at 0, avail ring at 0x400, used ring at 0x800 (alignments 16 / 2 / 4). */
static u8 vq_page[4096] __attribute__((aligned(4096)));
#define VQ_DESC  ((volatile struct vq_desc *)vq_page)
#define VQ_AVAIL ((volatile u16 *)(vq_page + 0x400))            /* flags, idx, ring[VQ_SIZE], used_event */
#define VQ_USED  ((volatile u16 *)(vq_page + 0x800))            /* flags, idx, then elems */
#define VQ_USED_ELEM ((volatile struct vq_used_elem *)(vq_page + 0x804))
static struct { u32 type, reserved; u64 sector; } blk_hdr __attribute__((aligned(16)));
static volatile u8 blk_status __attribute__((aligned(16)));
static u64 blk_buf[BLK_BUF_SECTORS * 64] __attribute__((aligned(4096)));

static u64 vm_base;
static u16 vq_num, avail_idx, used_seen;
static u64 blk_dev_feat;

static inline u32 vm_r(u32 off) { return *(volatile u32 *)(vm_base + off); }
static inline void vm_w(u32 off, u32 v) { *(volatile u32 *)(vm_base + off) = v; }

__attribute__((noreturn)) static void blk_fail(const char *why, u64 v)
{
    puts("PROBE error blk_"); puts(why); kvx("value", v); puts("\n");
    finish(1);
}

/* Number at s (decimal or 0x-hex); *end past it. Returns 0 with *ok = 0 when there is no digit. */
static u64 parse_num(const char *s, const char **end, int *ok)
{
    u64 v = 0; int digits = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        for (s += 2;; s++, digits++) {
            char c = *s;
            int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
                    c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
            if (d < 0 || digits >= 16) break;
            v = v * 16 + (u64)d;
        }
    } else {
        for (; *s >= '0' && *s <= '9' && digits < 19; s++, digits++) v = v * 10 + (u64)(*s - '0');
    }
    *ok = digits > 0; *end = s;
    return v;
}

/* The index-th "virtio_mmio.device=<size>[K|M]@<addr>:<irq>" on the cmdline: 1 if found and sane,
 * 0 if malformed or outside the MMIO window, -1 if there is no such entry. */
static int virtio_mmio_param(unsigned index, u64 *addr, u64 *size, u64 *irq)
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

/* Posts one chain (up to 3 descriptors) and polls the used ring. Returns the used length. */
static u32 vq_submit(const u64 *addr, const u32 *len, const u16 *wr, int n)
{
    for (int i = 0; i < n; i++) {
        VQ_DESC[i].addr = addr[i]; VQ_DESC[i].len = len[i];
        VQ_DESC[i].flags = (u16)((i + 1 < n ? VD_NEXT : 0) | (wr[i] ? VD_WRITE : 0));
        VQ_DESC[i].next = (u16)(i + 1 < n ? i + 1 : 0);
    }
    VQ_AVAIL[2 + avail_idx % vq_num] = 0;              /* head: descriptor 0 */
    __asm__ volatile("mfence" ::: "memory");
    VQ_AVAIL[1] = ++avail_idx;
    __asm__ volatile("mfence" ::: "memory");
    vm_w(VM_QUEUE_NOTIFY, 0);
    u64 end = rdtsc() + (tsc_khz ? tsc_khz : 3000000) * 5000;   /* 5 s */
    u16 idx;
    while ((idx = VQ_USED[1]) == used_seen) {
        if (rdtsc() > end) blk_fail("timeout", vm_r(VM_STATUS));
        __asm__ volatile("pause");
    }
    barrier();
    if ((u16)(idx - used_seen) != 1) blk_fail("used_idx_jump", idx);
    volatile struct vq_used_elem *e = &VQ_USED_ELEM[used_seen % vq_num];
    u32 id = e->id, ulen = e->len;
    used_seen = idx;
    if (id != 0) blk_fail("used_id", id);
    u32 max = 0;
    for (int i = 0; i < n; i++) if (wr[i]) max += len[i];
    if (ulen > max) blk_fail("used_len", ulen);
    if (vm_r(VM_INT_STATUS) & 1) vm_w(VM_INT_ACK, 1);  /* polled: just acknowledge */
    return ulen;
}

/* One block request; returns the status byte (0 OK, 1 IOERR, 2 UNSUPP). */
static u32 blk_req(u32 type, u64 sector, void *data, u32 bytes)
{
    u64 a[3]; u32 l[3]; u16 w[3]; int n = 0;
    blk_hdr.type = type; blk_hdr.reserved = 0; blk_hdr.sector = sector;
    blk_status = 0xff;
    a[n] = (u64)&blk_hdr; l[n] = 16; w[n++] = 0;
    if (bytes) { a[n] = (u64)data; l[n] = bytes; w[n++] = type == VBLK_T_IN; }
    a[n] = (u64)&blk_status; l[n] = 1; w[n++] = 1;
    u32 ulen = vq_submit(a, l, w, n);
    u32 st = blk_status;
    if (st > 2) blk_fail("status", st);
    if (ulen < 1) blk_fail("used_len_no_status", ulen);
    if (type == VBLK_T_IN && st == 0 && ulen != bytes + 1) blk_fail("read_len", ulen);
    return st;
}

/* Finds the blk device, negotiates VERSION_1 (+ FLUSH when offered), sets up queue 0. */
static void blk_init(u64 *capacity)
{
    u64 addr = 0, size = 0, irq = 0;
    unsigned i;
    for (i = 0; i < 32; i++) {
        int found = virtio_mmio_param(i, &addr, &size, &irq);
        if (found == 0) blk_fail("bad_virtio_mmio_device_param", i);
        if (found < 0) blk_fail(i == 0 ? "no_virtio_mmio_device_param" : "no_blk_device", i);
        vm_base = addr;
        if (vm_r(VM_MAGIC) != 0x74726976) blk_fail("magic", vm_r(VM_MAGIC));
        if (vm_r(VM_DEVICE_ID) == 2) break;
    }
    u32 ver = vm_r(VM_VERSION);
    if (ver != 2) blk_fail("version", ver);            /* legacy (1) transports are not supported */
    vm_w(VM_STATUS, 0);
    if (vm_r(VM_STATUS) != 0) blk_fail("reset", vm_r(VM_STATUS));
    vm_w(VM_STATUS, VS_ACK);
    vm_w(VM_STATUS, VS_ACK | VS_DRIVER);
    vm_w(VM_DEV_FEAT_SEL, 0); u64 lo = vm_r(VM_DEV_FEAT);
    vm_w(VM_DEV_FEAT_SEL, 1); u64 hi = vm_r(VM_DEV_FEAT);
    blk_dev_feat = hi << 32 | lo;
    if (!(blk_dev_feat & (1ull << VIRTIO_F_VERSION_1))) blk_fail("no_version_1", blk_dev_feat);
    u64 drv = (1ull << VIRTIO_F_VERSION_1) | (blk_dev_feat & (1ull << VBLK_F_FLUSH));
    vm_w(VM_DRV_FEAT_SEL, 0); vm_w(VM_DRV_FEAT, (u32)drv);
    vm_w(VM_DRV_FEAT_SEL, 1); vm_w(VM_DRV_FEAT, (u32)(drv >> 32));
    vm_w(VM_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK);
    if (!(vm_r(VM_STATUS) & VS_FEATURES_OK)) blk_fail("features_not_ok", vm_r(VM_STATUS));
    vm_w(VM_QUEUE_SEL, 0);
    if (vm_r(VM_QUEUE_READY) != 0) blk_fail("queue_already_ready", 1);
    u32 max = vm_r(VM_QUEUE_NUM_MAX);
    if (max == 0) blk_fail("queue_num_max", max);
    vq_num = max < VQ_SIZE ? (u16)max : VQ_SIZE;
    if (vq_num & (vq_num - 1)) blk_fail("queue_num_max_not_pow2", max);
    memset(vq_page, 0, sizeof(vq_page));
    avail_idx = used_seen = 0;
    vm_w(VM_QUEUE_NUM, vq_num);
    u64 pa = (u64)vq_page;
    vm_w(VM_DESC_LO, (u32)pa);            vm_w(VM_DESC_HI, (u32)(pa >> 32));
    vm_w(VM_AVAIL_LO, (u32)(pa + 0x400)); vm_w(VM_AVAIL_HI, (u32)((pa + 0x400) >> 32));
    vm_w(VM_USED_LO, (u32)(pa + 0x800));  vm_w(VM_USED_HI, (u32)((pa + 0x800) >> 32));
    vm_w(VM_QUEUE_READY, 1);
    if (vm_r(VM_QUEUE_READY) != 1) blk_fail("queue_ready", vm_r(VM_QUEUE_READY));
    u32 clo = vm_r(VM_CONFIG), chi = vm_r(VM_CONFIG + 4);   /* capacity (512-byte sectors) */
    *capacity = (u64)chi << 32 | clo;
    vm_w(VM_STATUS, VS_ACK | VS_DRIVER | VS_FEATURES_OK | VS_DRIVER_OK);
    u32 st = vm_r(VM_STATUS);
    if (st & (VS_NEEDS_RESET | VS_FAILED) || !(st & VS_DRIVER_OK)) blk_fail("driver_ok", st);
    puts("PROBE blk_dev"); kvx("addr", addr); kvx("size", size); kv("irq", irq); kvx("features", blk_dev_feat);
    kv("capacity", *capacity); kv("queue_num", vq_num); kv("queue_num_max", max); puts("\n");
}

/* Pattern: 8-byte word i (0..63) of sector s = seed << 32 | (s & 0xffffff) << 8 | i. */
static inline u64 blk_word(u64 seed, u64 s, u64 i) { return seed << 32 | (s & 0xffffff) << 8 | i; }

static void test_blk(void)
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
    vm_w(VM_STATUS, 0);                                /* reset: the device lets go of the queue */
    finish(ok ? 0 : 1);
}

void probe_main(void)
{
    copy_cmdline();
    cpu_init();
    outb(COM1 + 1, 0x00);                              /* UART: no interrupts */
    outb(COM1 + 3, 0x03);                              /* 8N1 */

    char test[32];
    if (!param("test", test, sizeof(test))) memcpy(test, "hello", 6);

    if (streq(test, "exit")) {
        u64 st = param_u64("status", 0) & 0xff;
        puts("PROBE exit"); kv("status", st); puts("\n");
        finish((u32)st);
    }
    mp_parse();
    if (streq(test, "hello")) {
        puts("PROBE hello"); kv("vcpus", ncpus); puts("\n");
        finish(0);
    }
    if (streq(test, "smp")) test_smp();
    if (streq(test, "fault")) test_fault();
    tsc_calibrate();
    if (streq(test, "pio")) loop_test("pio", user_pio);
    if (streq(test, "mmio")) loop_test("mmio", user_mmio);
    if (streq(test, "timer")) test_timer();
    if (streq(test, "blk")) test_blk();
    puts("PROBE error unknown_test="); puts(test); puts("\n");
    finish(2);
}
