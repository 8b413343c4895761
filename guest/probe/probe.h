/* Shared definitions of the Keel probe guest (C and assembly). */
#ifndef PROBE_H
#define PROBE_H

/* How the probe was entered; passed from the entry code in %edi. */
#define BOOT_AP      0
#define BOOT_PVH     1
#define BOOT_LINUX64 2
#define BOOT_LINUX32 3

#define PVH_MAGIC    0x336ec578

/* GDT selectors (see entry.S). */
#define SEL_CODE64   0x08
#define SEL_DATA     0x10
#define SEL_CODE32   0x18
/* The benchmarks' GDT (ring3.S) adds user mode segments and a TSS. */
#define SEL_UDATA    0x23		/* index 4, RPL 3 */
#define SEL_UCODE    0x2b		/* index 5, RPL 3 */
#define SEL_TSS      0x30
/* What user_run returns when ring 3 faulted. */
#define USER_FAULT   (-1)

/* Low page the AP real-mode start-up code is copied to (SIPI vector 0x08). */
#define TRAMP_PAGE   0x8000
#define MAX_CPUS     32
#define STACK_SHIFT  12          /* 4 KiB per AP stack */
#define BSP_STACK    0x4000

#define CMDLINE_MAX  4096
#define E820_MAX     128

#ifndef __ASSEMBLER__

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef _Bool bool;
#define true 1
#define false 0

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

/* Unaligned little-endian reads of firmware tables; each is a single mov. */
static inline u16 rd16(const void *p) { u16 v; __builtin_memcpy(&v, p, 2); return v; }
static inline u32 rd32(const void *p) { u32 v; __builtin_memcpy(&v, p, 4); return v; }
static inline u64 rd64(const void *p) { u64 v; __builtin_memcpy(&v, p, 8); return v; }

/* Physical memory is identity mapped up to 4 GiB. */
#define PHYS(a) ((const u8 *)(u64)(a))
#define MAPPED_LIMIT 0x100000000UL

struct e820_entry { u64 addr, size; u32 type; };
extern struct e820_entry e820[E820_MAX];
extern u32 e820_count;
bool e820_is_ram(u64 addr, u64 size);

/* print.c: one complete line per call, atomically w.r.t. other CPUs.
 * %x/%lx print with a 0x prefix; %u/%lu decimal; %s; %c. */
void pr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* acpi.c */
struct acpi_info {
	const u8 *fadt, *madt, *dsdt;
	u32 lapic_base;
	u32 cpu_count;
	u32 apic_ids[MAX_CPUS];
};
extern struct acpi_info acpi;
void acpi_report(u64 rsdp_hint, const char *hint_source);
void madt_report(void);
struct sleep_reg { u64 addr; u8 space, typ; bool pm1a; };
bool acpi_find_s5(struct sleep_reg *r);
void acpi_sleep(const struct sleep_reg *r);
/* power.c: probe.power_button */
void power_button_wait(const struct sleep_reg *s5);

/* smp.c */
void smp_start(void);

/* main.c: the copied command line. cmdline_arg returns the value of the
 * first word at or after `from` (0: the start) that begins with `prefix`,
 * or 0; pass the value back as `from` to find the next such word. */
bool has_word(const char *word);
const char *cmdline_arg(const char *prefix, const char *from);
/* Number at *p: 0x... hex or decimal, with an optional K/M/G suffix if
 * `suffix`; advances *p; false if there are no digits. */
bool parse_num(const char **p, u64 *v, bool suffix);

/* virtio.c: virtio-mmio transports (version 2) and split virtqueues. */
#define VIRTIO_MAX   16
#define VIRTIO_ID_NET   1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG   4
#define VIRTIO_ID_VSOCK 19
struct virtio_dev {
	u64 base;
	u32 irq, id;
	const char *bad;		/* set while found: no usable _CRS */
	bool ok;			/* magic, version 2 and a device id */
};
extern struct virtio_dev virtio_devs[VIRTIO_MAX];
extern u32 virtio_found;
void virtio_find(void);			/* before the APs' page is written */
void virtio_report(void);
/* The first good transport with device `id`, or 0. */
struct virtio_dev *virtio_first(u32 id);
const char *virtio_name(u32 n);		/* "blk1", "rng0", "virtio5": transport n */

/* Register offsets (virtio 1.2 section 4.2.2). */
#define MMIO_MAGIC       0x000
#define MMIO_VERSION     0x004
#define MMIO_DEVICE_ID   0x008
#define MMIO_DEV_FEAT    0x010
#define MMIO_DEV_FEAT_SEL 0x014
#define MMIO_DRV_FEAT    0x020
#define MMIO_DRV_FEAT_SEL 0x024
#define MMIO_QUEUE_SEL   0x030
#define MMIO_QUEUE_NUM_MAX 0x034
#define MMIO_QUEUE_NUM   0x038
#define MMIO_QUEUE_READY 0x044
#define MMIO_QUEUE_NOTIFY 0x050
#define MMIO_INT_STATUS  0x060
#define MMIO_INT_ACK     0x064
#define MMIO_STATUS      0x070
#define MMIO_QUEUE_DESC  0x080		/* low, high at +4 */
#define MMIO_QUEUE_DRIVER 0x090
#define MMIO_QUEUE_DEVICE 0x0a0
#define MMIO_CONFIG_GEN  0x0fc
#define MMIO_CONFIG      0x100

/* Device status bits. */
#define ST_ACKNOWLEDGE   1
#define ST_DRIVER        2
#define ST_DRIVER_OK     4
#define ST_FEATURES_OK   8
#define ST_NEEDS_RESET   0x40
#define ST_FAILED        0x80

#define VIRTIO_F_VERSION_1 (1UL << 32)

static inline u32 vrd(u64 base, u32 off) { return *(volatile u32 *)(base + off); }
static inline void vwr(u64 base, u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }

/* Time limits: the TSC is taken to tick about 2.5*10^9 times a second (this
 * host: 2.6 GHz); a 1-3 GHz TSC makes them 0.8-2.5 times as long. */
#define TSC_MS 2500000UL
static inline u64 deadline(u64 ms) { return rdtsc() + ms * TSC_MS; }
static inline bool passed(u64 t) { return (long)(rdtsc() - t) > 0; }

/* Split virtqueue, virtio 1.2 section 2.7. */
struct vq_desc { u64 addr; u32 len; u16 flags, next; };
#define VQ_DESC_NEXT     1
#define VQ_DESC_WRITE    2		/* device writes this buffer */
#define VQ_DESC_INDIRECT 4
struct vq_avail { u16 flags, idx, ring[]; };
struct vq_used { u16 flags, idx; struct { u32 id, len; } ring[]; };
#define VQ_MAX_SIZE 16
#define VQ_MEM_SIZE 0x400		/* desc at 0, avail at 0x100, used at 0x200 */
struct vq {
	u64 base;			/* transport */
	u32 index;
	u16 size, next_avail, next_used;
	u32 used_len;			/* of the last chain vq_used returned */
	volatile struct vq_desc *desc;
	volatile struct vq_avail *avail;
	volatile struct vq_used *used;
};
bool virtio_negotiate(u64 base, u64 wanted, u64 *accepted);
bool vq_setup(struct vq *q, u64 base, u32 index, u8 *mem);
void virtio_driver_ok(u64 base);
void virtio_failed(u64 base);
u32 virtio_config32(u64 base, u32 off);
u64 virtio_config64(u64 base, u32 off);
/* Descriptor i: buffer, length, flags; next = i + 1. */
void vq_set(struct vq *q, u32 i, const volatile void *addr, u32 len, u16 flags);
void vq_add(struct vq *q, u16 head);	/* make a chain available (no notify) */
void vq_notify(struct vq *q);
int vq_used(struct vq *q);		/* head of the next used chain, or -1 */
int vq_wait(struct vq *q, u64 until);	/* vq_used, polled until the TSC passes `until` */
bool vq_run(struct vq *q);		/* chain at descriptor 0; false: timeout */

/* blk.c, rng.c, net.c, vsock.c, garbage.c: each runs if its switches ask */
void blk_run(void);
void rng_run(void);
void net_run(void);
void vsock_run(void);
void garbage_run(void);

/* bench.c: the probe.bench_* switches (README.md), after the exercises */
void bench_run(void);
/* churn.c: probe.churn=SIZE, memory kept changing and checked; runs for ever */
void churn_run(void);

/* user.c, ring3.S: ring 3. user_init once (new GDT, TSS, IDT for vectors
 * 0-31), user_map for every range ring 3 touches (sets the U bit on its
 * 2 MiB pages), user_run to call fn(arg) in ring 3 on the given stack: it
 * returns fn's result, or USER_FAULT with user_fault filled in. user_fini
 * puts back the IDT the probe had. */
struct user_fault { u64 vector, error, rip, cr2; };
extern struct user_fault user_fault;
void user_init(void);
void user_map(u64 addr, u64 size);
u64 user_run(u64 (*fn)(void *), void *arg, void *stack_top);
void user_fini(void);

/* entry.S */
void crash_triplefault(void) __attribute__((noreturn));
void crash_badinsn(void) __attribute__((noreturn));
extern const u8 tramp_start[], tramp_end[];

/* virtio-vsock (spec 5.10): the host's CID, the stream type, packet ops (vsock.c, bench.c). */
#define HOST_CID     2
#define TYPE_STREAM  1
#define OP_REQUEST   1
#define OP_RESPONSE  2
#define OP_RST       3
#define OP_SHUTDOWN  4
#define OP_RW        5
#define OP_CREDIT_UPDATE  6
#define OP_CREDIT_REQUEST 7

void *memcpy(void *d, const void *s, unsigned long n);
void *memset(void *d, int c, unsigned long n);

#endif
#endif
