/*
 * probe.garbage: a driver that breaks the rules on purpose, against every
 * virtio device found, and then checks that each still works after a
 * reset. Register accesses in the wrong state and of the wrong width, then
 * malformed chains on a live queue (see README.md for the list).
 */
#include "probe.h"

#define BLK_F_FLUSH  (1UL << 9)
#define CASES        10
#define CASE_MS      20			/* wait for the device's answer to a case */
#define RAM_BEYOND   0x4000000000UL	/* 256 GiB: no guest has RAM there */

/* Devices may write anywhere in buf (and, if they honour a length of
 * 0xffffffff, past it): it is the last thing in the image (garbage.o is
 * linked last), followed by free RAM. */
static struct {
	u8 q[3][VQ_MEM_SIZE];
	u8 buf[4096];
} dma __attribute__((section(".dma"), aligned(4096)));

static struct vq gq[3];

static u32 queues(u32 id)
{
	return id == VIRTIO_ID_NET ? 2 : id == VIRTIO_ID_VSOCK ? 3 : 1;
}

/* Reset, negotiate, every queue of the device, DRIVER_OK; 0 or why not. */
static const char *init(struct virtio_dev *d, u64 wanted, u64 *features)
{
	if (!virtio_negotiate(d->base, wanted, features))
		return "features";
	for (u32 i = 0; i < queues(d->id); i++)
		if (!vq_setup(&gq[i], d->base, i, dma.q[i]))
			return "queue";
	virtio_driver_ok(d->base);
	return 0;
}

/* (a) Register accesses in the wrong state, of the wrong width, at the
 * wrong place. The values read are discarded. */
static void bad_registers(u64 b)
{
	static const u16 unknown[] = { 0x018, 0x01c, 0x028, 0x03c, 0x040, 0x048, 0x04c,
				       0x058, 0x068, 0x074, 0x0c0, 0x0f0, 0x0f8 };
	static const u16 read_only[] = { MMIO_MAGIC, MMIO_VERSION, MMIO_DEVICE_ID,
					 MMIO_DEV_FEAT, MMIO_QUEUE_NUM_MAX, MMIO_INT_STATUS,
					 MMIO_CONFIG_GEN };
	volatile u8 *r = (volatile u8 *)b;
	u64 sink = 0, f;

	vwr(b, MMIO_STATUS, 0);
	vwr(b, MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
	/* Queue set-up before FEATURES_OK, then DRIVER_OK without it. */
	vwr(b, MMIO_QUEUE_SEL, 0);
	vwr(b, MMIO_QUEUE_NUM, 8);
	vwr(b, MMIO_QUEUE_DESC, 0xdead0000);
	vwr(b, MMIO_QUEUE_DESC + 4, 0);
	vwr(b, MMIO_QUEUE_DRIVER, 0xdead1000);
	vwr(b, MMIO_QUEUE_DEVICE, 0xdead2000);
	vwr(b, MMIO_QUEUE_READY, 1);
	vwr(b, MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_DRIVER_OK);
	vwr(b, MMIO_QUEUE_NOTIFY, 0);
	/* Driver features after FEATURES_OK; a status bit taken back. */
	virtio_negotiate(b, 0, &f);
	for (u32 sel = 0; sel < 3; sel++) {
		vwr(b, MMIO_DRV_FEAT_SEL, sel);
		vwr(b, MMIO_DRV_FEAT, 0xffffffff);
	}
	vwr(b, MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
	/* Queues that do not exist. */
	for (u32 sel = 0x7fff; sel; sel = sel == 0x7fff ? 0xffffffff : 0) {
		vwr(b, MMIO_QUEUE_SEL, sel);
		sink += vrd(b, MMIO_QUEUE_NUM_MAX) + vrd(b, MMIO_QUEUE_READY);
		vwr(b, MMIO_QUEUE_NUM, 16);
		vwr(b, MMIO_QUEUE_DESC, 0x1000);
		vwr(b, MMIO_QUEUE_READY, 1);
		vwr(b, MMIO_QUEUE_NOTIFY, sel);
	}
	/* Odd widths and unaligned accesses. */
	sink += r[MMIO_MAGIC] + r[MMIO_STATUS + 1] + *(volatile u16 *)(r + 0x71) +
		*(volatile u64 *)(r + MMIO_STATUS) + *(volatile u32 *)(r + 6) +
		*(volatile u64 *)(r + MMIO_CONFIG_GEN - 4);
	r[MMIO_STATUS] = 0;
	*(volatile u16 *)(r + MMIO_QUEUE_READY) = 1;
	*(volatile u64 *)(r + MMIO_QUEUE_DESC) = 0x1111222233334444UL;
	*(volatile u32 *)(r + MMIO_QUEUE_SEL + 2) = 1;
	*(volatile u32 *)(r + MMIO_STATUS + 1) = 0xffffffff;
	r[MMIO_QUEUE_NOTIFY] = 0;
	*(volatile u16 *)(r + MMIO_QUEUE_NOTIFY) = 0;
	/* Unknown offsets and read-only registers; the far end of the config space. */
	for (u32 i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
		sink += vrd(b, unknown[i]);
		vwr(b, unknown[i], 0xffffffff);
	}
	for (u32 i = 0; i < sizeof read_only / sizeof read_only[0]; i++)
		vwr(b, read_only[i], 0xffffffff);
	sink += vrd(b, 0xffc);
	vwr(b, 0xffc, 0xffffffff);
	asm volatile("" : : "r"(sink));
}

/* A well-formed chain for queue q of the device in dma.buf: a blk read of
 * sector 0, a transmit buffer on a transmit queue, else one device-writable
 * buffer. Returns the number of descriptors; *m is the one to spoil. */
static u32 chain(u32 id, struct vq *q, u32 *m)
{
	u8 *b = dma.buf;

	memset(b, 0, 0x100);		/* a blk header, a zeroed frame or packet */
	*m = 0;
	if (id == VIRTIO_ID_BLOCK) {	/* header {IN, 0, sector 0}, data, status */
		vq_set(q, 0, b, 16, VQ_DESC_NEXT);
		vq_set(q, 1, b + 0x200, 512, VQ_DESC_NEXT | VQ_DESC_WRITE);
		vq_set(q, 2, b + 0x400, 1, VQ_DESC_WRITE);
		*m = 1;
		return 3;
	}
	if ((id == VIRTIO_ID_NET || id == VIRTIO_ID_VSOCK) && q->index == 1)
		vq_set(q, 0, b, 72, 0);
	else
		vq_set(q, 0, b, 512, VQ_DESC_WRITE);
	return 1;
}

/* (b) Malformed chain number k on queue q, notified; the device's answer:
 * u (a used entry), r (NEEDS_RESET) or - (nothing within CASE_MS). */
static char bad_chain(struct virtio_dev *d, struct vq *q, u32 k)
{
	u32 m, n = chain(d->id, q, &m), st = 0;
	volatile struct vq_desc *e = &q->desc[m];
	u16 head = 0, used = q->used->idx;
	u64 until;

	switch (k) {
	case 0:			/* a descriptor chaining to itself */
		e->flags |= VQ_DESC_NEXT;
		e->next = m;
		break;
	case 1:			/* a head beyond the queue */
		head = q->size + 5;
		break;
	case 2:			/* a next index beyond the queue */
		e->flags |= VQ_DESC_NEXT;
		e->next = q->size + 3;
		break;
	case 3:			/* a buffer beyond RAM */
		e->addr = RAM_BEYOND;
		break;
	case 4:			/* a length of 4 GiB - 1 */
		e->len = 0xffffffff;
		break;
	case 5:			/* a buffer over the descriptor table */
		e->addr = (u64)q->desc;
		e->len = 16 * q->size;
		break;
	case 6:			/* a buffer over the available ring */
		e->addr = (u64)q->avail;
		e->len = 4 + 2 * q->size;
		break;
	case 7:			/* every buffer the wrong way round */
		for (u32 i = 0; i < n; i++)
			q->desc[i].flags ^= VQ_DESC_WRITE;
		break;
	case 8:			/* an indirect table (not negotiated) of garbage */
		memset(dma.buf + 0x800, 0xa5, 64);
		e->addr = (u64)(dma.buf + 0x800);
		e->len = 64;
		e->flags = VQ_DESC_INDIRECT;
		break;
	}
	vq_add(q, head);
	if (k == 9)		/* the available index 1000 ahead */
		q->avail->idx += 1000;
	vq_notify(q);
	until = deadline(CASE_MS);
	for (u32 i = 1; q->used->idx == used && !passed(until); i++)
		if (!(i & 255) && ((st = vrd(d->base, MMIO_STATUS)) & ST_NEEDS_RESET))
			break;
	st = vrd(d->base, MMIO_STATUS);
	return st & ST_NEEDS_RESET ? 'r' : q->used->idx != used ? 'u' : '-';
}

/* (d) One valid operation after a reset and a proper set-up. */
static const char *recover(struct virtio_dev *d)
{
	struct vq *q = &gq[0];
	u8 *b = dma.buf;
	const char *why;
	u64 features, until = deadline(100);
	u32 st;

	vwr(d->base, MMIO_STATUS, 0);
	while ((st = vrd(d->base, MMIO_STATUS)) && !passed(until))
		asm volatile("pause");
	if (st)
		return "reset";
	why = init(d, d->id == VIRTIO_ID_BLOCK ? BLK_F_FLUSH : 0, &features);
	if (why)
		return why;
	st = vrd(d->base, MMIO_STATUS);
	if ((st & ST_NEEDS_RESET) || !(st & ST_DRIVER_OK))
		return "status";
	memset(b, 0, 16);
	if (d->id == VIRTIO_ID_BLOCK) {	/* FLUSH if offered, then read sector 0 */
		for (u32 type = features & BLK_F_FLUSH ? 4 : 0;; type = 0) {
			u32 s = 1;

			b[0] = type;
			b[0x400] = 0xff;
			vq_set(q, 0, b, 16, VQ_DESC_NEXT);
			if (!type)
				vq_set(q, s++, b + 0x200, 512, VQ_DESC_NEXT | VQ_DESC_WRITE);
			vq_set(q, s, b + 0x400, 1, VQ_DESC_WRITE);
			vq_add(q, 0);
			vq_notify(q);
			if (vq_wait(q, deadline(2000)) < 0)
				return "timeout";
			if (b[0x400] != 0)
				return type ? "flush_status" : "read_status";
			if (!type)
				break;
		}
	} else if (d->id == VIRTIO_ID_RNG) {
		vq_set(q, 0, b, 16, VQ_DESC_WRITE);
		vq_add(q, 0);
		vq_notify(q);
		if (vq_wait(q, deadline(2000)) < 0)
			return "timeout";
		if (!q->used_len || q->used_len > 16)
			return "rng_length";
	}
	return 0;
}

static void garbage_dev(u32 n)
{
	struct virtio_dev *d = &virtio_devs[n];
	const char *name = virtio_name(n), *why;
	u32 nq = d->id == VIRTIO_ID_NET || d->id == VIRTIO_ID_VSOCK ? 2 : 1;
	u64 features;
	char res[CASES + 1];

	bad_registers(d->base);
	why = init(d, 0, &features);
	for (u32 qi = 0; qi < nq; qi++) {
		for (u32 k = 0; k < CASES; k++) {
			res[k] = why ? 'x' : bad_chain(d, &gq[qi], k);
			if (res[k] == 'r' && !(qi == nq - 1 && k == CASES - 1))
				why = init(d, 0, &features);
		}
		res[CASES] = 0;
		pr("PROBE garbage %s queue %u %s\n", name, qi, res);
	}
	pr("PROBE garbage %s status %x\n", name, vrd(d->base, MMIO_STATUS));
	why = recover(d);
	if (why)
		pr("PROBE garbage %s broken %s\n", name, why);
	else
		pr("PROBE garbage %s recovered\n", name);
	/* Quiet: the next device's queues use the same memory. */
	vwr(d->base, MMIO_STATUS, 0);
}

void garbage_run(void)
{
	if (!has_word("probe.garbage"))
		return;
	for (u32 n = 0; n < virtio_found; n++)
		if (virtio_devs[n].ok)
			garbage_dev(n);
	pr("PROBE garbage_done\n");
}
