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
 *   rxN: the whole receive queue is posted with 1,536-byte buffers (5.1.6.3.1); after
 *        `bench: start net rxN` the host sends N-byte frames to 10.0.9.255:5009 until the
 *        result line, and `fps` counts those received in the test's time from the first one on
 *        (a pause in delivery counts against it); frames of another size or kind (the host's
 *        own IPv6 neighbour discovery) are `other`. N up to 1,514 fits one buffer; a larger N
 *        (up to 65,535, the largest frame a tap passes, as a Linux guest receives TCP with
 *        GSO) needs mergeable buffers: the driver then also accepts VIRTIO_NET_F_MRG_RXBUF
 *        (5.1.6.3.2) and takes each frame from `num_buffers` used buffers; a device that does
 *        not offer it gets `bench: net rxN skipped=no-mergeable-buffers` instead.
 *   holdN: a driver that withholds receive buffers (a device holds or drops frames then,
 *        5.1.6.3): after `bench: start net holdN` it takes every buffer the device fills
 *        without re-posting it until none is left posted (`bench: net holdN starved taken=T`),
 *        waits the test's time with none posted while the host keeps sending, then
 *        (`bench: net holdN refill`) posts them all again and counts frames as rxN does.
 * `bench.netq=N` (1 to 4) uses N queue pairs (VIRTIO_NET_F_MQ, 5.1.6.5.5): the driver also
 * accepts VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_MQ, sets up every pair the device has (at most 4)
 * and the control queue, and sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET N (after three commands the
 * device must refuse, counted as ctrl_refused: 0 pairs, one more than it has, a class it did not
 * offer); txN then keeps N transmit
 * queues full and rxN polls N receive queues, and the result line counts each queue's frames
 * (the host spreads its frames over the queues by flow: it sends from several ports).
 * Lines:
 *   bench: net device transport=pci|mmio queue_size=Q mac=MAC pairs=N [ctrl_refused=3]
 *   bench: start net tx64
 *   bench: net tx64 fps=F frames=N bytes=64 q0=N0 [q1=N1 ...]
 *   bench: net rx64 fps=F frames=N bytes=64 q0=N0 [q1=N1 ...] other=K
 *   bench: net hold64 starved taken=T / bench: net hold64 refill / then as rx64's
 */

#define VIRTIO_NET_F_MAC 5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_CTRL_VQ 17
#define VIRTIO_NET_F_MQ 22
#define NET_PAIRS_MAX 4
#define NET_QUEUES_MAX (2 * NET_PAIRS_MAX + 1)
#define NET_HDR_LEN 12
#define NET_BUF 1536
#define NET_MAX_FRAME (NET_BUF - NET_HDR_LEN)
/* The largest frame a tap passes: an IP packet of its largest MTU (65,521) and its Ethernet
 * header. */
#define NET_MAX_MERGED_FRAME 65535
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
	u16 unkicked; /* buffers posted without a notification */
};

/* The rings of every queue the driver sets up: pair p's receive queue is 2p, its transmit queue
 * 2p + 1, the control queue follows the last pair. */
static struct desc net_descs[NET_QUEUES_MAX][QSIZE_MAX] __attribute__((aligned(4096)));
static struct avail net_avail[NET_QUEUES_MAX] __attribute__((aligned(4096)));
static struct used net_used[NET_QUEUES_MAX] __attribute__((aligned(4096)));
static struct vq net_q[NET_QUEUES_MAX];
static u8 rx_bufs[NET_PAIRS_MAX][QSIZE_MAX][NET_BUF] __attribute__((aligned(64)));
static u8 tx_bufs[NET_PAIRS_MAX][QSIZE_MAX][NET_BUF] __attribute__((aligned(64)));
#define RXQ(p) (&net_q[2 * (p)])
#define TXQ(p) (&net_q[2 * (p) + 1])

static struct device net;
static u32 pairs = 1; /* the pairs in use */
static int mergeable; /* VIRTIO_NET_F_MRG_RXBUF negotiated */
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

/* Does the frame that starts at `f` (in a buffer of at least 38 bytes) look like the host's: UDP
 * over IPv4 to port 5009? */
static int host_header(const u8 *f)
{
	return f[12] == 0x08 && f[13] == 0x00 && f[14 + 9] == 17 &&
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

/* Before a stall's error line: `bench: net queue N avail=A used=U seen=S used_flags=F` for each
 * queue in use, where A is the driver's available index, U the device's used index, S the used
 * entries the driver took, and F the device's notification flag. */
static void net_dump_queues(void)
{
	for (u32 i = 0; i < 2 * pairs; i++) {
		struct vq *q = &net_q[i];
		line_len = 0;
		put("bench: net queue ");
		put_u64(i);
		put(" avail=");
		put_u64(q->avail_idx);
		put(" used=");
		put_u64(*(volatile u16 *)&q->used->idx);
		put(" seen=");
		put_u64(q->used_seen);
		put(" used_flags=");
		put_u64(*(volatile u16 *)&q->used->flags);
		flush_line();
	}
}

/* Each queue's frames: ` q0=N0 q1=N1 ...`. */
static void put_per_queue(const u64 *per_queue)
{
	for (u32 p = 0; p < pairs; p++) {
		char field[8] = {' ', 'q', (char)('0' + p), '=', 0};
		put(field);
		put_u64(per_queue[p]);
	}
}

/* Re-posts buffer `id` of `q`, and notifies unless the device has more to hand back: then it
 * is likely still working and will see the buffer, and the buffer counts as not notified. */
static void vq_repost(struct vq *q, u16 id)
{
	vq_post(q, id);
	if (*(volatile u16 *)&q->used->idx == q->used_seen) {
		kick(&net, q->notify, q->index, q->used);
		q->unkicked = 0;
	} else {
		q->unkicked = 1;
	}
}

/* Notifies `q` (unless the device said it polls) if buffers were posted without a notification.
 * Called when the device has nothing more to hand back: it may have gone idle before it saw
 * them (its last check of the available ring raced with our post), and without this the
 * driver would wait for it forever at the end of a test, when nothing is posted any more. */
static void vq_kick_unkicked(struct vq *q)
{
	if (q->unkicked) {
		q->unkicked = 0;
		kick(&net, q->notify, q->index, q->used);
	}
}

static void net_tx(u32 frame_len, const char *name)
{
	u64 frames = 0, seq = 0, per_queue[NET_PAIRS_MAX] = {0};
	for (u32 p = 0; p < pairs; p++)
		for (u16 i = 0; i < TXQ(p)->size; i++) {
			build_frame(tx_bufs[p][i], frame_len, seq++);
			TXQ(p)->descs[i] = (struct desc){(u64)tx_bufs[p][i], NET_HDR_LEN + frame_len, 0, 0};
		}
	net_start_line(name);
	u64 start = rdtsc(), end = start + test_ticks, last = start, waited = start;
	u32 outstanding = 0;
	for (u32 p = 0; p < pairs; p++) {
		for (u16 i = 0; i < TXQ(p)->size; i++, outstanding++)
			vq_post(TXQ(p), i);
		kick(&net, TXQ(p)->notify, TXQ(p)->index, TXQ(p)->used);
	}
	while (outstanding) {
		int progressed = 0;
		for (u32 p = 0; p < pairs; p++) {
			struct used_elem e;
			if (!vq_next_used(TXQ(p), &e))
				continue;
			progressed = 1;
			waited = last = rdtsc();
			outstanding--;
			frames++;
			per_queue[p]++;
			if (last < end) {
				memcpy(tx_bufs[p][e.id] + NET_HDR_LEN + 42 + 8, &seq, 8);
				seq++;
				vq_repost(TXQ(p), (u16)e.id);
				outstanding++;
			}
		}
		if (!progressed) {
			for (u32 p = 0; p < pairs; p++)
				vq_kick_unkicked(TXQ(p));
			if (rdtsc() - waited > timeout_ticks) {
				net_dump_queues();
				fail("transmit queue stalled; frames in flight", outstanding);
			}
			__asm__ __volatile__("pause");
		}
	}
	net_result(name, frames, last - start, frame_len);
	put_per_queue(per_queue);
	flush_line();
}

/* A frame being taken from a receive queue's used buffers: the buffers still to come (with
 * mergeable buffers), its length so far and whether its headers are the host's. */
struct rx_frame {
	u32 left;
	u32 len;
	int host;
};

/* Takes used buffer `e` of pair `p`'s receive queue into `f`; returns 1 when it ends a frame. */
static int rx_take(u32 p, const struct used_elem *e, struct rx_frame *f)
{
	const u8 *buf = rx_bufs[p][e->id];
	if (e->len > NET_BUF)
		fail("receive used length outside the buffer", e->len);
	if (f->left) {
		f->left--;
		f->len += e->len;
		return f->left == 0;
	}
	if (e->len < NET_HDR_LEN)
		fail("receive used length shorter than the header", e->len);
	u16 buffers = 1;
	if (mergeable) {
		buffers = (u16)(buf[10] | buf[11] << 8);
		if (buffers == 0 || buffers > RXQ(p)->size)
			fail("num_buffers outside 1 to the queue's size", buffers);
	}
	f->left = buffers - 1u;
	f->len = e->len - NET_HDR_LEN;
	f->host = f->len >= 38 && host_header(buf + NET_HDR_LEN);
	return f->left == 0;
}

/* Counts the host's N-byte frames for the test's time from the first one on, re-posting each
 * buffer, and prints the result line. */
static void rx_count(u32 frame_len, const char *name)
{
	u64 frames = 0, other = 0, per_queue[NET_PAIRS_MAX] = {0};
	u64 start = 0, end = 0, last = rdtsc(), waited = last;
	struct rx_frame partial[NET_PAIRS_MAX] = {0};
	while (!start || last < end) {
		int progressed = 0;
		for (u32 p = 0; p < pairs; p++) {
			struct used_elem e;
			if (!vq_next_used(RXQ(p), &e))
				continue;
			progressed = 1;
			waited = last = rdtsc();
			int whole = rx_take(p, &e, &partial[p]);
			vq_repost(RXQ(p), (u16)e.id);
			if (!whole)
				continue;
			if (partial[p].host && partial[p].len == frame_len) {
				per_queue[p]++;
				if (!start) {
					/* The clock starts at the first frame: the host's sender starts on
					 * our line. */
					start = last;
					end = start + test_ticks;
				} else {
					frames++;
				}
			} else {
				other++;
			}
		}
		if (!progressed) {
			for (u32 p = 0; p < pairs; p++)
				vq_kick_unkicked(RXQ(p));
			if (rdtsc() - waited > timeout_ticks) {
				net_dump_queues();
				fail(start ? "receive stalled; frames so far" : "no frame from the host; other",
				     start ? frames : other);
			}
			if (start)
				last = rdtsc();
			__asm__ __volatile__("pause");
		}
	}
	net_result(name, frames, last - start, frame_len);
	put_per_queue(per_queue);
	put(" other=");
	put_u64(other);
	flush_line();
}

static void net_rx(u32 frame_len, const char *name)
{
	net_start_line(name);
	rx_count(frame_len, name);
}

/* A line `bench: net NAME WHAT`, and `taken=N` when `taken` is not ~0. */
static void net_phase_line(const char *name, const char *what, u64 taken)
{
	line_len = 0;
	put("bench: net ");
	put(name);
	put(" ");
	put(what);
	if (taken != ~0ul) {
		put(" taken=");
		put_u64(taken);
	}
	flush_line();
}

/* holdN: a driver that withholds its receive buffers while the host keeps sending. */
static void net_hold(u32 frame_len, const char *name)
{
	net_start_line(name);
	/* Every buffer the device fills is kept, not re-posted, until none is left posted. */
	u64 taken = 0, waited = rdtsc();
	for (u32 p = 0; p < pairs;) {
		struct used_elem e;
		if (vq_next_used(RXQ(p), &e)) {
			taken++;
			waited = rdtsc();
		} else if (RXQ(p)->used_seen == RXQ(p)->avail_idx) {
			p++;
		} else if (rdtsc() - waited > timeout_ticks) {
			net_dump_queues();
			fail("the device did not fill every receive buffer; taken", taken);
		} else {
			__asm__ __volatile__("pause");
		}
	}
	net_phase_line(name, "starved", taken);
	for (u64 end = rdtsc() + test_ticks; rdtsc() < end;)
		__asm__ __volatile__("pause");
	net_phase_line(name, "refill", ~0ul);
	/* Buffer i is descriptor i (net_init): all of them go back at once. */
	for (u32 p = 0; p < pairs; p++) {
		for (u16 i = 0; i < RXQ(p)->size; i++)
			vq_post(RXQ(p), i);
		kick(&net, RXQ(p)->notify, RXQ(p)->index, RXQ(p)->used);
	}
	rx_count(frame_len, name);
}

/* Sends one command on the control queue `q` (5.1.6.5): class, command and two bytes of data;
 * returns the device's answer (0: VIRTIO_NET_OK, 1: VIRTIO_NET_ERR). Header, data and status
 * each get a descriptor, as Linux's driver frames them: the spec lets a driver frame them as it
 * likes (2.7.4), but Cloud Hypervisor takes only this framing. */
static u8 net_ctrl(struct vq *q, u8 class, u8 command, u16 data)
{
	static u8 header[2], payload[2];
	static volatile u8 status;
	header[0] = class;
	header[1] = command;
	payload[0] = (u8)data;
	payload[1] = (u8)(data >> 8);
	status = 0xff;
	q->descs[0] = (struct desc){(u64)header, 2, VRING_DESC_F_NEXT, 1};
	q->descs[1] = (struct desc){(u64)payload, 2, VRING_DESC_F_NEXT, 2};
	q->descs[2] = (struct desc){(u64)&status, 1, VRING_DESC_F_WRITE, 0};
	vq_post(q, 0);
	kick(&net, q->notify, q->index, q->used);
	struct used_elem e;
	for (u64 t = rdtsc(); !vq_next_used(q, &e);)
		if (rdtsc() - t > timeout_ticks)
			fail("the control queue did not answer; class", class);
	if (e.len != 1)
		fail("a control command's used length is not 1", e.len);
	return status;
}

/* VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (5.1.6.5.5): the device refuses 0 and more pairs than it has
 * (and a command of a class it did not offer, VIRTIO_NET_CTRL_RX's promiscuous mode), then
 * takes `n`. Returns how many it refused. */
static u64 net_set_pairs(struct vq *q, u16 n, u16 device_pairs)
{
	u64 refused = 0;
	refused += net_ctrl(q, 4, 0, 0) == 1;
	refused += net_ctrl(q, 4, 0, (u16)(device_pairs + 1)) == 1;
	refused += net_ctrl(q, 0, 0, 1) == 1;
	u8 status = net_ctrl(q, 4, 0, n);
	if (status != 0)
		fail("the device refused VQ_PAIRS_SET; its answer", status);
	return refused;
}

static void net_setup_queue(u16 index)
{
	struct vq *q = &net_q[index];
	q->descs = net_descs[index];
	q->avail = &net_avail[index];
	q->used = &net_used[index];
	q->index = index;
	q->size = setup_ring(&net, index, q->descs, q->avail, q->used, &q->notify);
}

/* Sets up the device, accepting VIRTIO_NET_F_MRG_RXBUF too when `want_mergeable`. */
static void net_init(int want_mergeable)
{
	if (!find_mmio(&net, 1) && !find_pci(&net, 1))
		fail("no modern virtio-net device (PCI or virtio_mmio.device=)", 0);
	const char *netq = param("bench.netq");
	const char *rest = "";
	pairs = netq ? (u32)parse_u64(netq, &rest) : 1;
	if (pairs < 1 || pairs > NET_PAIRS_MAX || (*rest && *rest != ' '))
		fail("bench.netq: not 1 to 4; pairs", pairs);
	u64 mq = pairs > 1 ? 1ul << VIRTIO_NET_F_CTRL_VQ | 1ul << VIRTIO_NET_F_MQ : 0;
	u64 mrg = want_mergeable ? 1ul << VIRTIO_NET_F_MRG_RXBUF : 0;
	u64 features = negotiate(&net, 1ul << VIRTIO_NET_F_MAC | mq | mrg);
	mergeable = (features & mrg) != 0;
	if ((features & mq) != mq)
		fail("bench.netq needs VIRTIO_NET_F_MQ and VIRTIO_NET_F_CTRL_VQ; offered", features);
	/* The pairs used are set up and the device's others left disabled, as a driver that uses
	 * fewer pairs than the device has may; the control queue comes after the device's last
	 * pair. */
	u32 device_pairs = mq ? rd16(net.devcfg + 8) : 1;
	if (device_pairs < pairs || device_pairs > NET_PAIRS_MAX)
		fail("the device's max_virtqueue_pairs is outside bench.netq to 4", device_pairs);
	for (u16 i = 0; i < 2 * pairs; i++)
		net_setup_queue(i);
	if (mq)
		net_setup_queue((u16)(2 * device_pairs));
	if (features & (1ul << VIRTIO_NET_F_MAC))
		for (int i = 0; i < 6; i++)
			guest_mac[i] = rd8(net.devcfg + (u64)i);
	driver_ok(&net);
	u64 refused = 0;
	if (mq)
		refused = net_set_pairs(&net_q[2 * device_pairs], (u16)pairs, (u16)device_pairs);
	/* Every receive buffer posted at once; the device holds them until frames come. */
	for (u32 p = 0; p < pairs; p++) {
		for (u16 i = 0; i < RXQ(p)->size; i++) {
			RXQ(p)->descs[i] =
				(struct desc){(u64)rx_bufs[p][i], NET_BUF, VRING_DESC_F_WRITE, 0};
			vq_post(RXQ(p), i);
		}
		kick(&net, RXQ(p)->notify, RXQ(p)->index, RXQ(p)->used);
	}
	line_len = 0;
	put("bench: net device transport=");
	put(net.transport == PCI ? "pci" : "mmio");
	put(" queue_size=");
	put_u64(TXQ(0)->size);
	put(" mac=");
	put_mac(guest_mac);
	put(" pairs=");
	put_u64(pairs);
	if (mq) {
		put(" ctrl_refused=");
		put_u64(refused);
	}
	if (mergeable)
		put(" mergeable=1");
	flush_line();
}

/* One test of `bench.net`: its name (at most 15 characters), kind and frame length; returns
 * where the next begins, or 0 when `p` starts none. */
static const char *net_test(const char *p, char *name, int *kind, u64 *frame_len)
{
	u32 n = 0;
	while (p[n] && p[n] != ',' && p[n] != ' ' && n < 15) {
		name[n] = p[n];
		n++;
	}
	name[n] = 0;
	const char *rest;
	*kind = starts_with(name, "tx") ? 't' : starts_with(name, "rx") ? 'r'
		: starts_with(name, "hold") ? 'h' : 0;
	*frame_len = parse_u64(name + (*kind == 'h' ? 4 : 2), &rest);
	u64 max = *kind == 't' ? NET_MAX_FRAME + 0u : NET_MAX_MERGED_FRAME;
	if (!*kind || *rest || *frame_len < 60 || *frame_len > max)
		return 0;
	p += n;
	return *p == ',' ? p + 1 : p;
}

/* The `bench.net` tests, in the order given: txN with 60 <= N <= 1514, rxN or holdN with
 * 60 <= N <= 65535 (over 1514 with mergeable buffers). */
static void run_net(const char *tests)
{
	char name[16];
	int kind;
	u64 frame_len;
	int want_mergeable = 0;
	for (const char *p = tests; *p && *p != ' ';) {
		const char *next = net_test(p, name, &kind, &frame_len);
		if (!next)
			fail("bench.net: not txN, rxN or holdN with 60 <= N <= 1514 (65535 for rxN and "
			     "holdN); at",
			     (u64)(p - tests));
		want_mergeable |= frame_len > NET_MAX_FRAME;
		p = next;
	}
	net_init(want_mergeable);
	for (const char *p = tests; *p && *p != ' ';) {
		p = net_test(p, name, &kind, &frame_len);
		if (frame_len > NET_MAX_FRAME && !mergeable) {
			line_len = 0;
			put("bench: net ");
			put(name);
			put(" skipped=no-mergeable-buffers");
			flush_line();
		} else if (kind == 't') {
			net_tx((u32)frame_len, name);
		} else if (kind == 'r') {
			net_rx((u32)frame_len, name);
		} else {
			net_hold((u32)frame_len, name);
		}
	}
}
