/*
 * probe.net_echo=N: the first virtio-net device (net0) sends N broadcast
 * frames of EtherType 0x88b5 carrying "KEEL-PROBE <i>" and waits for each
 * to come back as "KEEL-ECHO <i>" (the host side of the test echoes them).
 * Only VERSION_1 and MAC are negotiated: no offloads, so the 12-byte
 * virtio_net_hdr_v1 in front of each frame is all zeroes on transmit and
 * ignored on receive.
 */
#include "probe.h"

#define NET_F_MAC  (1UL << 5)
#define NET_HDR    12			/* virtio_net_hdr_v1 */
#define ETH_MIN    60			/* frame without FCS */
#define RX_BUFS    4
#define RX_BUF     2048			/* header included */
#define ECHO_MS    2000			/* wait for each echo */
#define RESEND_MS  250

static struct {
	u8 rxq[VQ_MEM_SIZE], txq[VQ_MEM_SIZE];
	u8 rx[RX_BUFS][RX_BUF];
	u8 tx[NET_HDR + ETH_MIN];
} dma __attribute__((section(".dma"), aligned(4096)));

static struct vq rxq, txq;

/* Decimal digits of v at p; returns their number. */
static u32 put_dec(u8 *p, u32 v)
{
	u8 t[10];
	u32 n = 0, k = 0;

	do
		t[n++] = '0' + v % 10;
	while (v /= 10);
	while (n)
		p[k++] = t[--n];
	return k;
}

/* Payload "<word> <i>", not followed by another digit. */
static bool is_echo(const u8 *f, u32 len, u32 i)
{
	u8 want[24] = "KEEL-ECHO ";
	u32 n = 10 + put_dec(want + 10, i);

	if (len < 14 + n || f[12] != 0x88 || f[13] != 0xb5)
		return false;
	for (u32 k = 0; k < n; k++)
		if (f[14 + k] != want[k])
			return false;
	return len == 14 + n || f[14 + n] < '0' || f[14 + n] > '9';
}

/* Sends frame i and waits for its echo, sending it again every RESEND_MS
 * (the host's end of the link may come up late); false after ECHO_MS. */
static bool echo(const u8 *mac, u32 i)
{
	u8 *f = dma.tx + NET_HDR;
	u64 until = deadline(ECHO_MS), resend = 0;
	bool sent = true, back = false;

	memset(dma.tx, 0, sizeof dma.tx);
	memset(f, 0xff, 6);
	memcpy(f + 6, mac, 6);
	f[12] = 0x88;
	f[13] = 0xb5;
	memcpy(f + 14, "KEEL-PROBE ", 11);
	put_dec(f + 25, i);
	vq_set(&txq, 0, dma.tx, sizeof dma.tx, 0);
	while (!back && !passed(until)) {
		int id;

		sent |= vq_used(&txq) >= 0;
		if (sent && passed(resend)) {
			vq_add(&txq, 0);
			vq_notify(&txq);
			sent = false;
			resend = deadline(RESEND_MS);
		}
		id = vq_used(&rxq);
		if (id < 0 || id >= RX_BUFS) {
			asm volatile("pause");
			continue;
		}
		back = rxq.used_len >= NET_HDR &&
		       is_echo(dma.rx[id] + NET_HDR, rxq.used_len - NET_HDR, i);
		vq_add(&rxq, id);	/* the buffer goes back, whatever it held */
		vq_notify(&rxq);
	}
	/* The frame buffer is rewritten next: its last send must be done. */
	while (!sent && !passed(until))
		sent = vq_used(&txq) >= 0;
	return back && sent;
}

void net_run(void)
{
	const char *v = cmdline_arg("probe.net_echo=", 0);
	struct virtio_dev *d = virtio_first(VIRTIO_ID_NET);
	u64 n, features;
	u8 mac[6] = { 0x02, 0, 0, 0, 0, 0x01 };	/* without NET_F_MAC */
	char s[18];

	if (!v)
		return;
	if (!parse_num(&v, &n, false) || n > 1000000)
		n = 0;
	if (!d) {
		pr("PROBE net0 none\n");
		return;
	}
	if (!virtio_negotiate(d->base, NET_F_MAC, &features)) {
		pr("PROBE net0 error features\n");
		virtio_failed(d->base);
		return;
	}
	if (!vq_setup(&rxq, d->base, 0, dma.rxq) || !vq_setup(&txq, d->base, 1, dma.txq)) {
		pr("PROBE net0 error queue\n");
		virtio_failed(d->base);
		return;
	}
	if (features & NET_F_MAC) {
		u32 lo = virtio_config32(d->base, 0), hi = virtio_config32(d->base, 4);

		memcpy(mac, &lo, 4);
		memcpy(mac + 4, &hi, 2);
	}
	for (u32 k = 0; k < 6; k++) {
		s[3 * k] = "0123456789abcdef"[mac[k] >> 4];
		s[3 * k + 1] = "0123456789abcdef"[mac[k] & 15];
		s[3 * k + 2] = k < 5 ? ':' : 0;
	}
	pr("PROBE net0 mac %s\n", s);
	/* Receive buffers before DRIVER_OK, the notification after it. */
	for (u32 k = 0; k < RX_BUFS; k++) {
		vq_set(&rxq, k, dma.rx[k], RX_BUF, VQ_DESC_WRITE);
		vq_add(&rxq, k);
	}
	virtio_driver_ok(d->base);
	vq_notify(&rxq);
	for (u32 i = 0; i < n; i++)
		if (!echo(mac, i)) {
			pr("PROBE net_echo timeout %u\n", i);
			return;
		}
	pr("PROBE net_echo ok %lu\n", n);
}
