/*
 * virtio-mmio transports (virtio 1.2 section 4.2, register layout version 2):
 * discovery from the DSDT and the command line, device identification,
 * feature negotiation, and split virtqueues driven synchronously (one chain
 * in flight, completion found by polling the used ring, interrupts off).
 */
#include "probe.h"

#define VIRTIO_MAGIC     0x74726976	/* "virt" */

/* Register offsets. */
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
#define MMIO_MIN_SIZE    0x100		/* registers, without the config space */

/* Device status bits. */
#define ST_ACKNOWLEDGE   1
#define ST_DRIVER        2
#define ST_DRIVER_OK     4
#define ST_FEATURES_OK   8
#define ST_FAILED        128

#define VIRTIO_F_VERSION_1 (1UL << 32)

/* Give up on a request after this many TSC ticks (10-30 s at 1-3 GHz). */
#define TSC_REQUEST_TIMEOUT 30000000000UL

struct virtio_dev virtio_devs[VIRTIO_MAX];
u32 virtio_found;

static u32 rd(u64 base, u32 off) { return *(volatile u32 *)(base + off); }
static void wr(u64 base, u32 off, u32 v) { *(volatile u32 *)(base + off) = v; }

static void add_dev(u64 base, u32 irq, const char *bad)
{
	for (u32 i = 0; i < virtio_found; i++)
		if (!bad && !virtio_devs[i].bad && virtio_devs[i].base == base)
			return;
	if (virtio_found < VIRTIO_MAX)
		virtio_devs[virtio_found++] =
			(struct virtio_dev){ .base = base, .irq = irq, .bad = bad };
}

/* ---- DSDT: Device () { Name (_HID, "LNRO0005") ... Name (_CRS, ...) } -- */

#define HID_LNRO0005 0x353030304f524e4cUL	/* the eight characters */

/* The AML string "LNRO0005": StringPrefix 0x0d, characters, NUL. */
static bool is_hid(const u8 *p, u32 j, u32 len)
{
	return j >= 1 && j + 9 <= len && p[j - 1] == 0x0d &&
	       rd64(p + j) == HID_LNRO0005 && p[j + 8] == 0;
}

/* Offset of the next such string at or after i, or len. Looks for an 'L'
 * eight bytes at a time (a zero byte of x ^ "LLLLLLLL"). */
static u32 next_hid(const u8 *p, u32 i, u32 len)
{
	const u64 ones = 0x0101010101010101UL, ls = 'L' * ones;

	for (; i + 8 <= len; i += 8) {
		u64 x = rd64(p + i) ^ ls;

		if (!((x - ones) & ~x & (ones << 7)))
			continue;
		for (u32 j = i; j < i + 8; j++)
			if (p[j] == 'L' && is_hid(p, j, len))
				return j;
	}
	for (; i < len; i++)
		if (p[i] == 'L' && is_hid(p, i, len))
			return i;
	return len;
}

/* End of the Device () holding the name at h: its DeviceOp (5b 82) is the
 * nearest one a few bytes before; the PkgLength after it counts from its
 * own first byte. */
static u32 device_end(const u8 *p, u32 h, u32 len)
{
	for (u32 k = h - 3; k + 40 >= h && k >= 36; k--) {
		const u8 *q = p + k + 2;
		u32 n = q[0] >> 6, plen = n ? q[0] & 0x0f : q[0] & 0x3f;

		if (p[k] != 0x5b || p[k + 1] != 0x82 || k + 3 + n >= h)
			continue;
		for (u32 b = 1; b <= n; b++)
			plen |= (u32)q[b] << (8 * b - 4);
		if (k + 2 + plen > h && k + 2 + plen <= len)
			return k + 2 + plen;
	}
	return len;
}

/* Memory32Fixed (86 09 00 rw base len) and Extended Interrupt
 * (89 len16 flags count irq...) descriptors in [from, to). */
static void dsdt_device(const u8 *p, u32 from, u32 to)
{
	u32 i, base = 0, irq = 0;
	bool mem = false, intr = false;

	for (i = from; i + 12 <= to && !mem; i++)
		if (p[i] == 0x86 && p[i + 1] == 0x09 && p[i + 2] == 0) {
			base = rd32(p + i + 4);
			mem = true;
		}
	for (i = from; i + 9 <= to && !intr; i++)
		if (p[i] == 0x89 && rd16(p + i + 1) >= 6 && rd16(p + i + 1) < 0x100 && p[i + 4]) {
			irq = rd32(p + i + 5);
			intr = true;
		}
	add_dev(base, irq, !mem ? "no_memory32fixed" : !intr ? "no_interrupt" : 0);
}

static void dsdt_scan(void)
{
	const u8 *p = acpi.dsdt;
	u32 len, h, next;

	if (!p)
		return;
	len = rd32(p + 4);
	for (h = next_hid(p, 36, len); h < len; h = next) {
		u32 end = device_end(p, h, len);

		next = next_hid(p, h + 9, len);
		dsdt_device(p, h + 9, end < next ? end : next);
	}
}

/* ---- command line: virtio_mmio.device=<size>@<base>:<irq>[:<id>] ------- */

static void cmdline_scan(void)
{
	for (const char *v = cmdline_arg("virtio_mmio.device=", 0); v;
	     v = cmdline_arg("virtio_mmio.device=", v)) {
		const char *s = v;
		u64 size, base, irq;

		if (parse_num(&s, &size, true) && *s++ == '@' &&
		    parse_num(&s, &base, false) && *s++ == ':' &&
		    parse_num(&s, &irq, false) && (*s == ' ' || *s == ':' || !*s))
			add_dev(base, irq, 0);
		else
			add_dev(0, 0, "bad_cmdline");
	}
}

void virtio_find(void)
{
	virtio_found = 0;
	dsdt_scan();
	cmdline_scan();
}

void virtio_report(void)
{
	u32 good = 0;

	for (u32 n = 0; n < virtio_found; n++) {
		struct virtio_dev *d = &virtio_devs[n];
		u32 v;

		d->ok = false;
		if (d->bad) {
			pr("PROBE virtio %u %lx bad %s\n", n, d->base, d->bad);
		} else if (d->base + MMIO_MIN_SIZE > MAPPED_LIMIT || (d->base & 3)) {
			pr("PROBE virtio %u %lx bad unmapped\n", n, d->base);
		} else if ((v = rd(d->base, MMIO_MAGIC)) != VIRTIO_MAGIC) {
			pr("PROBE virtio %u %lx bad magic %x\n", n, d->base, v);
		} else if ((v = rd(d->base, MMIO_VERSION)) != 2) {
			pr("PROBE virtio %u %lx bad version %u\n", n, d->base, v);
		} else if (!(d->id = rd(d->base, MMIO_DEVICE_ID))) {
			pr("PROBE virtio %u %lx bad no_device\n", n, d->base);
		} else {
			pr("PROBE virtio %u %lx irq %u id %u\n", n, d->base, d->irq, d->id);
			d->ok = true;
			good++;
		}
	}
	pr("PROBE virtio_devices %u\n", good);
}

/* ---- initialisation (virtio 1.2 section 3.1.1) -------------------------- */

/* Reset, ACKNOWLEDGE, DRIVER, and FEATURES_OK with the offered subset of
 * `wanted` (VIRTIO_F_VERSION_1 required). False if the device refused. */
bool virtio_negotiate(u64 base, u64 wanted, u64 *accepted)
{
	u64 offered;
	u32 st = ST_ACKNOWLEDGE | ST_DRIVER;

	wr(base, MMIO_STATUS, 0);
	for (u32 n = 0; rd(base, MMIO_STATUS) && n < 100; n++)
		asm volatile("pause");
	wr(base, MMIO_STATUS, ST_ACKNOWLEDGE);
	wr(base, MMIO_STATUS, st);
	wr(base, MMIO_DEV_FEAT_SEL, 0);
	offered = rd(base, MMIO_DEV_FEAT);
	wr(base, MMIO_DEV_FEAT_SEL, 1);
	offered |= (u64)rd(base, MMIO_DEV_FEAT) << 32;
	*accepted = offered & (wanted | VIRTIO_F_VERSION_1);
	if (!(offered & VIRTIO_F_VERSION_1))
		return false;
	wr(base, MMIO_DRV_FEAT_SEL, 0);
	wr(base, MMIO_DRV_FEAT, *accepted);
	wr(base, MMIO_DRV_FEAT_SEL, 1);
	wr(base, MMIO_DRV_FEAT, *accepted >> 32);
	wr(base, MMIO_STATUS, st | ST_FEATURES_OK);
	return rd(base, MMIO_STATUS) & ST_FEATURES_OK;
}

void virtio_driver_ok(u64 base)
{
	wr(base, MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

void virtio_failed(u64 base)
{
	wr(base, MMIO_STATUS, rd(base, MMIO_STATUS) | ST_FAILED);
}

/* Config space fields, 32 bits at a time, retried while the generation
 * changes underneath. */
u32 virtio_config32(u64 base, u32 off)
{
	return rd(base, MMIO_CONFIG + off);
}

u64 virtio_config64(u64 base, u32 off)
{
	u32 gen, lo, hi, n = 0;

	do {
		gen = rd(base, MMIO_CONFIG_GEN);
		lo = rd(base, MMIO_CONFIG + off);
		hi = rd(base, MMIO_CONFIG + off + 4);
	} while (rd(base, MMIO_CONFIG_GEN) != gen && ++n < 16);
	return (u64)hi << 32 | lo;
}

static void wr64(u64 base, u32 off, u64 v)
{
	wr(base, off, v);
	wr(base, off + 4, v >> 32);
}

/* Queue `index` with up to VQ_MAX_SIZE entries (a power of 2) in `mem`
 * (VQ_MEM_SIZE bytes, 16-byte aligned). */
bool vq_setup(struct vq *q, u64 base, u32 index, u8 *mem)
{
	u32 max, size = VQ_MAX_SIZE;

	wr(base, MMIO_QUEUE_SEL, index);
	if (rd(base, MMIO_QUEUE_READY))
		return false;
	max = rd(base, MMIO_QUEUE_NUM_MAX);
	while (size > max)
		size >>= 1;
	if (size < 4)			/* a request takes three descriptors */
		return false;
	memset(mem, 0, VQ_MEM_SIZE);
	*q = (struct vq){
		.base = base, .index = index, .size = size,
		.desc = (void *)mem, .avail = (void *)(mem + 0x100), .used = (void *)(mem + 0x200),
	};
	wr(base, MMIO_QUEUE_NUM, size);
	wr64(base, MMIO_QUEUE_DESC, (u64)q->desc);
	wr64(base, MMIO_QUEUE_DRIVER, (u64)q->avail);
	wr64(base, MMIO_QUEUE_DEVICE, (u64)q->used);
	wr(base, MMIO_QUEUE_READY, 1);
	return true;
}

/* Publish the chain at descriptor 0, notify, and poll for its completion.
 * x86 keeps stores in order, so publishing needs only compiler barriers;
 * a locked add (which the PVM host emulates) fences the index update
 * against the notification all the same. */
bool vq_run(struct vq *q)
{
	u32 isr, id;
	u64 t0;

	asm volatile("" : : : "memory");	/* descriptors and buffers first */
	q->avail->ring[q->next_avail & (q->size - 1)] = 0;
	asm volatile("" : : : "memory");
	q->avail->idx = ++q->next_avail;
	asm volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
	wr(q->base, MMIO_QUEUE_NOTIFY, q->index);

	t0 = rdtsc();
	while (q->used->idx == q->next_used) {
		if (rdtsc() - t0 > TSC_REQUEST_TIMEOUT)
			return false;
		asm volatile("pause");
	}
	asm volatile("" : : : "memory");	/* the buffers after the index */
	id = q->used->ring[q->next_used & (q->size - 1)].id;
	q->next_used++;
	if (id != 0)
		pr("PROBE virtio error used_id %u\n", id);
	/* Interrupts stay off; acknowledge so the line does not stay raised. */
	isr = rd(q->base, MMIO_INT_STATUS);
	if (isr)
		wr(q->base, MMIO_INT_ACK, isr);
	return true;
}
