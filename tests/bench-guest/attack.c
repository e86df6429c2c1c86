/*
 * bench.attack=NAME[,NAME...]: a hostile driver. Each attack hands the virtio-blk device
 * something a correct driver never would (virtio 1.2 section 2.7 broken rings, section 5.2
 * requests the device must refuse, odd register accesses), then checks the device still serves a
 * good 4 KiB read that returns the image's pattern, after a reset and re-initialisation when the
 * device asked for one (DEVICE_NEEDS_RESET, section 2.1.2) or went silent. One line per attack:
 *   bench: attack NAME outcome=ok|ioerr|unsupp|status=N|nostatus|needs_reset|silent then=ok|bad
 * outcome: the status byte of the attack's request when it completed (`nostatus`: completed
 * without writing one), `needs_reset` when the device set DEVICE_NEEDS_RESET instead, `silent`
 * when neither happened within the wait. Included by bench.c (it shares its statics).
 */

#define VRING_DESC_F_INDIRECT 4
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13

static u64 notify_base;          /* the notify capability's address, before the queue offset */
static struct desc indirect[8][QSIZE_MAX] __attribute__((aligned(4096)));
static struct blk_header a_header __attribute__((aligned(64)));
static volatile u8 a_status[4];
static struct {
	u64 sector;
	u32 num_sectors;
	u32 flags;
} a_range;

/* Publishes `head` (or `count` raw ring slots, the caller having written them) and notifies. */
static void publish(u16 head)
{
	avail.ring[avail_idx % qsize] = head;
	barrier();
	avail_idx++;
	avail.idx = avail_idx;
	mb();
	if (blk.transport == MMIO)
		wr32(blk.notify, 0);
	else
		wr16(blk.notify, 0);
}

/* Waits up to `ms` for the used index to move; returns 1 when it did. */
static int wait_used(u64 ms)
{
	u64 start = rdtsc();
	while (*(volatile u16 *)&used.idx == used_seen) {
		if (rdtsc() - start > ms * tsc_khz)
			return 0;
		if (get_status(&blk) & STATUS_NEEDS_RESET)
			return 0;
		__asm__ __volatile__("pause");
	}
	used_seen = *(volatile u16 *)&used.idx;
	return 1;
}

static void reinit(void)
{
	blk.notify = notify_base;
	avail_idx = used_seen = 0;
	in_flight = 0;
	memset(busy, 0, sizeof(busy));
	init_device(&blk);
}

/* One good request: a 4 KiB read of sector 8 (in the read area), checked against the pattern. */
static int good_read(void)
{
	memset(data, 0, 4096);
	u16 h = 0;
	headers[0].type = VIRTIO_BLK_T_IN;
	headers[0].reserved = 0;
	headers[0].sector = 8;
	statuses[0] = 0xff;
	descs[h] = (struct desc){(u64)&headers[0], sizeof(struct blk_header), VRING_DESC_F_NEXT, 1};
	descs[1] = (struct desc){(u64)data, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2};
	descs[2] = (struct desc){(u64)&statuses[0], 1, VRING_DESC_F_WRITE, 0};
	publish(h);
	if (!wait_used(5000) || statuses[0] != 0)
		return 0;
	return verify_read(8, data) == 1;
}

/* A standard three-descriptor request in descriptors 0..2 with the given pieces. */
static void request(u32 type, u64 sector, u64 buf, u32 len, u16 data_flags)
{
	a_header.type = type;
	a_header.reserved = 0;
	a_header.sector = sector;
	a_status[0] = 0xee;
	descs[0] = (struct desc){(u64)&a_header, sizeof(a_header), VRING_DESC_F_NEXT, 1};
	descs[1] = (struct desc){buf, len, VRING_DESC_F_NEXT | data_flags, 2};
	descs[2] = (struct desc){(u64)a_status, 1, VRING_DESC_F_WRITE, 0};
}

/* ---- the attacks: each leaves a request (or damage) behind and returns 1 if it expects a
 * completion, 0 if it only poked registers. ---- */

static int a_loop(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	descs[1].next = 0; /* data -> header -> data -> ... */
	publish(0);
	return 1;
}

static int a_self_loop(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	descs[1].next = 1;
	publish(0);
	return 1;
}

static int a_past_ram(void)
{
	request(VIRTIO_BLK_T_IN, 0, 0x7ff00000000ul, 4096, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_pci_hole(void)
{
	/* 128 MiB of RAM: a buffer from RAM's last page into the MMIO hole's start is out, and so is
	 * one across 0xc0000000 itself. */
	request(VIRTIO_BLK_T_IN, 0, 0xc0000000ul - 2048, 4096, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_ram_end(void)
{
	request(VIRTIO_BLK_T_IN, 0, (128ul << 20) - 2048, 4096, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_huge_len(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 0xfffff000u, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_sector_2_64(void)
{
	request(VIRTIO_BLK_T_IN, ~0ul - 3, (u64)data, 4096, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_sector_end(void)
{
	request(VIRTIO_BLK_T_IN, capacity - 1, (u64)data, 4096, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_zero_len(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 0, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_no_status(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	descs[1].flags = VRING_DESC_F_WRITE; /* the chain ends at the data */
	publish(0);
	return 1;
}

static int a_status_ro(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	descs[2].flags = 0;
	publish(0);
	return 1;
}

static int a_header_only(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	descs[0].flags = 0;
	publish(0);
	return 1;
}

static int a_bad_type(void)
{
	request(0x7777, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_write(void)
{
	/* On a read-only disk: the data area's own pattern, so that a wrong accept does no harm. */
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	request(VIRTIO_BLK_T_OUT, capacity - 8, (u64)data, 4096, 0);
	publish(0);
	return 1;
}

static int range_request(u32 type)
{
	a_range.sector = capacity - 8;
	a_range.num_sectors = 8;
	a_range.flags = 0;
	request(type, 0, (u64)&a_range, sizeof(a_range), 0);
	publish(0);
	return 1;
}
static int a_discard(void) { return range_request(VIRTIO_BLK_T_DISCARD); }
static int a_write_zeroes(void) { return range_request(VIRTIO_BLK_T_WRITE_ZEROES); }

static int a_indirect_nested(void)
{
	indirect[0][0] = (struct desc){(u64)indirect[1], 3 * sizeof(struct desc), VRING_DESC_F_INDIRECT, 0};
	indirect[1][0] = (struct desc){(u64)&a_header, sizeof(a_header), VRING_DESC_F_NEXT, 1};
	indirect[1][1] = (struct desc){(u64)data, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2};
	indirect[1][2] = (struct desc){(u64)a_status, 1, VRING_DESC_F_WRITE, 0};
	a_header = (struct blk_header){VIRTIO_BLK_T_IN, 0, 0};
	a_status[0] = 0xee;
	descs[0] = (struct desc){(u64)indirect[0], sizeof(struct desc), VRING_DESC_F_INDIRECT, 0};
	publish(0);
	return 1;
}

static int a_indirect_long(void)
{
	/* A table that claims 64 Ki entries (1 MiB): more than the queue size allows (2.7.5.3.1). */
	a_header = (struct blk_header){VIRTIO_BLK_T_IN, 0, 0};
	indirect[0][0] = (struct desc){(u64)&a_header, sizeof(a_header), VRING_DESC_F_NEXT, 1};
	indirect[0][1] = (struct desc){(u64)data, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2};
	indirect[0][2] = (struct desc){(u64)a_status, 1, VRING_DESC_F_WRITE, 0};
	a_status[0] = 0xee;
	descs[0] = (struct desc){(u64)indirect[0], 0x100000, VRING_DESC_F_INDIRECT, 0};
	publish(0);
	return 1;
}

static int a_indirect_next(void)
{
	a_header = (struct blk_header){VIRTIO_BLK_T_IN, 0, 0};
	indirect[0][0] = (struct desc){(u64)&a_header, sizeof(a_header), VRING_DESC_F_NEXT, 1};
	indirect[0][1] = (struct desc){(u64)data, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2};
	indirect[0][2] = (struct desc){(u64)a_status, 1, VRING_DESC_F_WRITE, 0};
	a_status[0] = 0xee;
	descs[0] = (struct desc){(u64)indirect[0], 3 * sizeof(struct desc),
				 VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1};
	descs[1] = (struct desc){(u64)a_status, 1, VRING_DESC_F_WRITE, 0};
	publish(0);
	return 1;
}

static int a_indirect_loop(void)
{
	a_header = (struct blk_header){VIRTIO_BLK_T_IN, 0, 0};
	indirect[0][0] = (struct desc){(u64)&a_header, sizeof(a_header), VRING_DESC_F_NEXT, 1};
	indirect[0][1] = (struct desc){(u64)data, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0};
	a_status[0] = 0xee;
	descs[0] = (struct desc){(u64)indirect[0], 2 * sizeof(struct desc), VRING_DESC_F_INDIRECT, 0};
	publish(0);
	return 1;
}

/* Many descriptors of 1 MiB each, all aliasing one buffer: more than seg_max and more bytes than
 * a request may carry; the device must refuse it (or serve it) without stalling. */
static int a_alias_chain(void)
{
	u16 n = (u16)(qsize - 1);
	a_header = (struct blk_header){VIRTIO_BLK_T_IN, 0, 0};
	a_status[0] = 0xee;
	descs[0] = (struct desc){(u64)&a_header, sizeof(a_header), VRING_DESC_F_NEXT, 1};
	for (u16 i = 1; i < n; i++)
		descs[i] = (struct desc){(u64)data, SEQ_BYTES, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
					 (u16)(i + 1)};
	descs[n] = (struct desc){(u64)a_status, 1, VRING_DESC_F_WRITE, 0};
	publish(0);
	return 1;
}

/* The data buffer is the descriptor table itself: the device overwrites the chain it walks. */
static int a_over_ring(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)descs, 4096, VRING_DESC_F_WRITE);
	publish(0);
	return 1;
}

static int a_avail_ahead(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	avail_idx += qsize + 7;
	publish(0);
	return 1;
}

static int a_head_oob(void)
{
	publish((u16)(qsize + 5));
	return 1;
}

static int a_next_oob(void)
{
	request(VIRTIO_BLK_T_IN, 0, (u64)data, 4096, VRING_DESC_F_WRITE);
	descs[1].next = (u16)(qsize + 9);
	publish(0);
	return 1;
}

static int a_notify_storm(void)
{
	for (u32 i = 0; i < 100000; i++) {
		if (blk.transport == MMIO)
			wr32(blk.notify, 0);
		else
			wr16(blk.notify, 0);
	}
	return 0;
}

/* Reads at every offset and size of a register window, and odd-sized writes of zero to it. */
static void poke_window(u64 base, u32 size, int write)
{
	volatile u64 sink = 0;
	for (u32 off = 0; off < size; off++) {
		sink += rd8(base + off);
		if (off + 2 <= size)
			sink += rd16(base + off);
		if (off + 4 <= size)
			sink += rd32(base + off);
		if (write && (off & 3)) {
			wr8(base + off, 0);
			if (off + 2 <= size)
				wr16(base + off, 0);
		}
	}
	(void)sink;
}

static int a_config_space(void)
{
	if (blk.transport == MMIO) {
		poke_window(blk.base, 0x100, 1);
		poke_window(blk.devcfg, 0x100, 1);
		return 2;
	}
	/* The whole 4 KiB page of each capability's BAR region: common, ISR, device, notify and
	 * MSI-X table and PBA where the device puts them. */
	poke_window(blk.base & ~0xffful, 0x1000, 1);
	poke_window(blk.devcfg & ~0xffful, 0x1000, 1);
	poke_window(notify_base & ~0xffful, 0x1000, 1);
	return 2;
}

static int a_msix(void)
{
	if (blk.transport == MMIO)
		return 0;
	/* The MSI-X capability of the device (first virtio-blk function): table and PBA. */
	for (u32 dev = 0; dev < 32; dev++) {
		u32 id = pci_read(dev, 0, 0);
		if ((id & 0xffff) != 0x1af4 || ((id >> 16) != 0x1042 && (id >> 16) != 0x1001))
			continue;
		u32 cap = pci_read(dev, 0, 0x34) & 0xfc;
		for (int n = 0; cap && n < 48; n++) {
			u32 head = pci_read(dev, 0, cap);
			if ((head & 0xff) == 0x11) {
				u32 count = ((head >> 16) & 0x7ff) + 1;
				u32 table = pci_read(dev, 0, cap + 4), pba = pci_read(dev, 0, cap + 8);
				u64 tb = pci_bar(dev, 0, table & 7), pb = pci_bar(dev, 0, pba & 7);
				if (tb)
					poke_window(tb + (table & ~7u), count * 16, 1);
				if (pb)
					poke_window(pb + (pba & ~7u), ((count + 63) / 64) * 8, 1);
				/* Odd config-space accesses to the capability itself. */
				for (u32 off = 0; off < 12; off++) {
					outl(0xcf8, 0x80000000u | dev << 11 | ((cap + off) & 0xfc));
					(void)inb((u16)(0xcfc + (off & 3)));
					outb((u16)(0xcfc + (off & 3)), 0);
				}
				return 2;
			}
			cap = (head >> 8) & 0xfc;
		}
	}
	return 0;
}

static int a_string_io(void)
{
	static u32 buf[64];
	for (u32 dev = 0; dev < 32; dev += 7) {
		outl(0xcf8, 0x80000000u | dev << 11);
		u64 n = 64;
		u32 *p = buf;
		__asm__ __volatile__("rep insl" : "+D"(p), "+c"(n) : "d"((u16)0xcfc) : "memory");
		n = 64;
		const u32 *q = buf;
		outl(0xcf8, 0x80000000u | 31u << 11 | 0x40);
		__asm__ __volatile__("rep outsl" : "+S"(q), "+c"(n) : "d"((u16)0xcfc) : "memory");
		n = 64;
		q = buf;
		__asm__ __volatile__("rep outsb" : "+S"(q), "+c"(n) : "d"((u16)0xcf9) : "memory");
	}
	return 0;
}

struct attack {
	const char *name;
	int (*run)(void);
};

static const struct attack attacks_table[] = {
	{"loop", a_loop},
	{"self_loop", a_self_loop},
	{"next_oob", a_next_oob},
	{"indirect_nested", a_indirect_nested},
	{"indirect_long", a_indirect_long},
	{"indirect_next", a_indirect_next},
	{"indirect_loop", a_indirect_loop},
	{"alias_chain", a_alias_chain},
	{"over_ring", a_over_ring},
	{"past_ram", a_past_ram},
	{"pci_hole", a_pci_hole},
	{"ram_end", a_ram_end},
	{"huge_len", a_huge_len},
	{"sector_2_64", a_sector_2_64},
	{"sector_end", a_sector_end},
	{"zero_len", a_zero_len},
	{"no_status", a_no_status},
	{"status_ro", a_status_ro},
	{"header_only", a_header_only},
	{"bad_type", a_bad_type},
	{"write", a_write},
	{"discard", a_discard},
	{"write_zeroes", a_write_zeroes},
	{"avail_ahead", a_avail_ahead},
	{"head_oob", a_head_oob},
	{"notify_storm", a_notify_storm},
	{"config_space", a_config_space},
	{"msix", a_msix},
	{"string_io", a_string_io},
};

static void run_attack(const struct attack *a)
{
	const char *outcome = "ok";
	u64 code = 0;
	int kind = a->run();
	int stuck = kind == 2; /* register pokes: start from a clean device */
	if (kind == 1) {
		if (wait_used(1000)) {
			u8 st = a_status[0];
			outcome = st == 0 ? "ok" : st == 1 ? "ioerr" : st == 2 ? "unsupp" : st == 0xee ? "nostatus" : 0;
			code = st;
		} else {
			outcome = (get_status(&blk) & STATUS_NEEDS_RESET) ? "needs_reset" : "silent";
			stuck = 1; /* a driver gives up on the request and resets the device */
		}
	}
	if (stuck || (get_status(&blk) & STATUS_NEEDS_RESET))
		reinit();
	int good = good_read();
	if (!good) {
		/* One more chance after a reset: the device may have needed one without saying so. */
		reinit();
		good = good_read() ? 2 : 0;
	}
	line_len = 0;
	put("bench: attack ");
	put(a->name);
	put(" outcome=");
	if (outcome)
		put(outcome);
	else {
		put("status=");
		put_u64(code);
	}
	put(good == 1 ? " then=ok" : good == 2 ? " then=ok_after_reset" : " then=bad");
	flush_line();
}

/* bench.attack_rounds=N repeats the list N times (default 1): a guest hammering for long. */
static void run_attacks(const char *names)
{
	const char *r = param("bench.attack_rounds");
	u64 rounds = r ? parse_u64(r, &r) : 1;
	for (u64 round = 0; round < rounds; round++)
	for (u32 i = 0; i < sizeof(attacks_table) / sizeof(attacks_table[0]); i++)
		if (starts_with(names, "all") || wants(names, attacks_table[i].name))
			run_attack(&attacks_table[i]);
}
