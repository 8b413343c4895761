/*
 * probe.bench_*: device throughput, with the I/O loop in ring 3 (ring3.S),
 * which the PVM host runs natively, so that the emulated ring 0 does not
 * dominate. Ring 0 sets the device up (as the exercises do) and prints;
 * ring 3 fills the buffers and descriptors, then runs the loop: requests
 * made available, a QueueNotify write to kick the device, completion by
 * polling the used ring. No interrupts (the avail ring says
 * NO_INTERRUPT), no port I/O, no clock: the host times the `start` and
 * `done` lines as they arrive.
 *
 * Memory: BENCH_MEM, 4 MiB of RAM above the image (the e820 map must say
 * RAM): the ring-3 stack, up to three queues of up to 256 entries, request
 * headers and status bytes, and the buffers.
 */
#include "probe.h"

#define BENCH_MEM    0x1000000UL	/* 16 MiB */
#define BENCH_SIZE   0x400000UL
#define USER_STACK   (BENCH_MEM + 0x4000)	/* top; 16 KiB below it */
#define QUEUE_MEM(i) (BENCH_MEM + 0x4000 + (i) * 0x4000)
#define SMALL        (BENCH_MEM + 0x10000)	/* headers, status bytes */
#define BUFS         (BENCH_MEM + 0x100000)	/* 3 MiB of buffers */

#define BQ_MAX       256		/* entries per queue, at most */
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY     1
#define RING_F_EVENT_IDX     (1UL << 29)
#define STALL_MS     10000		/* no progress for this long: timeout */

extern const u8 _start[], _end[];

/* ---- queues, ring 3 side ------------------------------------------------ */

struct bq {
	u64 base;
	u32 index;
	u16 size, next_avail, next_used;
	u16 published;			/* avail index at the last bq_kick */
	bool event_idx;			/* VIRTIO_F_EVENT_IDX negotiated */
	u64 kicks;			/* QueueNotify writes */
	volatile struct vq_desc *desc;
	volatile struct vq_avail *avail;
	volatile struct vq_used *used;
};

/* probe.bench_event_idx asks for VIRTIO_F_EVENT_IDX; set by open_dev if the
 * device took it, for the queues set up next. */
static bool want_event_idx, event_idx;

/* Ring 0: queue `index` with min(want, QueueNumMax) entries, rounded down
 * to a power of 2, in 16 KiB at mem: descriptors at 0, avail ring after
 * them, used ring at 0x2000. No interrupts wanted: the NO_INTERRUPT flag,
 * or with EVENT_IDX a used_event that the used index reaches only after
 * 65535 completions (it is never moved). */
static bool bq_setup(struct bq *q, u64 base, u32 index, u64 mem, u32 want)
{
	u32 max, size = BQ_MAX;

	vwr(base, MMIO_QUEUE_SEL, index);
	if (vrd(base, MMIO_QUEUE_READY))
		return false;
	max = vrd(base, MMIO_QUEUE_NUM_MAX);
	while (size > max || size > want)
		size >>= 1;
	if (size < 4)
		return false;
	*q = (struct bq){
		.base = base, .index = index, .size = size, .desc = (void *)mem,
		.avail = (void *)(mem + 16 * size), .used = (void *)(mem + 0x2000),
		.event_idx = event_idx,
	};
	q->avail->flags = event_idx ? 0 : AVAIL_F_NO_INTERRUPT;
	q->avail->ring[size] = 0xffff;		/* used_event */
	*(volatile u16 *)((u64)q->used + 4 + 8 * size) = 0;	/* avail_event */
	q->avail->idx = 0;
	q->used->flags = q->used->idx = 0;
	vwr(base, MMIO_QUEUE_NUM, size);
	vwr(base, MMIO_QUEUE_DESC, mem);
	vwr(base, MMIO_QUEUE_DESC + 4, mem >> 32);
	vwr(base, MMIO_QUEUE_DRIVER, (u64)q->avail);
	vwr(base, MMIO_QUEUE_DRIVER + 4, (u64)q->avail >> 32);
	vwr(base, MMIO_QUEUE_DEVICE, (u64)q->used);
	vwr(base, MMIO_QUEUE_DEVICE + 4, (u64)q->used >> 32);
	vwr(base, MMIO_QUEUE_READY, 1);
	return true;
}

static void bq_desc(struct bq *q, u32 i, u64 addr, u32 len, u16 flags, u16 next)
{
	q->desc[i].addr = addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = next;
}

/* A chain into the avail ring; bq_kick publishes. */
static inline void bq_put(struct bq *q, u16 head)
{
	q->avail->ring[q->next_avail++ & (q->size - 1)] = head;
}

/* Publishes the new avail index and notifies, unless the device said it
 * needs no notification now (it then looks at the ring again itself): the
 * used ring's NO_NOTIFY flag, or with EVENT_IDX an avail_event (after the
 * used ring's entries) that the new entries did not pass. */
static void bq_kick(struct bq *q)
{
	u16 old = q->published, new = q->next_avail;
	bool notify;

	asm volatile("" : : : "memory");
	q->avail->idx = new;
	q->published = new;
	asm volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc");
	if (q->event_idx)
		notify = (u16)(new - *(volatile u16 *)((u64)q->used + 4 + 8 * q->size) - 1) <
			 (u16)(new - old);
	else
		notify = !(q->used->flags & USED_F_NO_NOTIFY);
	if (notify) {
		vwr(q->base, MMIO_QUEUE_NOTIFY, q->index);
		q->kicks++;
	}
}

/* Head of the next used chain (its length in *len), or -1. */
static inline int bq_get(struct bq *q, u32 *len)
{
	u32 slot;

	if (q->used->idx == q->next_used)
		return -1;
	asm volatile("" : : : "memory");
	slot = q->next_used++ & (q->size - 1);
	*len = q->used->ring[slot].len;
	return q->used->ring[slot].id;
}

/* Time-outs in ring 3: rdtsc, checked only now and then while idle. */
struct stall { u64 until; u32 idle; };

static inline void moved(struct stall *s)
{
	s->until = rdtsc() + STALL_MS * TSC_MS;
	s->idle = 0;
}

static inline bool stalled(struct stall *s)
{
	asm volatile("pause");
	return (++s->idle & 1023) == 0 && passed(s->until);
}

static void fill(u64 addr, u64 bytes, u64 seed)
{
	volatile u64 *p = (volatile u64 *)addr;

	for (u64 i = 0; i < bytes / 8; i++)
		p[i] = seed + i * 0x9e3779b97f4a7c15UL;
}

/* ---- results ------------------------------------------------------------- */

struct result {
	u64 ops, bytes;
	const char *err;		/* 0: done */
	u64 detail;
};

/* Runs the loop in ring 3 between the `start` and `done` lines. */
static void report(const char *name, u64 (*loop)(void *), struct result *r,
		   const struct bq *q1, const struct bq *q2)
{
	pr("PROBE bench_%s start\n", name);
	if (user_run(loop, 0, (void *)USER_STACK) == (u64)USER_FAULT) {
		pr("PROBE bench_%s error fault %lu error %lx rip %lx addr %lx\n", name,
		   user_fault.vector, user_fault.error, user_fault.rip, user_fault.cr2);
	} else if (r->err) {
		pr("PROBE bench_%s error %s %lu after %lu\n", name, r->err, r->detail, r->ops);
	} else {
		pr("PROBE bench_%s done %lu %lu\n", name, r->ops, r->bytes);
		pr("PROBE bench_%s kicks %lu\n", name, q1->kicks + (q2 ? q2->kicks : 0));
	}
}

/* Negotiates `wanted` on the first device of type `id` and maps its
 * registers for ring 3; its base, or 0 after printing why not. */
static u64 open_dev(const char *name, u32 id, u64 wanted, u64 *features)
{
	struct virtio_dev *d = virtio_first(id);

	if (!d) {
		pr("PROBE bench_%s error none\n", name);
		return 0;
	}
	if (!virtio_negotiate(d->base, wanted | (want_event_idx ? RING_F_EVENT_IDX : 0),
			      features)) {
		pr("PROBE bench_%s error features\n", name);
		virtio_failed(d->base);
		return 0;
	}
	event_idx = *features & RING_F_EVENT_IDX;
	user_map(d->base, 0x1000);
	return d->base;
}

static void queue_error(const char *name, u64 base)
{
	pr("PROBE bench_%s error queue\n", name);
	virtio_failed(base);
}

static const char *arg(const char *prefix, u64 *v)
{
	const char *s = cmdline_arg(prefix, 0);

	if (s && !parse_num(&s, v, false))
		*v = 0;
	return s;
}

/* ---- virtio-blk ----------------------------------------------------------- */

#define BLK_F_FLUSH  (1UL << 9)
#define T_IN         0
#define T_OUT        1
#define T_FLUSH      4
#define READ_BYTES   4096
#define WRITE_BYTES  0x100000UL
#define MAX_DEPTH    64

struct blk_hdr { u32 type, reserved; u64 sector; };

static struct {
	struct bq q;
	struct result r;
	u64 sectors, ops, depth, submitted, seed;
	bool flush;
	volatile struct blk_hdr *hdr;	/* one per chain */
	volatile u8 *status;
} blk;

static void blk_chain(u32 k, u32 type, u64 data, u32 len, bool device_writes)
{
	u16 d = 3 * k;

	blk.hdr[k] = (struct blk_hdr){ type, 0, 0 };
	bq_desc(&blk.q, d, (u64)&blk.hdr[k], sizeof blk.hdr[k], VQ_DESC_NEXT, d + 1);
	bq_desc(&blk.q, d + 1, data, len, VQ_DESC_NEXT | (device_writes ? VQ_DESC_WRITE : 0),
		d + 2);
	bq_desc(&blk.q, d + 2, (u64)&blk.status[k], 1, VQ_DESC_WRITE, 0);
}

static u64 blk_read_prep(void *unused)
{
	(void)unused;
	for (u32 k = 0; k < blk.depth; k++)
		blk_chain(k, T_IN, BUFS + k * READ_BYTES, READ_BYTES, true);
	return 0;
}

static u64 xorshift(u64 *s)
{
	u64 x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

/* Chain k reads 4 KiB at a random 4 KiB-aligned place on the disk. */
static void blk_submit_read(u32 k)
{
	blk.hdr[k].sector = xorshift(&blk.seed) % (blk.sectors / 8) * 8;
	blk.status[k] = 0xff;
	bq_put(&blk.q, 3 * k);
	blk.submitted++;
}

/* `depth` reads in flight; each completion is checked and replaced. */
static u64 blk_read_loop(void *unused)
{
	struct stall s;
	u32 len;

	(void)unused;
	moved(&s);
	for (u32 k = 0; k < blk.depth && blk.submitted < blk.ops; k++)
		blk_submit_read(k);
	bq_kick(&blk.q);
	while (blk.r.ops < blk.ops) {
		u32 got = 0, fresh = 0;
		int id;

		while ((id = bq_get(&blk.q, &len)) >= 0) {
			u32 k = id / 3;

			if (id % 3 || k >= blk.depth) {
				blk.r.err = "used_id";
				blk.r.detail = id;
				return 1;
			}
			if (blk.status[k]) {
				blk.r.err = "status";
				blk.r.detail = blk.status[k];
				return 1;
			}
			blk.r.ops++;
			blk.r.bytes += READ_BYTES;
			got++;
			if (blk.submitted < blk.ops) {
				blk_submit_read(k);
				fresh++;
			}
		}
		if (fresh)
			bq_kick(&blk.q);
		if (got) {
			moved(&s);
		} else if (stalled(&s)) {
			blk.r.err = "timeout";
			return 1;
		}
	}
	return 0;
}

static u64 blk_write_prep(void *unused)
{
	(void)unused;
	fill(BUFS, WRITE_BYTES, 0x4b45454c);
	blk_chain(0, T_OUT, BUFS, WRITE_BYTES, false);
	/* The flush: header and status only, descriptors 3 and 4. */
	blk.hdr[1] = (struct blk_hdr){ T_FLUSH, 0, 0 };
	bq_desc(&blk.q, 3, (u64)&blk.hdr[1], sizeof blk.hdr[1], VQ_DESC_NEXT, 4);
	bq_desc(&blk.q, 4, (u64)&blk.status[1], 1, VQ_DESC_WRITE, 0);
	return 0;
}

/* One chain, waited for; false (with the error set) if it failed. */
static bool blk_one(u16 head, u32 k)
{
	struct stall s;
	u32 len;
	int id;

	blk.status[k] = 0xff;
	bq_put(&blk.q, head);
	bq_kick(&blk.q);
	moved(&s);
	while ((id = bq_get(&blk.q, &len)) < 0)
		if (stalled(&s)) {
			blk.r.err = "timeout";
			return false;
		}
	if (id != head) {
		blk.r.err = "used_id";
		blk.r.detail = id;
		return false;
	}
	if (blk.status[k]) {
		blk.r.err = "status";
		blk.r.detail = blk.status[k];
		return false;
	}
	return true;
}

/* 1 MiB sequential writes (wrapping at the end of the disk), each followed
 * by a FLUSH. */
static u64 blk_write_loop(void *unused)
{
	u64 sector = 0, per = WRITE_BYTES / 512;

	(void)unused;
	while (blk.r.ops < blk.ops) {
		if (sector + per > blk.sectors)
			sector = 0;
		blk.hdr[0].sector = sector;
		if (!blk_one(0, 0) || (blk.flush && !blk_one(3, 1)))
			return 1;
		sector += per;
		blk.r.ops++;
		blk.r.bytes += WRITE_BYTES;
	}
	return 0;
}

static void blk_bench(const char *name, u64 ops, u64 depth, bool write)
{
	u64 features, base = open_dev(name, VIRTIO_ID_BLOCK, BLK_F_FLUSH, &features);

	if (!base)
		return;
	blk = (typeof(blk)){
		.ops = ops, .depth = depth, .seed = 0x2545f4914f6cdd1dUL,
		.flush = features & BLK_F_FLUSH,
		.hdr = (void *)SMALL, .status = (void *)(SMALL + 0x1000),
	};
	if (!bq_setup(&blk.q, base, 0, QUEUE_MEM(0), BQ_MAX) || 3 * depth > blk.q.size) {
		queue_error(name, base);
		return;
	}
	virtio_driver_ok(base);
	blk.sectors = virtio_config64(base, 0);
	if (blk.sectors < (write ? WRITE_BYTES : READ_BYTES) / 512) {
		pr("PROBE bench_%s error small %lu\n", name, blk.sectors);
		return;
	}
	user_run(write ? blk_write_prep : blk_read_prep, 0, (void *)USER_STACK);
	report(name, write ? blk_write_loop : blk_read_loop, &blk.r, &blk.q, 0);
	vwr(base, MMIO_STATUS, 0);
}

/* ---- virtio-net ----------------------------------------------------------- */

#define NET_F_MAC    (1UL << 5)
#define NET_HDR      12
#define FRAME        1514		/* 14-byte Ethernet header, 1500 bytes payload */
#define NET_BUF      2048
#define RX_BUFS_AT   (BUFS + BQ_MAX * NET_BUF)

static struct {
	struct bq rx, tx;
	struct result r;
	u64 frames, sent;
	u8 mac[6];
	u32 nfree;
	u16 free[BQ_MAX];
} net;

/* Every transmit buffer holds the same frame: broadcast, EtherType 0x88b5. */
static u64 net_tx_prep(void *unused)
{
	(void)unused;
	for (u32 i = 0; i < net.tx.size; i++) {
		u8 *b = (u8 *)(BUFS + i * NET_BUF), *f = b + NET_HDR;

		fill((u64)b, NET_BUF, i);
		for (u32 k = 0; k < NET_HDR; k++)
			b[k] = 0;
		for (u32 k = 0; k < 6; k++) {
			f[k] = 0xff;
			f[6 + k] = net.mac[k];
		}
		f[12] = 0x88;
		f[13] = 0xb5;
		bq_desc(&net.tx, i, (u64)b, NET_HDR + FRAME, 0, 0);
		net.free[net.nfree++] = i;
	}
	return 0;
}

/* Keeps the transmit ring full; used buffers go straight back. */
static u64 net_tx_loop(void *unused)
{
	struct stall s;
	u32 len;

	(void)unused;
	moved(&s);
	while (net.r.ops < net.frames) {
		u32 fresh = 0, got = 0;
		int id;

		while (net.nfree && net.sent < net.frames) {
			bq_put(&net.tx, net.free[--net.nfree]);
			net.sent++;
			fresh++;
		}
		if (fresh)
			bq_kick(&net.tx);
		while ((id = bq_get(&net.tx, &len)) >= 0) {
			if (id >= net.tx.size) {
				net.r.err = "used_id";
				net.r.detail = id;
				return 1;
			}
			net.free[net.nfree++] = id;
			net.r.ops++;
			net.r.bytes += FRAME;
			got++;
		}
		if (got) {
			moved(&s);
		} else if (stalled(&s)) {
			net.r.err = "timeout";
			return 1;
		}
	}
	return 0;
}

static u64 net_rx_prep(void *unused)
{
	(void)unused;
	for (u32 i = 0; i < net.rx.size; i++) {
		bq_desc(&net.rx, i, RX_BUFS_AT + i * NET_BUF, NET_BUF, VQ_DESC_WRITE, 0);
		bq_put(&net.rx, i);
	}
	bq_kick(&net.rx);
	return 0;
}

/* Counts received frames of EtherType 0x88b5 (others are not counted);
 * every used buffer goes straight back. */
static u64 net_rx_loop(void *unused)
{
	struct stall s;
	u32 len;

	(void)unused;
	moved(&s);
	while (net.r.ops < net.frames) {
		u32 got = 0;
		int id;

		while ((id = bq_get(&net.rx, &len)) >= 0) {
			const u8 *f;

			if (id >= net.rx.size) {
				net.r.err = "used_id";
				net.r.detail = id;
				return 1;
			}
			f = (const u8 *)(RX_BUFS_AT + (u32)id * NET_BUF) + NET_HDR;
			if (len >= NET_HDR + 14 && f[12] == 0x88 && f[13] == 0xb5) {
				net.r.ops++;
				net.r.bytes += len - NET_HDR;
			}
			bq_put(&net.rx, id);
			got++;
		}
		if (got) {
			bq_kick(&net.rx);
			moved(&s);
		} else if (stalled(&s)) {
			net.r.err = "timeout";
			net.r.detail = net.r.ops;
			return 1;
		}
	}
	return 0;
}

static void net_bench(const char *name, u64 frames, bool rx)
{
	u64 features, base = open_dev(name, VIRTIO_ID_NET, NET_F_MAC, &features);

	if (!base)
		return;
	net = (typeof(net)){ .frames = frames, .mac = { 0x02, 0, 0, 0, 0, 0x01 } };
	if (!bq_setup(&net.rx, base, 0, QUEUE_MEM(0), BQ_MAX) ||
	    !bq_setup(&net.tx, base, 1, QUEUE_MEM(1), BQ_MAX)) {
		queue_error(name, base);
		return;
	}
	if (features & NET_F_MAC) {
		u32 lo = virtio_config32(base, 0), hi = virtio_config32(base, 4);

		memcpy(net.mac, &lo, 4);
		memcpy(net.mac + 4, &hi, 2);
	}
	virtio_driver_ok(base);
	user_run(rx ? net_rx_prep : net_tx_prep, 0, (void *)USER_STACK);
	report(name, rx ? net_rx_loop : net_tx_loop, &net.r, rx ? &net.rx : &net.tx, 0);
	vwr(base, MMIO_STATUS, 0);
}

/* ---- virtio-vsock --------------------------------------------------------- */

#define VS_HDR       44
#define VS_LOCAL     1025		/* the bench's local port */
#define VS_ALLOC     65536		/* buf_alloc sent; nothing is received */
#define VS_CHUNK     16384		/* payload per packet */
#define VS_RX        32			/* receive buffers ... */
#define VS_RX_BUF    4096		/* ... of this size, header included */
#define VS_PAYLOAD   BUFS		/* VS_CHUNK bytes, sent again and again */
#define VS_RX_AT     (BUFS + 0x10000)
#define VS_HDRS      SMALL		/* one header per transmit slot */
#define VS_EVENTS    (SMALL + 0x8000)
#define CREDIT_ASK_SPINS 100000		/* idle polls without credit, then ask */

struct vs_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static struct {
	struct bq rx, tx, ev;
	struct result r;
	u64 cid, total, sent, port;
	u32 tx_cnt, peer_alloc, peer_fwd, nfree;
	bool connected, rst, shut, update, asked;
	u16 free[BQ_MAX / 2];		/* transmit slots: descriptors 2j, 2j+1 */
} vs;

static u64 vs_prep(void *unused)
{
	(void)unused;
	fill(VS_PAYLOAD, VS_CHUNK, 0x5653);
	for (u32 i = 0; i < vs.rx.size; i++) {
		bq_desc(&vs.rx, i, VS_RX_AT + i * VS_RX_BUF, VS_RX_BUF, VQ_DESC_WRITE, 0);
		bq_put(&vs.rx, i);
	}
	for (u32 i = 0; i < 2; i++) {
		bq_desc(&vs.ev, i, VS_EVENTS + 8 * i, 8, VQ_DESC_WRITE, 0);
		bq_put(&vs.ev, i);
	}
	for (u32 j = 0; j < vs.tx.size / 2; j++) {
		bq_desc(&vs.tx, 2 * j, VS_HDRS + 64 * j, VS_HDR, 0, 2 * j + 1);
		bq_desc(&vs.tx, 2 * j + 1, VS_PAYLOAD, 0, 0, 0);
		vs.free[vs.nfree++] = j;
	}
	bq_kick(&vs.rx);
	bq_kick(&vs.ev);
	return 0;
}

/* One packet into a free transmit slot (the caller checked there is one);
 * published by the next bq_kick. */
static void vs_send(u16 op, u32 flags, u32 len)
{
	u32 j = vs.free[--vs.nfree];
	volatile struct vs_hdr *h = (volatile struct vs_hdr *)(VS_HDRS + 64 * j);

	h->src_cid = vs.cid;
	h->dst_cid = HOST_CID;
	h->src_port = VS_LOCAL;
	h->dst_port = vs.port;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = VS_ALLOC;
	h->fwd_cnt = 0;
	vs.tx.desc[2 * j].flags = len ? VQ_DESC_NEXT : 0;
	vs.tx.desc[2 * j + 1].len = len;
	bq_put(&vs.tx, 2 * j);
	vs.tx_cnt += len;
}

/* Takes in what the device used: transmit slots back, received packets
 * read (credit, state) and their buffers back. True if anything moved. */
static bool vs_poll(void)
{
	u32 len, got = 0;
	int id;

	while ((id = bq_get(&vs.tx, &len)) >= 0) {
		vs.free[vs.nfree++] = (u32)id / 2 % (vs.tx.size / 2);
		got++;
	}
	while ((id = bq_get(&vs.rx, &len)) >= 0) {
		volatile struct vs_hdr *h =
			(volatile struct vs_hdr *)(VS_RX_AT + (u32)id % vs.rx.size * VS_RX_BUF);

		if (len >= VS_HDR && h->src_cid == HOST_CID && h->dst_port == VS_LOCAL &&
		    h->src_port == vs.port && h->type == TYPE_STREAM) {
			vs.peer_alloc = h->buf_alloc;
			vs.peer_fwd = h->fwd_cnt;
			vs.asked = false;
			switch (h->op) {
			case OP_RESPONSE:
				vs.connected = true;
				break;
			case OP_RST:
				vs.rst = true;
				break;
			case OP_SHUTDOWN:
				vs.shut = true;
				break;
			case OP_CREDIT_REQUEST:
				vs.update = true;
				break;
			}
		}
		bq_put(&vs.rx, (u32)id % vs.rx.size);
		got++;
	}
	if (got)
		bq_kick(&vs.rx);
	return got;
}

static bool vs_fail(const char *why)
{
	vs.r.err = why;
	vs.r.detail = vs.sent;
	return false;
}

/* Polls until cond() or the peer reset; false after STALL_MS. */
static bool vs_until(bool (*cond)(void))
{
	struct stall s;

	moved(&s);
	while (!cond() && !vs.rst)
		if (vs_poll())
			moved(&s);
		else if (stalled(&s))
			return false;
	return true;
}

static bool vs_is_connected(void) { return vs.connected; }
static bool vs_is_reset(void) { return vs.rst; }
static bool vs_tx_idle(void) { return vs.nfree == vs.tx.size / 2; }

/* Connect to the host's port, send `total` bytes within the peer's credit,
 * shut down, wait for the peer's reset (it comes once the host program has
 * taken the last bytes). ops = RW packets. */
static u64 vs_loop(void *unused)
{
	struct stall s;

	(void)unused;
	vs_send(OP_REQUEST, 0, 0);
	bq_kick(&vs.tx);
	if (!vs_until(vs_is_connected))
		return vs_fail("timeout");
	if (vs.rst)
		return vs_fail("refused");
	moved(&s);
	while (vs.sent < vs.total) {
		bool any = vs_poll();
		u32 credit, fresh = 0;

		if (vs.rst || vs.shut)
			return vs_fail(vs.rst ? "reset" : "shutdown");
		if (vs.update && vs.nfree) {
			vs_send(OP_CREDIT_UPDATE, 0, 0);
			vs.update = false;
			fresh++;
		}
		credit = vs.peer_alloc - (vs.tx_cnt - vs.peer_fwd);
		while (vs.sent < vs.total && vs.nfree && credit) {
			u64 n = vs.total - vs.sent;

			n = n < VS_CHUNK ? n : VS_CHUNK;
			n = n < credit ? n : credit;
			vs_send(OP_RW, 0, n);
			vs.sent += n;
			credit -= n;
			vs.r.ops++;
			fresh++;
		}
		if (!fresh && !credit && !vs.asked && vs.nfree && s.idle > CREDIT_ASK_SPINS) {
			vs_send(OP_CREDIT_REQUEST, 0, 0);
			vs.asked = true;
			fresh++;
		}
		if (fresh)
			bq_kick(&vs.tx);
		if (any || fresh)
			moved(&s);
		else if (stalled(&s))
			return vs_fail("timeout");
	}
	if (!vs_until(vs_tx_idle) || vs.rst)
		return vs_fail(vs.rst ? "reset" : "timeout");
	vs_send(OP_SHUTDOWN, 3, 0);
	bq_kick(&vs.tx);
	if (!vs_until(vs_is_reset))
		return vs_fail("no_reset");
	vs.r.bytes = vs.sent;
	return 0;
}

static void vsock_bench(const char *name, u64 total, u64 port)
{
	u64 features, base = open_dev(name, VIRTIO_ID_VSOCK, 0, &features);

	if (!base)
		return;
	vs = (typeof(vs)){ .total = total, .port = port };
	if (!bq_setup(&vs.rx, base, 0, QUEUE_MEM(0), VS_RX) ||
	    !bq_setup(&vs.tx, base, 1, QUEUE_MEM(1), BQ_MAX) ||
	    !bq_setup(&vs.ev, base, 2, QUEUE_MEM(2), 4)) {
		queue_error(name, base);
		return;
	}
	vs.cid = virtio_config64(base, 0);
	virtio_driver_ok(base);
	user_run(vs_prep, 0, (void *)USER_STACK);
	report(name, vs_loop, &vs.r, &vs.tx, &vs.rx);
	vwr(base, MMIO_STATUS, 0);
}

/* ---- switches ------------------------------------------------------------- */

void bench_run(void)
{
	u64 rd = 0, rq = 0, qd = 32, wr = 0, tx = 0, rx = 0, vb = 0, port = 1234;
	const char *r, *q, *w, *t, *x, *v;

	if (!cmdline_arg("probe.bench_", 0))	/* one scan on every other boot */
		return;
	r = arg("probe.bench_blk_read=", &rd);
	q = arg("probe.bench_blk_read_qd=", &rq);
	w = arg("probe.bench_blk_write=", &wr);
	t = arg("probe.bench_net_tx=", &tx);
	x = arg("probe.bench_net_rx=", &rx);
	v = arg("probe.bench_vsock=", &vb);
	if (!r && !q && !w && !t && !x && !v)
		return;
	arg("probe.bench_blk_qd=", &qd);
	want_event_idx = has_word("probe.bench_event_idx");
	arg("probe.bench_vsock_port=", &port);
	if (!e820_is_ram(BENCH_MEM, BENCH_SIZE)) {
		pr("PROBE bench error memory\n");
		return;
	}
	user_init();
	user_map((u64)_start, _end - _start);
	user_map(BENCH_MEM, BENCH_SIZE);
	if (r)
		blk_bench("blk_read", rd, 1, false);
	if (q)
		blk_bench("blk_read_qd", rq, qd < 1 ? 1 : qd > MAX_DEPTH ? MAX_DEPTH : qd, false);
	if (w)
		blk_bench("blk_write", wr, 1, true);
	if (t)
		net_bench("net_tx", tx, false);
	if (x)
		net_bench("net_rx", rx, true);
	if (v)
		vsock_bench("vsock", vb, port);
	user_fini();
}
