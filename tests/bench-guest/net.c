/*
 * bench.net=tx64,tx1500,rx64,rx1500: the virtio-net data path (virtio 1.2 section 5.1), measured
 * from ring 3 by the same polling driver as the disk. Included by bench.c (it shares its statics).
 *
 * The device is the first modern virtio-net found (PCI or virtio_mmio.device=); the driver accepts
 * VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC only, so every frame is one buffer led by the 12-byte
 * struct virtio_net_hdr_v1 (5.1.6) with no offloads. Frames are UDP over IPv4 on the bench's
 * addresses: the guest is 10.0.9.2 (port 5009), the host's tap 10.0.9.1 (port 5009), broadcast
 * Ethernet destination. The size in a test's name is the Ethernet frame's length without the FCS.
 *   txN: the whole transmit queue is kept full of N-byte frames to 10.0.9.1:5009, each
 *        completion re-posted; `fps` counts the frames the device finished.
 *   rxN: the whole receive queue is posted with 1,526-byte buffers (5.1.6.3.1, no mergeable
 *        buffers); after `bench: start net rxN` the host sends N-byte frames to
 *        10.0.9.255:5009 until the result line, and `fps` counts those received in the test's
 *        time from the first one on (a pause in delivery counts against it); frames of another
 *        size or kind (the host's own IPv6 neighbour discovery) are `other`.
 * Lines:
 *   bench: net device transport=pci|mmio queue_size=Q mac=MAC
 *   bench: start net tx64
 *   bench: net tx64 fps=F frames=N bytes=64
 *   bench: net rx64 fps=F frames=N bytes=64 other=K
 */

#define VIRTIO_NET_F_MAC 5
#define NET_HDR_LEN 12
#define NET_BUF 1536
#define NET_MAX_FRAME (NET_BUF - NET_HDR_LEN)
#define NET_PORT 5009

struct vq {
	struct desc *descs;
	struct avail *avail;
	struct used *used;
	u64 notify;
	u16 index;
	u16 size;
	u16 avail_idx;
	u16 used_seen;
};

static struct desc rx_descs[QSIZE_MAX] __attribute__((aligned(4096)));
static struct avail rx_avail __attribute__((aligned(4096)));
static struct used rx_used __attribute__((aligned(4096)));
static struct desc tx_descs[QSIZE_MAX] __attribute__((aligned(4096)));
static struct avail tx_avail __attribute__((aligned(4096)));
static struct used tx_used __attribute__((aligned(4096)));
static u8 rx_bufs[QSIZE_MAX][NET_BUF] __attribute__((aligned(64)));
static u8 tx_bufs[QSIZE_MAX][NET_BUF] __attribute__((aligned(64)));

static struct device net;
static struct vq rxq = {rx_descs, &rx_avail, &rx_used, 0, 0, 0, 0, 0};
static struct vq txq = {tx_descs, &tx_avail, &tx_used, 0, 1, 0, 0, 0};
static u8 guest_mac[6] = {0x52, 0x54, 0x00, 0x00, 0x09, 0x02};

static void vq_post(struct vq *q, u16 id)
{
	q->avail->ring[q->avail_idx % q->size] = id;
	barrier();
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
}

/* The next used element, or 0 when the device has not finished another buffer. */
static int vq_next_used(struct vq *q, struct used_elem *e)
{
	u16 idx = *(volatile u16 *)&q->used->idx;
	if (idx == q->used_seen)
		return 0;
	barrier();
	if ((u16)(idx - q->used_seen) > q->size)
		fail("used idx ran ahead of the buffers posted", idx);
	*e = *(volatile struct used_elem *)&q->used->ring[q->used_seen % q->size];
	q->used_seen++;
	if (e->id >= q->size)
		fail("used element names no buffer", e->id);
	return 1;
}

static void put_mac(const u8 *mac)
{
	static const char hex[] = "0123456789abcdef";
	for (int i = 0; i < 6; i++) {
		char b[4] = {hex[mac[i] >> 4], hex[mac[i] & 15], i < 5 ? ':' : 0, 0};
		put(b);
	}
}

static u16 ip_checksum(const u8 *h, u32 len)
{
	u32 sum = 0;
	for (u32 i = 0; i < len; i += 2)
		sum += (u32)h[i] << 8 | h[i + 1];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static void be16(u8 *p, u16 v)
{
	p[0] = (u8)(v >> 8);
	p[1] = (u8)v;
}

/* Writes the header and an N-byte UDP frame from the guest to the host into `buf`. */
static void build_frame(u8 *buf, u32 frame_len, u64 seq)
{
	memset(buf, 0, NET_HDR_LEN + frame_len);
	u8 *f = buf + NET_HDR_LEN;
	memset(f, 0xff, 6);
	memcpy(f + 6, guest_mac, 6);
	be16(f + 12, 0x0800);
	u8 *ip = f + 14;
	ip[0] = 0x45;
	be16(ip + 2, (u16)(frame_len - 14));
	be16(ip + 4, (u16)seq);
	be16(ip + 6, 0x4000); /* don't fragment */
	ip[8] = 64;
	ip[9] = 17;
	ip[12] = 10, ip[13] = 0, ip[14] = 9, ip[15] = 2;
	ip[16] = 10, ip[17] = 0, ip[18] = 9, ip[19] = 1;
	be16(ip + 10, ip_checksum(ip, 20));
	u8 *udp = ip + 20;
	be16(udp, NET_PORT);
	be16(udp + 2, NET_PORT);
	be16(udp + 4, (u16)(frame_len - 34));
	/* UDP checksum 0: none (RFC 768). The payload: "vmmbench" and the sequence number. */
	if (frame_len >= 42 + 16) {
		memcpy(udp + 8, "vmmbench", 8);
		memcpy(udp + 16, &seq, 8);
	}
}

/* Is `f` (`len` bytes) one of the host's frames of the test: N bytes of UDP to port 5009? */
static int host_frame(const u8 *f, u32 len, u32 frame_len)
{
	return len == frame_len && f[12] == 0x08 && f[13] == 0x00 && f[14 + 9] == 17 &&
	       f[14 + 22] == (NET_PORT >> 8) && f[14 + 23] == (NET_PORT & 0xff);
}

static void net_start_line(const char *name)
{
	line_len = 0;
	put("bench: start net ");
	put(name);
	flush_line();
}

/* Starts a test's result line; the caller may add fields, then flushes it. */
static void net_result(const char *name, u64 frames, u64 ticks, u32 frame_len)
{
	line_len = 0;
	put("bench: net ");
	put(name);
	put(" fps=");
	put_u64(frames * 1000000000ul / (ticks_to_ns(ticks) | 1));
	put(" frames=");
	put_u64(frames);
	put(" bytes=");
	put_u64(frame_len);
}

static void net_tx(u32 frame_len, const char *name)
{
	u64 frames = 0, seq = 0;
	for (u16 i = 0; i < txq.size; i++) {
		build_frame(tx_bufs[i], frame_len, seq++);
		tx_descs[i] = (struct desc){(u64)tx_bufs[i], NET_HDR_LEN + frame_len, 0, 0};
	}
	net_start_line(name);
	u64 start = rdtsc(), end = start + test_ticks, last = start, waited = start;
	u32 outstanding = 0;
	for (u16 i = 0; i < txq.size; i++, outstanding++)
		vq_post(&txq, i);
	kick(&net, txq.notify, txq.index, txq.used);
	while (outstanding) {
		struct used_elem e;
		if (!vq_next_used(&txq, &e)) {
			if (rdtsc() - waited > timeout_ticks)
				fail("transmit queue stalled; frames in flight", outstanding);
			__asm__ __volatile__("pause");
			continue;
		}
		waited = last = rdtsc();
		outstanding--;
		frames++;
		if (last < end) {
			memcpy(tx_bufs[e.id] + NET_HDR_LEN + 42 + 8, &seq, 8);
			seq++;
			vq_post(&txq, (u16)e.id);
			outstanding++;
			if (*(volatile u16 *)&txq.used->idx == txq.used_seen)
				kick(&net, txq.notify, txq.index, txq.used);
		}
	}
	net_result(name, frames, last - start, frame_len);
	flush_line();
}

static void net_rx(u32 frame_len, const char *name)
{
	u64 frames = 0, other = 0;
	net_start_line(name);
	u64 start = 0, end = 0, last = rdtsc(), waited = last;
	for (;;) {
		struct used_elem e;
		if (!vq_next_used(&rxq, &e)) {
			if (rdtsc() - waited > timeout_ticks)
				fail(start ? "receive stalled; frames so far" : "no frame from the host; other",
				     start ? frames : other);
			if (start && (last = rdtsc()) >= end)
				break;
			__asm__ __volatile__("pause");
			continue;
		}
		waited = last = rdtsc();
		if (e.len < NET_HDR_LEN || e.len > NET_BUF)
			fail("receive used length outside the buffer", e.len);
		if (host_frame(rx_bufs[e.id] + NET_HDR_LEN, e.len - NET_HDR_LEN, frame_len)) {
			if (!start) {
				/* The clock starts at the first frame: the host's sender starts on our line. */
				start = last;
				end = start + test_ticks;
			} else {
				frames++;
			}
		} else {
			other++;
		}
		vq_post(&rxq, (u16)e.id);
		if (*(volatile u16 *)&rxq.used->idx == rxq.used_seen)
			kick(&net, rxq.notify, rxq.index, rxq.used);
		if (start && last >= end)
			break;
	}
	net_result(name, frames, last - start, frame_len);
	put(" other=");
	put_u64(other);
	flush_line();
}

static void net_init(void)
{
	if (!find_mmio(&net, 1) && !find_pci(&net, 1))
		fail("no modern virtio-net device (PCI or virtio_mmio.device=)", 0);
	u64 features = negotiate(&net, 1ul << VIRTIO_NET_F_MAC);
	rxq.size = setup_ring(&net, 0, rx_descs, &rx_avail, &rx_used, &rxq.notify);
	txq.size = setup_ring(&net, 1, tx_descs, &tx_avail, &tx_used, &txq.notify);
	if (features & (1ul << VIRTIO_NET_F_MAC))
		for (int i = 0; i < 6; i++)
			guest_mac[i] = rd8(net.devcfg + (u64)i);
	driver_ok(&net);
	/* Every receive buffer posted at once; the device holds them until frames come. */
	for (u16 i = 0; i < rxq.size; i++) {
		rx_descs[i] = (struct desc){(u64)rx_bufs[i], NET_BUF, VRING_DESC_F_WRITE, 0};
		vq_post(&rxq, i);
	}
	kick(&net, rxq.notify, rxq.index, rxq.used);
	line_len = 0;
	put("bench: net device transport=");
	put(net.transport == PCI ? "pci" : "mmio");
	put(" queue_size=");
	put_u64(txq.size);
	put(" mac=");
	put_mac(guest_mac);
	flush_line();
}

/* The `bench.net` tests, in the order given: txN or rxN, 60 <= N <= 1514. */
static void run_net(const char *tests)
{
	net_init();
	const char *p = tests;
	while (*p && *p != ' ') {
		char name[16];
		u32 n = 0;
		while (p[n] && p[n] != ',' && p[n] != ' ' && n < sizeof(name) - 1) {
			name[n] = p[n];
			n++;
		}
		name[n] = 0;
		const char *rest;
		u64 frame_len = parse_u64(name + 2, &rest);
		int tx = starts_with(name, "tx"), rx = starts_with(name, "rx");
		if ((!tx && !rx) || *rest || frame_len < 60 || frame_len > 1514)
			fail("bench.net: not txN or rxN with 60 <= N <= 1514; at", (u64)(p - tests));
		if (tx)
			net_tx((u32)frame_len, name);
		else
			net_rx((u32)frame_len, name);
		p += n;
		if (*p == ',')
			p++;
	}
}
