/*
 * cfloor: the C floor VMM for kvmkit benchmarks. A minimal VMM straight on /dev/kvm:
 * no devices beyond a few ports, one pthread per vCPU, the least work per exit.
 *
 *   cfloor flat <image.bin> [--cpus N] [--mem MiB] [--arg U64] [--ring 0|3]
 *   cfloor pvh  <probe.elf> [--mem MiB] [--cmdline "..."] [--cpus N]
 *
 * flat: the machine state of kvmkit's boot-flat plugin (plugins/boot-flat/src/layout.ts),
 *   so the same guest bytes run on both:
 *   - RAM at GPA 0 (default 64 MiB), image at 0x100000, entry 0x100000;
 *   - GDT at 0x500: null, 0x08 code64 DPL0, 0x10 data DPL0, 0x18 data DPL3, 0x20 code64 DPL3,
 *     0x28 64-bit TSS descriptor (16 bytes); GDTR limit 55; IDT base 0 limit 0;
 *   - TSS at 0x7000, limit 0x2068: 104 bytes, I/O map base 0x68, an all-zero 8 KiB I/O permission
 *     bitmap and a 0xff terminator; TR = 0x28, type 11 (busy 64-bit TSS). (KVM accepts TR selector 0
 *     with limit 0x67 too, but on nested-PVM hosts guest ring 3 runs with IOPL 0 and the bitmap is
 *     what makes ring-3 in/out work, so we use the same TSS as boot-flat);
 *   - PML4 0x1000 -> PDPT 0x2000 -> PDs 0x3000..0x6000, 2 MiB pages (0x87) identity-mapping 0..4 GiB;
 *   - CR3 0x1000, CR4 PAE, CR0 0x80050033, EFER LME|LMA;
 *   - ring 3 (default): CS 0x23, SS/DS/ES/FS/GS 0x1b, RFLAGS 0x3002; ring 0: CS 0x08, data 0x10, RFLAGS 0x2;
 *   - vCPU i: RIP 0x100000, RSP 0x80000 - i*0x1000, RDI i, RSI cpus, RDX arg.
 * pvh: loads an ELF via its XEN_ELFNOTE_PHYS32_ENTRY note; hvm_start_info at 0x6000 (memmap with one
 *   RAM entry at 0x6040, cmdline at 0x7000); 32-bit protected mode, paging off, EBX = 0x6000.
 *   In-kernel irqchip + PIT. With --cpus N > 1 an Intel MP table (0xf0000) lists N CPUs and the
 *   APs wait for INIT/SIPI in the kernel's LAPIC.
 *
 * Exits: out 0x3f8 -> byte to stdout; out 0xf4 -> exit with that value; out 0xe0 -> counter++;
 *   in 0xe0 -> low 32 bits of the counter; MMIO write in 0xd0000000..+0x1000 -> counter++, read ->
 *   counter; HLT -> that vCPU ends (all ended -> exit 0); pvh only: other 16550 registers
 *   (0x3f9..0x3ff) are accepted, LSR reads 0x60 (transmitter empty). Anything else: the exit is
 *   printed and the process exits 0x7e. At exit: "cfloor exits=<n> wall_us=<n>" on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS     64
#define COUNTER_PORT 0xe0
#define EXIT_PORT    0xf4
#define COM1         0x3f8
#define MMIO_BASE    0xd0000000ull
#define MMIO_SIZE    0x1000ull
#define EXIT_UNHANDLED 0x7e

/* flat layout (boot-flat) */
#define FLAT_LOAD  0x100000ull
#define FLAT_GDT   0x500ull
#define FLAT_TSS   0x7000ull
#define FLAT_TSS_LIMIT (0x68 + 0x2000)
#define FLAT_PML4  0x1000ull
#define FLAT_PDPT  0x2000ull
#define FLAT_PD    0x3000ull
#define FLAT_STACK 0x80000ull

/* pvh layout */
#define PVH_START_INFO 0x6000ull
#define PVH_MEMMAP     0x6040ull
#define PVH_CMDLINE    0x7000ull
#define PVH_CMDLINE_MAX 0xfffull
#define MPTABLE_BASE   0xf0000ull

struct vcpu {
    int index, fd;
    struct kvm_run *run;
    pthread_t thread;
    uint64_t exits;
};

static int kvm_fd = -1, vm_fd = -1;
static uint8_t *mem;
static uint64_t mem_size;
static int ncpus = 1, pvh_mode, ring = 3;
static uint64_t flat_arg;
static struct vcpu vcpus[MAX_CPUS];
static atomic_uint_fast64_t counter;
static atomic_int alive;
static struct timespec t_start;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t exit_lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("cfloor: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(EXIT_UNHANDLED);
}

static uint64_t now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)(t.tv_sec - t_start.tv_sec) * 1000000u + (uint64_t)((t.tv_nsec - t_start.tv_nsec) / 1000);
}

/* Ends the process: the other vCPU threads die with it. */
__attribute__((noreturn)) static void finish(int code)
{
    pthread_mutex_lock(&exit_lock);            /* first caller wins; others block forever */
    uint64_t wall = now_us(), total = 0;
    for (int i = 0; i < ncpus; i++) total += __atomic_load_n(&vcpus[i].exits, __ATOMIC_RELAXED);
    pthread_mutex_lock(&out_lock);
    fflush(stdout);
    fprintf(stderr, "cfloor exits=%llu wall_us=%llu\n", (unsigned long long)total, (unsigned long long)wall);
    _exit(code);
}

static void emit(uint8_t c)
{
    pthread_mutex_lock(&out_lock);
    putchar(c);
    if (c == '\n') fflush(stdout);
    pthread_mutex_unlock(&out_lock);
}

__attribute__((noreturn)) static void unhandled(struct vcpu *v, const char *what)
{
    struct kvm_run *r = v->run;
    pthread_mutex_lock(&out_lock);
    fflush(stdout);
    fprintf(stderr, "cfloor: vcpu %d: unhandled exit %u (%s)", v->index, r->exit_reason, what);
    if (r->exit_reason == KVM_EXIT_IO)
        fprintf(stderr, " %s port 0x%x size %u count %u", r->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
                r->io.port, r->io.size, r->io.count);
    else if (r->exit_reason == KVM_EXIT_MMIO)
        fprintf(stderr, " %s gpa 0x%llx len %u", r->mmio.is_write ? "write" : "read",
                (unsigned long long)r->mmio.phys_addr, r->mmio.len);
    else if (r->exit_reason == KVM_EXIT_FAIL_ENTRY)
        fprintf(stderr, " hardware_entry_failure_reason 0x%llx",
                (unsigned long long)r->fail_entry.hardware_entry_failure_reason);
    else if (r->exit_reason == KVM_EXIT_INTERNAL_ERROR)
        fprintf(stderr, " suberror %u", r->internal.suberror);
    struct kvm_regs regs;
    if (ioctl(v->fd, KVM_GET_REGS, &regs) == 0)
        fprintf(stderr, " rip 0x%llx", (unsigned long long)regs.rip);
    fputc('\n', stderr);
    pthread_mutex_unlock(&out_lock);
    finish(EXIT_UNHANDLED);
}

static void handle_io(struct vcpu *v)
{
    struct kvm_run *r = v->run;
    uint8_t *data = (uint8_t *)r + r->io.data_offset;
    uint16_t port = r->io.port;
    for (uint32_t i = 0; i < r->io.count; i++, data += r->io.size) {
        if (r->io.direction == KVM_EXIT_IO_OUT) {
            if (port == COUNTER_PORT) atomic_fetch_add_explicit(&counter, 1, memory_order_relaxed);
            else if (port == EXIT_PORT) finish(data[0]);
            else if (port == COM1) emit(data[0]);
            else if (pvh_mode && port > COM1 && port < COM1 + 8) ;   /* UART setup: ignored */
            else unhandled(v, "io");
        } else {
            uint32_t val;
            if (port == COUNTER_PORT) val = (uint32_t)atomic_load_explicit(&counter, memory_order_relaxed);
            else if (pvh_mode && port == COM1 + 5) val = 0x60;      /* LSR: THR and TX empty */
            else if (pvh_mode && port >= COM1 && port < COM1 + 8) val = 0;
            else unhandled(v, "io");
            memcpy(data, &val, r->io.size <= 4 ? r->io.size : 4);
        }
    }
}

static void handle_mmio(struct vcpu *v)
{
    struct kvm_run *r = v->run;
    uint64_t a = r->mmio.phys_addr;
    if (a < MMIO_BASE || a - MMIO_BASE >= MMIO_SIZE || r->mmio.len > 8) unhandled(v, "mmio");
    if (r->mmio.is_write) {
        atomic_fetch_add_explicit(&counter, 1, memory_order_relaxed);
    } else {
        uint64_t val = atomic_load_explicit(&counter, memory_order_relaxed);
        memcpy(r->mmio.data, &val, r->mmio.len);
    }
}

static void *vcpu_thread(void *arg)
{
    struct vcpu *v = arg;
    for (;;) {
        if (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            pthread_mutex_lock(&out_lock);
            fprintf(stderr, "cfloor: vcpu %d: KVM_RUN: %s\n", v->index, strerror(errno));
            pthread_mutex_unlock(&out_lock);
            finish(EXIT_UNHANDLED);
        }
        __atomic_store_n(&v->exits, v->exits + 1, __ATOMIC_RELAXED);
        switch (v->run->exit_reason) {
        case KVM_EXIT_IO: handle_io(v); break;
        case KVM_EXIT_MMIO: handle_mmio(v); break;
        case KVM_EXIT_HLT:
            if (atomic_fetch_sub(&alive, 1) == 1) finish(0);
            return NULL;
        case KVM_EXIT_SHUTDOWN: unhandled(v, "shutdown (triple fault)");
        case KVM_EXIT_FAIL_ENTRY: unhandled(v, "fail-entry");
        case KVM_EXIT_INTERNAL_ERROR: unhandled(v, "internal-error");
        default: unhandled(v, "other");
        }
    }
}

/* ---- guest memory ---- */
static void guest_check(uint64_t gpa, uint64_t len, const char *what)
{
    if (gpa > mem_size || len > mem_size - gpa)
        die("%s at 0x%llx+0x%llx does not fit in %llu MiB of guest RAM", what, (unsigned long long)gpa,
            (unsigned long long)len, (unsigned long long)(mem_size >> 20));
}
static void put64(uint64_t gpa, uint64_t v) { guest_check(gpa, 8, "u64"); memcpy(mem + gpa, &v, 8); }

static uint8_t *read_file(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) die("cannot open %s: %s", path, strerror(errno));
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    size_t got = 0;
    while (buf && got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n <= 0) die("cannot read %s", path);
        got += (size_t)n;
    }
    close(fd);
    *len = got;
    return buf;
}

/* ---- machine setup ---- */
static struct kvm_segment seg(uint16_t sel, uint8_t type, uint8_t dpl, int code64, int db)
{
    struct kvm_segment s = { .base = 0, .limit = 0xffffffff, .selector = sel, .type = type, .present = 1,
                             .dpl = dpl, .db = (uint8_t)db, .s = 1, .l = (uint8_t)code64, .g = 1 };
    return s;
}

static void setup_flat_tables(const char *image)
{
    size_t len;
    uint8_t *img = read_file(image, &len);
    guest_check(FLAT_LOAD, len, "flat image");
    memcpy(mem + FLAT_LOAD, img, len);
    free(img);
    static const uint64_t gdt[5] = { 0, 0x00af9b000000ffffull, 0x00cf93000000ffffull,
                                     0x00cff3000000ffffull, 0x00affb000000ffffull };
    for (int i = 0; i < 5; i++) put64(FLAT_GDT + 8 * i, gdt[i]);
    uint64_t b = FLAT_TSS, lim = FLAT_TSS_LIMIT;
    put64(FLAT_GDT + 5 * 8, (lim & 0xffff) | ((b & 0xffffff) << 16) | (0x8bull << 40) | (((lim >> 16) & 0xf) << 48) |
                                (((b >> 24) & 0xff) << 56));
    put64(FLAT_GDT + 6 * 8, b >> 32);
    guest_check(FLAT_TSS, FLAT_TSS_LIMIT + 1, "TSS");
    memset(mem + FLAT_TSS, 0, FLAT_TSS_LIMIT + 1);
    uint16_t iomap = 0x68;
    memcpy(mem + FLAT_TSS + 0x66, &iomap, 2);
    mem[FLAT_TSS + FLAT_TSS_LIMIT] = 0xff;
    put64(FLAT_PML4, FLAT_PDPT | 0x7);
    for (uint64_t i = 0; i < 4; i++) {
        uint64_t pd = FLAT_PD + i * 0x1000;
        put64(FLAT_PDPT + i * 8, pd | 0x7);
        for (uint64_t j = 0; j < 512; j++) put64(pd + j * 8, (i << 30) | (j << 21) | 0x87);
    }
}

static void flat_vcpu_state(struct vcpu *v)
{
    struct kvm_sregs s;
    if (ioctl(v->fd, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS: %s", strerror(errno));
    struct kvm_segment code = ring == 3 ? seg(0x23, 0xb, 3, 1, 0) : seg(0x08, 0xb, 0, 1, 0);
    struct kvm_segment data = ring == 3 ? seg(0x1b, 0x3, 3, 0, 1) : seg(0x10, 0x3, 0, 0, 1);
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.tr = (struct kvm_segment){ .base = FLAT_TSS, .limit = FLAT_TSS_LIMIT, .selector = 0x28, .type = 0xb, .present = 1 };
    s.ldt = (struct kvm_segment){ .type = 0x2, .present = 1, .unusable = 1 };
    s.gdt.base = FLAT_GDT; s.gdt.limit = 7 * 8 - 1;
    s.idt.base = 0; s.idt.limit = 0;
    s.cr0 = 0x80050033; s.cr3 = FLAT_PML4; s.cr4 = 0x20; s.efer = 0x500;
    if (ioctl(v->fd, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS: %s", strerror(errno));
    struct kvm_regs r = { 0 };
    r.rip = FLAT_LOAD;
    r.rsp = FLAT_STACK - (uint64_t)v->index * 0x1000;
    r.rdi = (uint64_t)v->index; r.rsi = (uint64_t)ncpus; r.rdx = flat_arg;
    r.rflags = ring == 3 ? 0x3002 : 0x2;
    if (ioctl(v->fd, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS: %s", strerror(errno));
}

/* Loads the PT_LOAD segments of an ELF64 x86-64 file; returns the PVH entry from its Xen note. */
static uint32_t load_pvh_elf(const char *path)
{
    size_t len;
    uint8_t *f = read_file(path, &len);
    if (len < 64 || memcmp(f, "\177ELF", 4) != 0 || f[4] != 2 || f[5] != 1)
        die("%s: not a little-endian ELF64 file", path);
    uint64_t phoff; uint16_t phentsize, phnum, machine;
    memcpy(&machine, f + 18, 2); memcpy(&phoff, f + 32, 8);
    memcpy(&phentsize, f + 54, 2); memcpy(&phnum, f + 56, 2);
    if (machine != 62 || phentsize < 56 || phoff > len || (uint64_t)phnum * phentsize > len - phoff)
        die("%s: bad ELF header", path);
    uint64_t entry = 0; int found = 0;
    for (uint16_t i = 0; i < phnum; i++) {
        const uint8_t *ph = f + phoff + (uint64_t)i * phentsize;
        uint32_t type; uint64_t off, paddr, filesz, memsz;
        memcpy(&type, ph, 4); memcpy(&off, ph + 8, 8); memcpy(&paddr, ph + 24, 8);
        memcpy(&filesz, ph + 32, 8); memcpy(&memsz, ph + 40, 8);
        if (off > len || filesz > len - off || filesz > memsz) die("%s: bad program header %u", path, i);
        if (type == 1) {                                     /* PT_LOAD */
            guest_check(paddr, memsz, "ELF segment");
            memcpy(mem + paddr, f + off, filesz);
            memset(mem + paddr + filesz, 0, memsz - filesz);
        } else if (type == 4) {                              /* PT_NOTE */
            for (uint64_t p = off; p + 12 <= off + filesz; ) {
                uint32_t namesz, descsz, ntype;
                memcpy(&namesz, f + p, 4); memcpy(&descsz, f + p + 4, 4); memcpy(&ntype, f + p + 8, 4);
                uint64_t name = p + 12, desc = name + ((namesz + 3ull) & ~3ull);
                if (desc + descsz > off + filesz) break;
                if (ntype == 18 && namesz == 4 && memcmp(f + name, "Xen", 4) == 0 && (descsz == 4 || descsz == 8)) {
                    entry = 0;
                    memcpy(&entry, f + desc, descsz);
                    found = 1;
                }
                p = desc + ((descsz + 3ull) & ~3ull);
            }
        }
    }
    free(f);
    if (!found) die("%s: no PVH entry note (Xen, XEN_ELFNOTE_PHYS32_ENTRY)", path);
    if (entry >= mem_size) die("%s: PVH entry 0x%llx outside guest RAM", path, (unsigned long long)entry);
    return (uint32_t)entry;
}

static uint8_t csum(const uint8_t *p, size_t n) { uint8_t s = 0; while (n--) s += *p++; return (uint8_t)-s; }

/* Intel MP spec 1.4: floating pointer + config table listing ncpus processors (APIC ids 0..n-1). */
static void write_mptable(void)
{
    guest_check(MPTABLE_BASE, 0x1000, "MP table");
    uint8_t *fp = mem + MPTABLE_BASE, *ct = fp + 16;
    memset(fp, 0, 0x1000);
    uint16_t len = (uint16_t)(44 + 20 * ncpus), count = (uint16_t)ncpus;
    uint32_t ctaddr = (uint32_t)MPTABLE_BASE + 16, lapic = 0xfee00000;
    memcpy(ct, "PCMP", 4); memcpy(ct + 4, &len, 2); ct[6] = 4;
    memcpy(ct + 8, "KVMKIT  ", 8); memcpy(ct + 16, "CFLOOR      ", 12);
    memcpy(ct + 34, &count, 2); memcpy(ct + 36, &lapic, 4);
    for (int i = 0; i < ncpus; i++) {
        uint8_t *e = ct + 44 + 20 * i;
        uint32_t sig = 0x600, feat = 0x201;
        e[0] = 0; e[1] = (uint8_t)i; e[2] = 0x14; e[3] = (uint8_t)(1 | (i == 0 ? 2 : 0));
        memcpy(e + 4, &sig, 4); memcpy(e + 8, &feat, 4);
    }
    ct[7] = csum(ct, len);
    memcpy(fp, "_MP_", 4); memcpy(fp + 4, &ctaddr, 4); fp[8] = 1; fp[9] = 4;
    fp[10] = csum(fp, 16);
}

static void setup_pvh(const char *elf, const char *cmdline, uint32_t *entry)
{
    *entry = load_pvh_elf(elf);
    size_t clen = strlen(cmdline);
    if (clen > PVH_CMDLINE_MAX - 1) die("cmdline longer than %llu bytes", PVH_CMDLINE_MAX - 1);
    guest_check(PVH_CMDLINE, clen + 1, "cmdline");
    memcpy(mem + PVH_CMDLINE, cmdline, clen + 1);
    struct { uint32_t magic, version, flags, nr_modules; uint64_t modlist, cmdline, rsdp, memmap;
             uint32_t memmap_entries, reserved; } si = { 0x336ec578, 1, 0, 0, 0, PVH_CMDLINE, 0, PVH_MEMMAP, 1, 0 };
    struct { uint64_t addr, size; uint32_t type, reserved; } mm = { 0, mem_size, 1, 0 };
    guest_check(PVH_START_INFO, 0x100, "hvm_start_info");
    memcpy(mem + PVH_START_INFO, &si, sizeof(si));
    memcpy(mem + PVH_MEMMAP, &mm, sizeof(mm));
    if (ncpus > 1) write_mptable();
}

static void pvh_vcpu_state(struct vcpu *v, uint32_t entry)
{
    struct kvm_sregs s;
    if (ioctl(v->fd, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS: %s", strerror(errno));
    s.cs = seg(0x10, 0xb, 0, 0, 1);
    s.ds = s.es = s.fs = s.gs = s.ss = seg(0x18, 0x3, 0, 0, 1);
    s.tr = (struct kvm_segment){ .limit = 0x67, .type = 0xb, .present = 1 };
    s.ldt = (struct kvm_segment){ .type = 0x2, .present = 1, .unusable = 1 };
    s.gdt.base = 0; s.gdt.limit = 0; s.idt.base = 0; s.idt.limit = 0;
    s.cr0 = 0x11; s.cr3 = 0; s.cr4 = 0; s.efer = 0;
    if (ioctl(v->fd, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS: %s", strerror(errno));
    struct kvm_regs r = { 0 };
    r.rip = entry; r.rbx = PVH_START_INFO; r.rflags = 0x2;
    if (ioctl(v->fd, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS: %s", strerror(errno));
}

static void set_cpuid(struct vcpu *v)
{
    static struct kvm_cpuid2 *cpuid;
    if (!cpuid) {
        cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
        cpuid->nent = 256;
        if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
    }
    for (uint32_t i = 0; i < cpuid->nent; i++) {       /* APIC id in leaf 1 / 0xb */
        struct kvm_cpuid_entry2 *e = &cpuid->entries[i];
        if (e->function == 1) e->ebx = (e->ebx & 0x00ffffff) | ((uint32_t)v->index << 24);
        if (e->function == 0xb || e->function == 0x1f) e->edx = (uint32_t)v->index;
    }
    if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2: %s", strerror(errno));
}

static uint64_t parse_u64(const char *s, const char *what)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || !*s || *end || *s == '-') die("bad %s: %s", what, s);
    return v;
}

static void usage(void)
{
    fputs("usage: cfloor flat <image.bin> [--cpus N] [--mem MiB] [--arg U64] [--ring 0|3]\n"
          "       cfloor pvh <probe.elf> [--mem MiB] [--cmdline \"...\"] [--cpus N]\n", stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 3) usage();
    if (!strcmp(argv[1], "pvh")) pvh_mode = 1;
    else if (strcmp(argv[1], "flat")) usage();
    const char *image = argv[2], *cmdline = "";
    uint64_t mib = 64;
    for (int i = 3; i < argc; i++) {
        if (i + 1 >= argc) usage();
        const char *k = argv[i], *val = argv[++i];
        if (!strcmp(k, "--cpus")) ncpus = (int)parse_u64(val, "--cpus");
        else if (!strcmp(k, "--mem")) mib = parse_u64(val, "--mem");
        else if (!strcmp(k, "--arg") && !pvh_mode) flat_arg = parse_u64(val, "--arg");
        else if (!strcmp(k, "--ring") && !pvh_mode) ring = (int)parse_u64(val, "--ring");
        else if (!strcmp(k, "--cmdline") && pvh_mode) cmdline = val;
        else usage();
    }
    if (ncpus < 1 || ncpus > MAX_CPUS) die("--cpus must be 1..%d", MAX_CPUS);
    if (mib < 2 || mib > 3072) die("--mem must be 2..3072 MiB");
    if (ring != 0 && ring != 3) die("--ring must be 0 or 3");
    mem_size = mib << 20;

    if ((kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0) die("/dev/kvm: %s", strerror(errno));
    if ((vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0)) < 0) die("KVM_CREATE_VM: %s", strerror(errno));
    if (ioctl(vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0) die("KVM_SET_TSS_ADDR: %s", strerror(errno));
    mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) die("mmap guest RAM: %s", strerror(errno));
    struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
                                                  .userspace_addr = (uint64_t)(uintptr_t)mem };
    if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));

    uint32_t entry = 0;
    if (pvh_mode) {
        if (ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP: %s", strerror(errno));
        struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
        if (ioctl(vm_fd, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2: %s", strerror(errno));
        setup_pvh(image, cmdline, &entry);
    } else {
        setup_flat_tables(image);
    }

    int run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run)) die("KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
    for (int i = 0; i < ncpus; i++) {
        struct vcpu *v = &vcpus[i];
        v->index = i;
        if ((v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, (unsigned long)i)) < 0) die("KVM_CREATE_VCPU: %s", strerror(errno));
        v->run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (v->run == MAP_FAILED) die("mmap kvm_run: %s", strerror(errno));
        set_cpuid(v);
        if (!pvh_mode) flat_vcpu_state(v);
        else if (i == 0) pvh_vcpu_state(v, entry);        /* APs wait for INIT/SIPI */
    }
    atomic_store(&alive, ncpus);
    clock_gettime(CLOCK_MONOTONIC, &t_start);
    for (int i = 0; i < ncpus; i++)
        if (pthread_create(&vcpus[i].thread, NULL, vcpu_thread, &vcpus[i])) die("pthread_create failed");
    for (int i = 0; i < ncpus; i++) pthread_join(vcpus[i].thread, NULL);
    finish(0);   /* not reached: the last HLT calls finish() */
}
