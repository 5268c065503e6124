/* Constants shared by entry.S and probe.c. */
#ifndef PROBE_H
#define PROBE_H

#define SEL_KCODE   0x08    /* 64-bit code, DPL 0 */
#define SEL_KDATA   0x10    /* data, DPL 0 */
#define SEL_UDATA   0x1b    /* data, DPL 3 (0x18 | RPL 3) */
#define SEL_UCODE   0x23    /* 64-bit code, DPL 3 (0x20 | RPL 3) */
#define SEL_TSS     0x28    /* 64-bit TSS (16-byte descriptor) */
#define SEL_CODE32  0x38    /* 32-bit code, DPL 0 (AP trampoline) */

#define TRAMPOLINE  0x8000  /* AP real-mode trampoline copy; SIPI vector 0x08 */
#define USER_RFLAGS 0x3002  /* IOPL 3, IF 0 (the nested-PVM host ignores IOPL in ring 3; the TSS I/O bitmap is what lets ring 3 do port I/O) */

#ifndef __ASSEMBLER__
#include <stdint.h>
typedef uint8_t u8; typedef uint16_t u16; typedef uint32_t u32; typedef uint64_t u64;

/* Register frame built by the interrupt stubs in entry.S (lowest address first). */
struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;   /* pushed by the CPU */
};

/* entry.S */
extern u64 start_info_pa;
extern u64 ap_stack_top;
extern u64 user_rsp0;
extern u64 gdt[];
extern char tramp_start[], tramp_end[];
extern char isr_table[];            /* 34 stubs, see entry.S */
u64 run_user(u64 (*fn)(u64), u64 arg, u64 user_stack_top);
__attribute__((noreturn)) void user_abort(u64 value);

/* probe.c */
void trap(struct frame *f);
void probe_main(void);
void ap_main(void);

/* probe.c: helpers shared by the test modules (virtio.c, blk.c, net.c, rng.c). All of them work in
 * ring 3 too (port I/O is allowed by the TSS bitmap, every page is U/S). */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
#define barrier() __asm__ volatile("" ::: "memory")
#define mb() __asm__ volatile("mfence" ::: "memory")
#define USER_FAULTED (~0ull)

void *memcpy(void *d, const void *s, unsigned long n);
void *memset(void *d, int c, unsigned long n);
void puts(const char *s);
void putu(u64 v);
void putx(u64 v);
void kv(const char *k, u64 v);                 /* " k=<decimal>" */
void kvx(const char *k, u64 v);                /* " k=0x<hex>" */
__attribute__((noreturn)) void finish(u32 status);   /* "PROBE DONE status=N", out 0xf4 (ring 0 or 3) */
extern char cmdline[1024];
const char *param(const char *name, char *out, unsigned outlen);   /* value of probe.<name>=, or 0 */
u64 param_u64(const char *name, u64 dflt);
int streq(const char *a, const char *b);
u64 parse_num(const char *s, const char **end, int *ok);          /* decimal or 0x-hex */
extern u64 tsc_khz;                            /* 0 when unknown */
static inline u64 tsc_per_ms(void) { return tsc_khz ? tsc_khz : 3000000; }
u64 in_user(u64 (*fn)(u64), u64 arg);          /* fn(arg) in ring 3; USER_FAULTED if it faulted */
extern volatile u64 user_fault_vector;

/* Tests in their own files. */
void test_blk(void);     /* blk.c */
void test_blkbench(void);  /* blk.c: probe.test=blkbench */
void test_rng(void);     /* rng.c */
void test_net(void);     /* net.c */
#endif
#endif
