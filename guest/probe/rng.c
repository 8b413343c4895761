/*
 * probe.rng: the first virtio-rng device (rng0) fills a 64-byte buffer
 * twice; the report counts the bytes and the distinct byte values.
 */
#include "probe.h"

#define RNG_REQUEST 64

static struct {
	u8 queue[VQ_MEM_SIZE];
	u8 buf[2 * RNG_REQUEST];
} dma __attribute__((section(".dma"), aligned(4096)));

void rng_run(void)
{
	struct virtio_dev *d = virtio_first(VIRTIO_ID_RNG);
	u64 seen[4] = { 0 }, features;
	u32 bytes = 0, distinct = 0;
	struct vq q;

	if (!has_word("probe.rng"))
		return;
	if (!d) {
		pr("PROBE rng error none\n");
		return;
	}
	if (!virtio_negotiate(d->base, 0, &features)) {
		pr("PROBE rng error features\n");
		virtio_failed(d->base);
		return;
	}
	if (!vq_setup(&q, d->base, 0, dma.queue)) {
		pr("PROBE rng error queue\n");
		virtio_failed(d->base);
		return;
	}
	virtio_driver_ok(d->base);
	for (u32 r = 0; r < 2; r++) {
		u8 *b = dma.buf + bytes;

		vq_set(&q, 0, b, RNG_REQUEST, VQ_DESC_WRITE);
		if (!vq_run(&q)) {
			pr("PROBE rng error timeout\n");
			return;
		}
		if (q.used_len > RNG_REQUEST) {
			pr("PROBE rng error used_len %u\n", q.used_len);
			return;
		}
		for (u32 i = 0; i < q.used_len; i++) {
			u64 bit = 1UL << (b[i] & 63);

			distinct += !(seen[b[i] >> 6] & bit);
			seen[b[i] >> 6] |= bit;
		}
		bytes += q.used_len;
	}
	if (bytes)
		pr("PROBE rng ok %u %u\n", bytes, distinct);
	else
		pr("PROBE rng error empty\n");
}
