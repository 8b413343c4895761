/*
 * virtio-mmio transports (virtio 1.2 section 4.2, register layout version 2):
 * discovery from the DSDT and the command line, device identification,
 * feature negotiation, and split virtqueues driven by polling the used ring
 * with interrupts off.
 */
#include "probe.h"

#define VIRTIO_MAGIC     0x74726976	/* "virt" */
#define MMIO_MIN_SIZE    0x100		/* registers, without the config space */

/* Give up on a request after this many TSC ticks (10-30 s at 1-3 GHz). */
#define TSC_REQUEST_TIMEOUT 30000000000UL

struct virtio_dev virtio_devs[VIRTIO_MAX];
u32 virtio_found;

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
		} else if ((v = vrd(d->base, MMIO_MAGIC)) != VIRTIO_MAGIC) {
			pr("PROBE virtio %u %lx bad magic %x\n", n, d->base, v);
		} else if ((v = vrd(d->base, MMIO_VERSION)) != 2) {
			pr("PROBE virtio %u %lx bad version %u\n", n, d->base, v);
		} else if (!(d->id = vrd(d->base, MMIO_DEVICE_ID))) {
			pr("PROBE virtio %u %lx bad no_device\n", n, d->base);
		} else {
			pr("PROBE virtio %u %lx irq %u id %u\n", n, d->base, d->irq, d->id);
			d->ok = true;
			good++;
		}
	}
	pr("PROBE virtio_devices %u\n", good);
}

struct virtio_dev *virtio_first(u32 id)
{
	for (u32 i = 0; i < virtio_found; i++)
		if (virtio_devs[i].ok && virtio_devs[i].id == id)
			return &virtio_devs[i];
	return 0;
}

const char *virtio_name(u32 n)
{
	static const char *const names[] = {
		[VIRTIO_ID_NET] = "net", [VIRTIO_ID_BLOCK] = "blk",
		[VIRTIO_ID_RNG] = "rng", [VIRTIO_ID_VSOCK] = "vsock",
	};
	static char buf[16];
	u32 id = virtio_devs[n].id, k = 0, i = 0;
	const char *s = id < sizeof names / sizeof names[0] && names[id] ? names[id] : 0;

	if (s) {			/* the how-manieth of its kind */
		for (u32 j = 0; j < n; j++)
			k += virtio_devs[j].ok && virtio_devs[j].id == id;
	} else {
		s = "virtio";
		k = n;
	}
	while (*s)
		buf[i++] = *s++;
	if (k >= 10)
		buf[i++] = '0' + k / 10;
	buf[i++] = '0' + k % 10;
	buf[i] = 0;
	return buf;
}

/* ---- initialisation (virtio 1.2 section 3.1.1) -------------------------- */

/* Reset, ACKNOWLEDGE, DRIVER, and FEATURES_OK with the offered subset of
 * `wanted` (VIRTIO_F_VERSION_1 required). False if the device refused. */
bool virtio_negotiate(u64 base, u64 wanted, u64 *accepted)
{
	u64 offered;
	u32 st = ST_ACKNOWLEDGE | ST_DRIVER;

	vwr(base, MMIO_STATUS, 0);
	for (u32 n = 0; vrd(base, MMIO_STATUS) && n < 100; n++)
		asm volatile("pause");
	vwr(base, MMIO_STATUS, ST_ACKNOWLEDGE);
	vwr(base, MMIO_STATUS, st);
	vwr(base, MMIO_DEV_FEAT_SEL, 0);
	offered = vrd(base, MMIO_DEV_FEAT);
	vwr(base, MMIO_DEV_FEAT_SEL, 1);
	offered |= (u64)vrd(base, MMIO_DEV_FEAT) << 32;
	*accepted = offered & (wanted | VIRTIO_F_VERSION_1);
	if (!(offered & VIRTIO_F_VERSION_1))
		return false;
	vwr(base, MMIO_DRV_FEAT_SEL, 0);
	vwr(base, MMIO_DRV_FEAT, *accepted);
	vwr(base, MMIO_DRV_FEAT_SEL, 1);
	vwr(base, MMIO_DRV_FEAT, *accepted >> 32);
	vwr(base, MMIO_STATUS, st | ST_FEATURES_OK);
	return vrd(base, MMIO_STATUS) & ST_FEATURES_OK;
}

void virtio_driver_ok(u64 base)
{
	vwr(base, MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

void virtio_failed(u64 base)
{
	vwr(base, MMIO_STATUS, vrd(base, MMIO_STATUS) | ST_FAILED);
}

/* Config space fields, 32 bits at a time, retried while the generation
 * changes underneath. */
u32 virtio_config32(u64 base, u32 off)
{
	return vrd(base, MMIO_CONFIG + off);
}

u64 virtio_config64(u64 base, u32 off)
{
	u32 gen, lo, hi, n = 0;

	do {
		gen = vrd(base, MMIO_CONFIG_GEN);
		lo = vrd(base, MMIO_CONFIG + off);
		hi = vrd(base, MMIO_CONFIG + off + 4);
	} while (vrd(base, MMIO_CONFIG_GEN) != gen && ++n < 16);
	return (u64)hi << 32 | lo;
}

static void wr64(u64 base, u32 off, u64 v)
{
	vwr(base, off, v);
	vwr(base, off + 4, v >> 32);
}

/* Queue `index` with up to VQ_MAX_SIZE entries (a power of 2) in `mem`
 * (VQ_MEM_SIZE bytes, 16-byte aligned). */
bool vq_setup(struct vq *q, u64 base, u32 index, u8 *mem)
{
	u32 max, size = VQ_MAX_SIZE;

	vwr(base, MMIO_QUEUE_SEL, index);
	if (vrd(base, MMIO_QUEUE_READY))
		return false;
	max = vrd(base, MMIO_QUEUE_NUM_MAX);
	while (size > max)
		size >>= 1;
	if (size < 4)			/* a request takes three descriptors */
		return false;
	*q = (struct vq){
		.base = base, .index = index, .size = size,
		.desc = (void *)mem, .avail = (void *)(mem + 0x100), .used = (void *)(mem + 0x200),
	};
	/* Descriptors and ring entries are written before they are published. */
	q->avail->flags = q->avail->idx = 0;
	q->used->flags = q->used->idx = 0;
	vwr(base, MMIO_QUEUE_NUM, size);
	wr64(base, MMIO_QUEUE_DESC, (u64)q->desc);
	wr64(base, MMIO_QUEUE_DRIVER, (u64)q->avail);
	wr64(base, MMIO_QUEUE_DEVICE, (u64)q->used);
	vwr(base, MMIO_QUEUE_READY, 1);
	return true;
}

void vq_set(struct vq *q, u32 i, const volatile void *addr, u32 len, u16 flags)
{
	q->desc[i].addr = (u64)addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = i + 1;
}

/* x86 keeps stores in order, so publishing needs only compiler barriers:
 * descriptors and buffers, then the ring entry, then the index. */
void vq_add(struct vq *q, u16 head)
{
	asm volatile("" : : : "memory");
	q->avail->ring[q->next_avail & (q->size - 1)] = head;
	asm volatile("" : : : "memory");
	q->avail->idx = ++q->next_avail;
}

/* A locked add (which the PVM host emulates) fences the index update
 * against the notification. */
void vq_notify(struct vq *q)
{
	asm volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
	vwr(q->base, MMIO_QUEUE_NOTIFY, q->index);
}

int vq_used(struct vq *q)
{
	u32 isr, id;

	if (q->used->idx == q->next_used)
		return -1;
	asm volatile("" : : : "memory");	/* the entry and buffers after the index */
	id = q->used->ring[q->next_used & (q->size - 1)].id;
	q->used_len = q->used->ring[q->next_used & (q->size - 1)].len;
	q->next_used++;
	/* Interrupts stay off; acknowledge so the line does not stay raised. */
	isr = vrd(q->base, MMIO_INT_STATUS);
	if (isr)
		vwr(q->base, MMIO_INT_ACK, isr);
	return id < 0x10000 ? (int)id : 0xffff;	/* a bad id stays a bad id */
}

int vq_wait(struct vq *q, u64 until)
{
	int id;

	while ((id = vq_used(q)) < 0 && !passed(until))
		asm volatile("pause");
	return id;
}

/* Publish the chain at descriptor 0, notify, and poll for its completion. */
bool vq_run(struct vq *q)
{
	int id;

	vq_add(q, 0);
	vq_notify(q);
	id = vq_wait(q, rdtsc() + TSC_REQUEST_TIMEOUT);
	if (id > 0)
		pr("PROBE virtio error used_id %u\n", id);
	return id >= 0;
}
