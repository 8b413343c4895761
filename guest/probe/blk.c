/*
 * The first virtio block device (blk0): set-up, capacity and serial, and
 * the exercises of probe.blk_readonly_check and probe.blk_records=N (record
 * format in README.md). One request in flight at a time, completion by
 * polling (see vq_run).
 */
#include "probe.h"

#define BLK_F_FLUSH        (1UL << 9)
#define BLK_F_DISCARD      (1UL << 13)
#define BLK_F_WRITE_ZEROES (1UL << 14)

#define T_IN           0
#define T_OUT          1
#define T_FLUSH        4
#define T_GET_ID       8
#define T_DISCARD      11
#define T_WRITE_ZEROES 13

#define SECTOR         512
#define READ_SECTORS   64		/* per IN request of the read-back */

/* A record is one sector of 64 little-endian words: "KEELREC1", the index,
 * 61 payload words, the FNV-1a hash of the 504 bytes before it. */
#define REC_WORDS      64
#define REC_MAGIC      0x314345524c45454bUL	/* "KEELREC1" */
#define FNV_BASIS      0xcbf29ce484222325UL
#define FNV_PRIME      0x100000001b3UL

struct blk_hdr { u32 type, reserved; u64 sector; };
struct blk_seg { u64 sector; u32 num, flags; };

/* Memory the device reads and writes: not in the image file (see probe.ld's
 * .dma), so everything is written before use. */
static struct {
	u8 queue[VQ_MEM_SIZE];
	struct blk_hdr hdr;
	struct blk_seg seg;
	u8 id[20];
	u8 status;
	u64 rec[REC_WORDS] __attribute__((aligned(16)));
	u64 buf[READ_SECTORS * REC_WORDS];
} dma __attribute__((section(".dma"), aligned(4096)));

static struct vq q;
static u64 features;

/* One request: header, data (if len), status. Returns the status byte, or
 * -1 after a timeout (reported here). */
static int request(u32 type, u64 sector, void *data, u32 len, bool device_writes)
{
	u32 n = 1;

	dma.hdr = (struct blk_hdr){ type, 0, sector };
	dma.status = 0xff;
	vq_set(&q, 0, &dma.hdr, sizeof dma.hdr, VQ_DESC_NEXT);
	if (len)
		vq_set(&q, n++, data, len, VQ_DESC_NEXT | (device_writes ? VQ_DESC_WRITE : 0));
	vq_set(&q, n, &dma.status, 1, VQ_DESC_WRITE);
	if (!vq_run(&q)) {
		pr("PROBE blk0 error timeout\n");
		return -1;
	}
	return *(volatile u8 *)&dma.status;
}

static bool status_ok(int s, u32 type, u64 sector)
{
	if (s > 0)
		pr("PROBE blk0 error status %u type %u sector %lu\n", s, type, sector);
	return s == 0;
}

static bool req_ok(u32 type, u64 sector, void *data, u32 len, bool device_writes)
{
	return status_ok(request(type, sector, data, len, device_writes), type, sector);
}

/* ---- records ------------------------------------------------------------ */

/* FNV-1a over whole words: three instructions a byte (the xor only
 * touches the hash's low byte; the compiler's version takes 4.5). */
static u64 fnv1a(const u64 *w, u32 words)
{
	u64 h = FNV_BASIS;

	for (u32 i = 0; i < words; i++) {
		u64 x = w[i];

		asm(".rept 8\n\t"
		    "xorb %b[x], %b[h]\n\t"
		    "imulq %[p], %[h]\n\t"
		    "shrq $8, %[x]\n\t"
		    ".endr"
		    : [h] "+r"(h), [x] "+r"(x) : [p] "r"(FNV_PRIME) : "cc");
	}
	return h;
}

/* Payload byte j of record i is (i*31 + j*7) & 0xff: eight bytes per word,
 * lane k of word w holding i*31 + 56*w + 7*k. Lanes are added without
 * carries between them (the added bytes are below 0x80). */
#define LOW7  0x7f7f7f7f7f7f7f7fUL
#define HIGH1 0x8080808080808080UL
#define LANES 0x312a231c150e0700UL	/* 7*k in byte k */
#define STEP  0x3838383838383838UL	/* 56 in every byte */

static u64 add_bytes(u64 a, u64 b)
{
	return ((a & LOW7) + b) ^ (a & HIGH1);
}

static u64 payload_start(u32 i)
{
	return add_bytes((u8)(i * 31) * 0x0101010101010101UL, LANES);
}

static void make_record(u64 *w, u32 i)
{
	u64 x = payload_start(i);

	w[0] = REC_MAGIC;
	w[1] = i;
	for (u32 k = 2; k < REC_WORDS - 1; k++, x = add_bytes(x, STEP))
		w[k] = x;
	w[REC_WORDS - 1] = fnv1a(w, REC_WORDS - 1);
}

static bool record_ok(const u64 *w, u32 i)
{
	u64 x = payload_start(i);

	if (w[0] != REC_MAGIC || w[1] != i)
		return false;
	for (u32 k = 2; k < REC_WORDS - 1; k++, x = add_bytes(x, STEP))
		if (w[k] != x)
			return false;
	return w[REC_WORDS - 1] == fnv1a(w, REC_WORDS - 1);
}

static bool sector_zero(const u64 *w)
{
	u64 any = 0;

	for (u32 k = 0; k < REC_WORDS; k++)
		any |= w[k];
	return !any;
}

/* DISCARD or WRITE_ZEROES of [sector, sector + count) as one segment, then
 * read the first sector back. */
static bool zero_test(u32 type, u64 sector, u32 count, const char *name)
{
	dma.seg = (struct blk_seg){ sector, count, 0 };
	if (!status_ok(request(type, 0, &dma.seg, sizeof dma.seg, false), type, sector) ||
	    !req_ok(T_IN, sector, dma.rec, SECTOR, true))
		return false;
	pr("PROBE %s %s\n", name, sector_zero(dma.rec) ? "ok" : "bad");
	return true;
}

static bool records(u32 n, bool discard, u32 spread, u32 batch)
{
	u32 i, bad = n;

	for (i = 0; i < n; i++) {
		make_record(dma.rec, i);
		if (!req_ok(T_OUT, (u64)i * spread, dma.rec, SECTOR, false))
			return false;
		if ((i + 1) % batch && i + 1 < n)
			continue;
		if ((features & BLK_F_FLUSH) && !req_ok(T_FLUSH, 0, 0, 0, false))
			return false;
		for (u32 k = i - i % batch; k <= i; k++)
			pr("PROBE acked %u\n", k);
	}
	for (i = 0; i < n && bad == n && spread > 1; i++) {
		if (!req_ok(T_IN, (u64)i * spread, dma.buf, SECTOR, true))
			return false;
		if (!record_ok(dma.buf, i))
			bad = i;
	}
	for (i = 0; i < n && bad == n && spread == 1; i += READ_SECTORS) {
		u32 count = n - i < READ_SECTORS ? n - i : READ_SECTORS;

		if (!req_ok(T_IN, i, dma.buf, count * SECTOR, true))
			return false;
		for (u32 k = 0; k < count; k++)
			if (!record_ok(dma.buf + k * REC_WORDS, i + k)) {
				bad = i + k;
				break;
			}
	}
	if (bad == n)
		pr("PROBE blk_verify ok %u\n", n);
	else
		pr("PROBE blk_verify bad %u\n", bad);

	if (discard && (features & BLK_F_DISCARD) &&
	    !zero_test(T_DISCARD, 0, n < 8 ? n : 8, "blk_discard"))
		return false;
	if (discard && (features & BLK_F_WRITE_ZEROES) &&
	    !zero_test(T_WRITE_ZEROES, 8, 1, "blk_write_zeroes"))
		return false;
	return true;
}

/* ---- blk0 --------------------------------------------------------------- */

/* GET_ID; false only after a timeout. */
static bool print_serial(void)
{
	char s[21];
	u32 k;
	int st;

	memset(dma.id, 0, sizeof dma.id);
	st = request(T_GET_ID, 0, dma.id, sizeof dma.id, true);
	if (st) {
		status_ok(st, T_GET_ID, 0);
		return st > 0;
	}
	for (k = 0; k < sizeof dma.id && dma.id[k]; k++)
		s[k] = dma.id[k] >= 0x20 && dma.id[k] < 0x7f ? dma.id[k] : '?';
	s[k] = 0;
	pr("PROBE blk0 serial%s%s\n", k ? " " : "", s);
	return true;
}

void blk_run(void)
{
	const char *v = cmdline_arg("probe.blk_records=", 0);
	bool ro_check = has_word("probe.blk_readonly_check");
	struct virtio_dev *d = virtio_first(VIRTIO_ID_BLOCK);
	u64 n = 0, base;
	bool ok = true;

	if (v && (!parse_num(&v, &n, false) || n > 0xffffffff))
		n = 0;
	if (!d) {
		if (n || ro_check)
			pr("PROBE blk0 none\n");
		return;
	}
	base = d->base;
	if (!virtio_negotiate(base, BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WRITE_ZEROES,
			      &features)) {
		pr("PROBE blk0 error features\n");
		virtio_failed(base);
		return;
	}
	if (!vq_setup(&q, base, 0, dma.queue)) {
		pr("PROBE blk0 error queue\n");
		virtio_failed(base);
		return;
	}
	virtio_driver_ok(base);
	pr("PROBE blk0 capacity %lu features %lx\n", virtio_config64(base, 0), features);
	if (!print_serial())
		return;

	if (ro_check) {
		int s;

		make_record(dma.rec, 0);
		s = request(T_OUT, 0, dma.rec, SECTOR, false);
		if (s < 0)
			return;
		pr("PROBE blk_write_status %u\n", s);
	}
	if (n) {
		u64 spread = 1, batch = 1;
		const char *sv = cmdline_arg("probe.blk_spread=", 0);
		const char *bv = cmdline_arg("probe.blk_batch=", 0);

		if (sv && (!parse_num(&sv, &spread, false) || spread < 1 || spread > 4096))
			spread = 1;
		if (bv && (!parse_num(&bv, &batch, false) || batch < 1 || batch > 4096))
			batch = 1;
		ok = records(n, !has_word("probe.blk_nodiscard"), spread, batch);
	}
	if (ok)
		pr("PROBE blk_done\n");
}
