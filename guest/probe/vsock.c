/*
 * probe.vsock_listen=PORT and probe.vsock_connect=PORT: one stream
 * connection at a time with the host (CID 2) over the first virtio-vsock
 * device (vsock0), virtio 1.2 section 5.10. Received payload goes into a
 * 64 KiB ring, the buffer space advertised as buf_alloc; fwd_cnt counts the
 * bytes taken out of it. Sending respects the peer's credit.
 */
#include "probe.h"

#define SHUT_BOTH    3			/* receive (1) and send (2) */

#define RX_BUFS      4
#define RX_BUF       4096		/* header included */
#define BUF_ALLOC    65536		/* the ring; a power of 2 */
#define MAX_RW       4096		/* payload per packet sent */
#define WAIT_MS      10000
#define LOCAL_PORT   1024		/* of probe.vsock_connect */

struct vs_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static struct {
	u8 q[3][VQ_MEM_SIZE];		/* rx, tx, event */
	u8 rx[RX_BUFS][RX_BUF];
	u32 ev[2];
	struct vs_hdr tx;
	u8 ring[BUF_ALLOC];
} dma __attribute__((section(".dma"), aligned(4096)));

static struct vq rxq, txq, evq;
static u64 cid;

/* The connection: ports, counters (wrapping u32, as on the wire), state. */
static struct {
	u32 lport, pport;		/* pport 0: listening */
	u32 rx_cnt, fwd_cnt;		/* into the ring, taken out of it */
	u32 tx_cnt, peer_alloc, peer_fwd;
	u32 shut;			/* the peer's SHUTDOWN flags */
	bool connected, rst;
} c;

/* One packet to the host; waits for its completion. */
static bool xmit(u32 sport, u32 dport, u16 op, u32 flags, const void *p, u32 len)
{
	dma.tx = (struct vs_hdr){
		.src_cid = cid, .dst_cid = HOST_CID, .src_port = sport, .dst_port = dport,
		.len = len, .type = TYPE_STREAM, .op = op, .flags = flags,
		.buf_alloc = BUF_ALLOC, .fwd_cnt = c.fwd_cnt,
	};
	vq_set(&txq, 0, &dma.tx, sizeof dma.tx, len ? VQ_DESC_NEXT : 0);
	vq_set(&txq, 1, p, len, 0);
	vq_add(&txq, 0);
	vq_notify(&txq);
	return vq_wait(&txq, deadline(1000)) >= 0;
}

static bool send(u16 op, u32 flags, const void *p, u32 len)
{
	c.tx_cnt += len;
	return xmit(c.lport, c.pport, op, flags, p, len);
}

static u32 credit(void)
{
	return c.peer_alloc - (c.tx_cnt - c.peer_fwd);
}

/* Waits for one packet and acts on it; false if none came before `until`. */
static bool pump(u64 until)
{
	int id = vq_wait(&rxq, until);
	struct vs_hdr h;
	u32 len;
	const u8 *p;

	if (id < 0)
		return false;
	if (id >= RX_BUFS)
		return true;		/* not ours to re-post */
	memcpy(&h, dma.rx[id], sizeof h);
	len = rxq.used_len < sizeof h ? 0 : rxq.used_len - sizeof h;
	len = h.len < len ? h.len : len;
	p = dma.rx[id] + sizeof h;
	if (rxq.used_len < sizeof h || h.src_cid != HOST_CID || h.type != TYPE_STREAM ||
	    h.dst_port != c.lport || (c.pport && h.src_port != c.pport) ||
	    (!c.connected && h.op != (c.pport ? OP_RESPONSE : OP_REQUEST) && h.op != OP_RST)) {
		/* Not for this connection: refused, unless it is a reset. */
		if (rxq.used_len >= sizeof h && h.op != OP_RST)
			xmit(h.dst_port, h.src_port, OP_RST, 0, 0, 0);
		vq_add(&rxq, id);
		vq_notify(&rxq);
		return true;
	}
	c.peer_alloc = h.buf_alloc;
	c.peer_fwd = h.fwd_cnt;
	if (h.op == OP_RW) {		/* beyond our credit: dropped */
		u32 room = BUF_ALLOC - (c.rx_cnt - c.fwd_cnt), at, first;

		len = len < room ? len : room;
		at = c.rx_cnt & (BUF_ALLOC - 1);
		first = BUF_ALLOC - at < len ? BUF_ALLOC - at : len;
		memcpy(dma.ring + at, p, first);
		memcpy(dma.ring, p + first, len - first);
		c.rx_cnt += len;
	}
	vq_add(&rxq, id);
	vq_notify(&rxq);
	switch (h.op) {
	case OP_REQUEST:
		c.pport = h.src_port;
		c.connected = true;
		send(OP_RESPONSE, 0, 0, 0);
		break;
	case OP_RESPONSE:
		c.connected = true;
		break;
	case OP_CREDIT_REQUEST:
		send(OP_CREDIT_UPDATE, 0, 0, 0);
		break;
	case OP_SHUTDOWN:
		c.shut |= h.flags ? h.flags : SHUT_BOTH;
		break;
	case OP_RST:
		c.rst = true;
		break;
	}
	return true;
}

/* Waits until the peer's credit covers `len` bytes, asking for an update
 * once; false on reset or time-out. */
static bool wait_credit(u32 len, u64 until)
{
	bool asked = false;

	while (credit() < len) {
		if (c.rst || (c.shut & 1))
			return false;
		if (!asked)
			asked = send(OP_CREDIT_REQUEST, 0, 0, 0);
		if (!pump(until))
			return false;
	}
	return true;
}

static void open_conn(u32 lport, u32 pport)
{
	c = (typeof(c)){ .lport = lport, .pport = pport };
}

static void listen(u32 port)
{
	u64 until = deadline(WAIT_MS);
	u32 echoed = 0;

	open_conn(port, 0);
	while (!c.connected && pump(until))
		;
	if (!c.connected) {
		pr("PROBE vsock_listen timeout\n");
		return;
	}
	until = deadline(WAIT_MS);
	while (!c.rst) {
		u32 pending = c.rx_cnt - c.fwd_cnt;
		u32 at = c.fwd_cnt & (BUF_ALLOC - 1), n = pending;

		if (pending && (c.shut & 1)) {	/* the peer takes no more */
			c.fwd_cnt += pending;
			continue;
		}
		if (!pending && c.shut)
			break;
		if (pending) {
			n = n < MAX_RW ? n : MAX_RW;
			n = n < BUF_ALLOC - at ? n : BUF_ALLOC - at;
			if (!wait_credit(1, until) && !c.rst && !(c.shut & 1))
				break;	/* timed out */
			if (c.rst || (c.shut & 1))
				continue;
			n = n < credit() ? n : credit();
			c.fwd_cnt += n;	/* taken out: the echo is read from the ring */
			if (!send(OP_RW, 0, dma.ring + at, n))
				break;
			echoed += n;
			until = deadline(WAIT_MS);
		} else if (pump(until)) {
			until = deadline(WAIT_MS);
		} else {
			break;
		}
	}
	if (!c.rst)
		send(OP_RST, 0, 0, 0);
	if (c.rst || c.shut)
		pr("PROBE vsock_listen echoed %u\n", echoed);
	else
		pr("PROBE vsock_listen timeout\n");
}

static void connect(u32 port)
{
	static const char msg[] = "KEEL-PROBE-VSOCK\n";
	u64 until = deadline(WAIT_MS);
	char reply[128];
	u32 n = 0, scan = 0;
	bool nl = false;

	open_conn(LOCAL_PORT, port);
	send(OP_REQUEST, 0, 0, 0);
	while (!c.connected && !c.rst && pump(until))
		;
	if (c.rst || !c.connected) {
		pr("PROBE vsock_connect %s\n", c.rst ? "refused" : "timeout");
		return;
	}
	if (!wait_credit(sizeof msg - 1, until) || !send(OP_RW, 0, msg, sizeof msg - 1)) {
		pr("PROBE vsock_connect error send\n");
		send(OP_RST, 0, 0, 0);
		return;
	}
	until = deadline(WAIT_MS);
	while (!nl) {
		for (; scan != c.rx_cnt - c.fwd_cnt && !nl; scan++) {
			u8 b = dma.ring[(c.fwd_cnt + scan) & (BUF_ALLOC - 1)];

			nl = b == '\n';
			if (!nl && n < sizeof reply - 1)
				reply[n++] = b >= 0x20 && b < 0x7f ? b : '?';
		}
		if (!nl && (c.rst || c.shut || !pump(until)))
			break;
	}
	reply[n] = 0;
	c.fwd_cnt += scan;
	if (nl)
		pr("PROBE vsock_connect ok %s\n", reply);
	else
		pr("PROBE vsock_connect %s\n", c.rst || c.shut ? "closed" : "timeout");
	if (c.rst)
		return;
	if (c.shut) {		/* the peer's shutdown came first: answer it */
		send(OP_RST, 0, 0, 0);
		return;
	}
	/* Done: the peer answers a full shutdown with a reset. */
	send(OP_SHUTDOWN, SHUT_BOTH, 0, 0);
	until = deadline(1000);
	while (!c.rst && pump(until))
		;
	if (!c.rst)
		send(OP_RST, 0, 0, 0);
}

void vsock_run(void)
{
	const char *l = cmdline_arg("probe.vsock_listen=", 0);
	const char *k = cmdline_arg("probe.vsock_connect=", 0);
	struct virtio_dev *d = virtio_first(VIRTIO_ID_VSOCK);
	u64 lport = 0, cport = 0, features;

	if (!l && !k)
		return;
	if (!d) {
		pr("PROBE vsock0 none\n");
		return;
	}
	if (!virtio_negotiate(d->base, 0, &features)) {
		pr("PROBE vsock0 error features\n");
		virtio_failed(d->base);
		return;
	}
	if (!vq_setup(&rxq, d->base, 0, dma.q[0]) || !vq_setup(&txq, d->base, 1, dma.q[1]) ||
	    !vq_setup(&evq, d->base, 2, dma.q[2])) {
		pr("PROBE vsock0 error queue\n");
		virtio_failed(d->base);
		return;
	}
	cid = virtio_config64(d->base, 0);
	pr("PROBE vsock0 cid %lu\n", cid);
	for (u32 i = 0; i < RX_BUFS; i++) {
		vq_set(&rxq, i, dma.rx[i], RX_BUF, VQ_DESC_WRITE);
		vq_add(&rxq, i);
	}
	for (u32 i = 0; i < 2; i++) {	/* events are not looked at */
		vq_set(&evq, i, &dma.ev[i], sizeof dma.ev[i], VQ_DESC_WRITE);
		vq_add(&evq, i);
	}
	virtio_driver_ok(d->base);
	vq_notify(&rxq);
	vq_notify(&evq);
	if (l && parse_num(&l, &lport, false) && lport <= 0xffffffff)
		listen(lport);
	else if (l)
		pr("PROBE vsock_listen error port\n");
	if (k && parse_num(&k, &cport, false) && cport <= 0xffffffff)
		connect(cport);
	else if (k)
		pr("PROBE vsock_connect error port\n");
}
