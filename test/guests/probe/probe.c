/*
 * Probe guest: a tiny long-mode program for kvmkit tests and benchmarks.
 *
 * Cmdline: probe.test=<hello|pio|mmio|smp|timer|exit|fault|blk|rng|net> [probe.iters=N] [probe.ring=0|3]
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
#define MAX_CPUS    64

/* ---- low-level helpers ---- */
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{ __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0)); }
static inline void wrmsr(u32 msr, u64 v)
{ __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32))); }
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }

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
void puts(const char *s) { while (*s) { if (*s == '\n') serial_putc('\r'); serial_putc(*s++); } }
void putu(u64 v)
{
    char buf[21]; int i = 20; buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(buf + i);
}
void putx(u64 v)
{
    char buf[19]; int i = 18; buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x'; buf[--i] = '0';
    puts(buf + i);
}
void kv(const char *k, u64 v) { puts(" "); puts(k); puts("="); putu(v); }
void kvx(const char *k, u64 v) { puts(" "); puts(k); puts("="); putx(v); }

void finish(u32 status)
{
    puts("PROBE DONE status="); putu(status); puts("\n");
    u16 cs; __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (;;) {
        outb(DEBUG_EXIT, (u8)status);
        if ((cs & 3) == 0) __asm__ volatile("cli; hlt");
        else __asm__ volatile("pause");           /* ring 3: cli/hlt would fault */
    }
}

/* ---- cmdline ---- */
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
#define HVM_START_MAGIC 0x336ec578
char cmdline[1024];

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
const char *param(const char *name, char *out, unsigned outlen)
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

u64 param_u64(const char *name, u64 dflt)
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

int streq(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }

/* Number at s (decimal or 0x-hex); *end past it. Returns 0 with *ok = 0 when there is no digit. */
u64 parse_num(const char *s, const char **end, int *ok)
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
volatile u64 user_fault_vector;
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
u64 in_user(u64 (*fn)(u64), u64 arg)
{
    user_fault_ok = 1; user_fault_vector = 0;
    u64 r = run_user(fn, arg, (u64)user_stack + sizeof(user_stack));
    user_fault_ok = 0;
    return r;
}

/* ---- TSC frequency: kvmclock, else PIT channel 2, else unknown (0) ---- */
u64 tsc_khz;
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

/* rdtsc back to back: on a host that traps RDTSC (the nested-PVM dev host may) each one is an exit. */
static u64 user_tsc(u64 n)
{
    u64 t0 = rdtsc(), x = 0;
    for (u64 i = 0; i < n; i++) x += rdtsc();
    barrier();
    return rdtsc() - t0 + (x & 0);
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
    if (streq(test, "tsc")) loop_test("tsc", user_tsc);
    if (streq(test, "timer")) test_timer();
    if (streq(test, "blk")) test_blk();
    if (streq(test, "blkbench")) test_blkbench();
    if (streq(test, "rng")) test_rng();
    if (streq(test, "net")) test_net();
    puts("PROBE error unknown_test="); puts(test); puts("\n");
    finish(2);
}
