/*
 * The bench guest: measures a VMM's virtio-blk data path from guest ring 3.
 *
 * A PVH ELF (entry.S, link.ld) whose ring-0 stub only sets up long mode and drops to ring 3 with
 * IOPL 3 and interrupts off; everything here runs in ring 3, which is native even where KVM
 * emulates ring 0 (kvm-pvm). A polling driver (no interrupts; VRING_AVAIL_F_NO_INTERRUPT, and it
 * honours VRING_USED_F_NO_NOTIFY) finds the disk as a driver would:
 *   - virtio-mmio: the `virtio_mmio.device=SIZE@ADDR:IRQ` entries of the command line
 *     (hvm_start_info.cmdline_paddr), version 2 (modern) devices only;
 *   - virtio-pci: enumeration of bus 0 through 0xcf8/0xcfc, modern capabilities (virtio 1.2
 *     section 4.1.4): common, notify and device configuration in memory BARs.
 * The first virtio-blk device found is used; it must offer VIRTIO_F_VERSION_1. `bench.net=...`
 * measures the first virtio-net device instead (net.c, its lines are described there), and the
 * disk too when `bench.blk` is given as well.
 *
 * Command line: `bench.blk=qd1,qd32,seqread,seqwrite,flush,mixed` (the tests to run, in that order;
 * default all; `seq` means both sequential ones) and `bench.secs=S` (seconds per test, decimals
 * allowed, default 2). `bench.move_bars=1` moves every memory BAR of the device to a new
 * address before using it, as an OS that reassigns PCI resources would (`pci moved` lines).
 * `bench.attack=NAME[,NAME...]` (or `all`) runs hostile-driver attacks instead of the tests,
 * one `bench: attack NAME outcome=... then=...` line each (attack.c), then `bench: done attacks`.
 *
 * The TSC frequency comes from kvmclock (the ring-0 stub enables it where CPUID says KVM), else
 * from CPUID leaf 0x15 or 0x40000010, else from a 50 ms PIT channel-2 count; the `tsc` line says
 * which. Output on COM1, one line per figure:
 *   bench: cmdline WHAT THE GUEST GOT
 *   bench: tsc khz=K source=kvmclock|cpuid15|cpuid40000010|pit
 *   bench: pci moved device=D bar=B to=ADDR   (with bench.move_bars, once per BAR)
 *   bench: blk device transport=pci|mmio capacity_sectors=N queue_size=Q
 *   bench: start blk qd1                  (before each test, for host-side CPU sampling)
 *   bench: blk qd1 randread iops=I lat_mean_us=M lat_p50_us=H lat_p99_us=P lat_max_us=X reqs=N
 *          verify=ok|bad|none
 *   bench: blk qd32 randread iops=I lat_mean_us=M lat_p50_us=H lat_p99_us=P lat_max_us=X reqs=N
 *          verify=ok|bad|none
 *   bench: blk seqread mb_s=B reqs=N req_kib=1024 qd=4
 *   bench: blk seqwrite mb_s=B reqs=N req_kib=1024 qd=4
 *   bench: blk flush ops_s=O lat_mean_us=M reqs=N
 *   bench: blk mixed read_iops=I read_p99_us=P flush_ops_s=O reqs=N
 *   bench: done
 * or `bench: error WHAT` when something is wrong, then the VM stops: a write to QEMU's
 * isa-debug-exit port 0xf4, then S5 to Cloud Hypervisor's ACPI sleep control register (0x34 to
 * port 0x600; a write-1-to-clear of nothing in PM1a_STS on ours), then an i8042 reset (0xfe to
 * port 0x64), which ends ours and Firecracker and restarts Cloud Hypervisor's guest.
 *
 * Data check: a 4 KiB random read verifies against the pattern the test harness writes into the
 * image (u64 word i of sector s is `PATTERN(s, i)`) unless it falls in the write area (the last
 * quarter of the disk, at most 64 MiB), where the sequential-write and flush tests write.
 *
 * Build: gcc -ffreestanding -nostdlib -static -fno-pic -mno-red-zone -mgeneral-regs-only -O2
 *        -no-pie -Wl,-T,link.ld -Wl,--build-id=none entry.S bench.c -o bench-guest.elf
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define PATTERN(sector, word) ((((u64)(sector)) << 8 | (u64)(word)) ^ 0x5a5a5a5a00000000ul)

#define barrier() __asm__ __volatile__("" ::: "memory")
#define mb() __asm__ __volatile__("mfence" ::: "memory")

/* ---- port and MMIO access ------------------------------------------------------------------- */

static inline void outb(u16 port, u8 v) { __asm__ __volatile__("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ __volatile__("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ __volatile__("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u32 inl(u16 port)
{
	u32 v;
	__asm__ __volatile__("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u8 rd8(u64 a) { return *(volatile u8 *)a; }
static inline u16 rd16(u64 a) { return *(volatile u16 *)a; }
static inline u32 rd32(u64 a) { return *(volatile u32 *)a; }
static inline void wr8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void wr16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void wr64(u64 a, u64 v)
{
	wr32(a, (u32)v);
	wr32(a + 4, (u32)(v >> 32));
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ __volatile__("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

/* ---- small library -------------------------------------------------------------------------- */

void *memset(void *dst, int c, u64 n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, u64 n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

static void putc_(char c) { outb(0x3f8, (u8)c); }

/* One line goes out in a single buffer so that it is easy to find in a log. */
static char line[256];
static u32 line_len;

static void put(const char *s)
{
	while (*s && line_len < sizeof(line) - 1)
		line[line_len++] = *s++;
}

static void put_u64(u64 v)
{
	char buf[24];
	int n = 0;
	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n && line_len < sizeof(line) - 1)
		line[line_len++] = buf[--n];
}

static void put_hex(u64 v)
{
	put("0x");
	char buf[16];
	int n = 0;
	do {
		buf[n++] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	while (n && line_len < sizeof(line) - 1)
		line[line_len++] = buf[--n];
}

/* `v / scale` with `decimals` decimals (1 or 2), rounded. */
static void put_fixed(u64 v, u64 scale, int decimals)
{
	u64 mul = decimals == 2 ? 100 : 10;
	u64 x = (v * mul + scale / 2) / scale;
	put_u64(x / mul);
	put(".");
	if (decimals == 2 && x % mul < 10)
		put("0");
	put_u64(x % mul);
}

static void flush_line(void)
{
	for (u32 i = 0; i < line_len; i++)
		putc_(line[i]);
	putc_('\n');
	line_len = 0;
}

static __attribute__((noreturn)) void stop(void)
{
	outb(0xf4, 0);     /* QEMU isa-debug-exit */
	outb(0x600, 0x34); /* Cloud Hypervisor's ACPI sleep control: S5 (SLP_TYP 5, SLP_EN) */
	outb(0x64, 0xfe);  /* i8042: pulse the reset line */
	for (;;)
		__asm__ __volatile__("pause");
}

static __attribute__((noreturn)) void fail(const char *what, u64 value)
{
	line_len = 0;
	put("bench: error ");
	put(what);
	put(" ");
	put_hex(value);
	flush_line();
	stop();
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

/* Parses a number (decimal, or hex with 0x); sets *end past it. */
static u64 parse_u64(const char *s, const char **end)
{
	u64 v = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			u32 d;
			if (*s >= '0' && *s <= '9')
				d = (u32)(*s - '0');
			else if (*s >= 'a' && *s <= 'f')
				d = (u32)(*s - 'a' + 10);
			else if (*s >= 'A' && *s <= 'F')
				d = (u32)(*s - 'A' + 10);
			else
				break;
			v = v * 16 + d;
		}
	} else {
		while (*s >= '0' && *s <= '9')
			v = v * 10 + (u64)(*s++ - '0');
	}
	*end = s;
	return v;
}

/* xorshift64*: the random sectors. */
static u64 rng_state = 0x9e3779b97f4a7c15ul;
static u64 rand64(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dul;
}

/* ---- time ----------------------------------------------------------------------------------- */

/* struct pvclock_vcpu_time_info, which the ring-0 stub registered with MSR_KVM_SYSTEM_TIME_NEW. */
struct pvclock {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 tsc_to_system_mul;
	signed char tsc_shift;
	u8 flags;
	u8 pad[2];
};
extern volatile struct pvclock kvmclock;

static u64 tsc_khz;

static u64 tsc_from_kvmclock(void)
{
	for (int tries = 0; tries < 1000000; tries++) {
		u32 version = kvmclock.version;
		barrier();
		u32 mul = kvmclock.tsc_to_system_mul;
		int shift = kvmclock.tsc_shift;
		barrier();
		if (version == 0 || (version & 1) || version != kvmclock.version || mul == 0)
			continue;
		/* ns = (tsc << shift) * mul >> 32, so kHz = 1e6 * 2^32 / mul / 2^shift. */
		u64 khz = (1000000ul << 32) / mul;
		return shift >= 0 ? khz >> shift : khz << -shift;
	}
	return 0;
}

/* Counts TSC ticks over 50 ms of PIT channel 2 (mode 0, gate on, speaker off). */
static u64 tsc_from_pit(void)
{
	const u32 count = 59659; /* 50 ms at 1.193182 MHz */
	outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01));
	outb(0x43, 0xb0);
	outb(0x42, (u8)count);
	outb(0x42, (u8)(count >> 8));
	u64 t0 = rdtsc();
	for (u32 polls = 0; polls < 10000000; polls++) {
		if (inb(0x61) & 0x20) {
			u64 ticks = rdtsc() - t0;
			return ticks * 1193182ul / count / 1000;
		}
	}
	return 0;
}

static const char *calibrate_tsc(void)
{
	u32 a, b, c, d;
	if ((tsc_khz = tsc_from_kvmclock()))
		return "kvmclock";
	cpuid(0, &a, &b, &c, &d);
	if (a >= 0x15) {
		cpuid(0x15, &a, &b, &c, &d);
		if (a && b && c && (tsc_khz = (u64)c * b / a / 1000))
			return "cpuid15";
	}
	cpuid(0x40000000, &a, &b, &c, &d);
	if (a >= 0x40000010 && a < 0x40000100) {
		cpuid(0x40000010, &a, &b, &c, &d);
		if ((tsc_khz = a))
			return "cpuid40000010";
	}
	if ((tsc_khz = tsc_from_pit()))
		return "pit";
	fail("no TSC frequency", 0);
}

static u64 ticks_to_ns(u64 ticks) { return ticks * 1000000ul / tsc_khz; }

/* ---- virtio device behind either transport -------------------------------------------------- */

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 64
#define STATUS_FAILED 128

#define VIRTIO_F_VERSION_1 32
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_RING_F_INDIRECT_DESC 28

/* bench.attack: negotiate what the attacks need (indirect descriptors). */
static int attack_mode;

enum transport { PCI, MMIO };

struct device {
	enum transport transport;
	u64 base;     /* MMIO: the window; PCI: the common configuration */
	u64 notify;   /* the queue's notification address */
	u64 devcfg;   /* device-specific configuration */
	u64 features; /* what the driver accepted */
	u32 notify_multiplier; /* PCI: notify_off_multiplier */
};

/* virtio-mmio registers (4.2.2) */
#define MMIO_MAGIC 0x000
#define MMIO_VERSION 0x004
#define MMIO_DEVICE_ID 0x008
#define MMIO_DEVICE_FEATURES 0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES 0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL 0x030
#define MMIO_QUEUE_NUM_MAX 0x034
#define MMIO_QUEUE_NUM 0x038
#define MMIO_QUEUE_READY 0x044
#define MMIO_QUEUE_NOTIFY 0x050
#define MMIO_STATUS 0x070
#define MMIO_QUEUE_DESC 0x080
#define MMIO_QUEUE_DRIVER 0x090
#define MMIO_QUEUE_DEVICE 0x0a0
#define MMIO_CONFIG 0x100

/* virtio_pci_common_cfg (4.1.4.3) */
#define PCI_DEVICE_FEATURE_SELECT 0x00
#define PCI_DEVICE_FEATURE 0x04
#define PCI_DRIVER_FEATURE_SELECT 0x08
#define PCI_DRIVER_FEATURE 0x0c
#define PCI_DEVICE_STATUS 0x14
#define PCI_QUEUE_SELECT 0x16
#define PCI_QUEUE_SIZE 0x18
#define PCI_QUEUE_MSIX_VECTOR 0x1a
#define PCI_QUEUE_ENABLE 0x1c
#define PCI_QUEUE_NOTIFY_OFF 0x1e
#define PCI_QUEUE_DESC 0x20
#define PCI_QUEUE_DRIVER 0x28
#define PCI_QUEUE_DEVICE 0x30

static u8 get_status(struct device *d)
{
	return d->transport == MMIO ? (u8)rd32(d->base + MMIO_STATUS) : rd8(d->base + PCI_DEVICE_STATUS);
}

static void set_status(struct device *d, u8 s)
{
	if (d->transport == MMIO)
		wr32(d->base + MMIO_STATUS, s);
	else
		wr8(d->base + PCI_DEVICE_STATUS, s);
}

static u32 device_features(struct device *d, u32 sel)
{
	if (d->transport == MMIO) {
		wr32(d->base + MMIO_DEVICE_FEATURES_SEL, sel);
		return rd32(d->base + MMIO_DEVICE_FEATURES);
	}
	wr32(d->base + PCI_DEVICE_FEATURE_SELECT, sel);
	return rd32(d->base + PCI_DEVICE_FEATURE);
}

static void driver_features(struct device *d, u32 sel, u32 v)
{
	if (d->transport == MMIO) {
		wr32(d->base + MMIO_DRIVER_FEATURES_SEL, sel);
		wr32(d->base + MMIO_DRIVER_FEATURES, v);
	} else {
		wr32(d->base + PCI_DRIVER_FEATURE_SELECT, sel);
		wr32(d->base + PCI_DRIVER_FEATURE, v);
	}
}

/* -- virtio-mmio discovery: the command line's `virtio_mmio.device=SIZE@ADDR:IRQ` -- */

static const char *cmdline = "";

static int find_mmio(struct device *d, u32 device_id)
{
	const char *key = "virtio_mmio.device=";
	for (const char *p = cmdline; *p; p++) {
		if ((p != cmdline && p[-1] != ' ') || !starts_with(p, key))
			continue;
		const char *s = p + 19;
		u64 size = parse_u64(s, &s);
		if (*s == 'K' || *s == 'k')
			size <<= 10, s++;
		else if (*s == 'M' || *s == 'm')
			size <<= 20, s++;
		if (*s != '@')
			continue;
		u64 addr = parse_u64(s + 1, &s);
		/* The page tables map the first 4 GiB; a window must lie in the MMIO hole. */
		if (size < 0x200 || addr < 0xc0000000ul || addr + size > 0x100000000ul)
			continue;
		if (rd32(addr + MMIO_MAGIC) != 0x74726976 || rd32(addr + MMIO_DEVICE_ID) != device_id)
			continue;
		if (rd32(addr + MMIO_VERSION) != 2) {
			line_len = 0;
			put("bench: note skipping legacy virtio-mmio device at ");
			put_hex(addr);
			flush_line();
			continue;
		}
		d->transport = MMIO;
		d->base = addr;
		d->notify = addr + MMIO_QUEUE_NOTIFY;
		d->devcfg = addr + MMIO_CONFIG;
		return 1;
	}
	return 0;
}

/* -- virtio-pci discovery: configuration mechanism #1 on bus 0 -- */

static u32 pci_read(u32 dev, u32 fn, u32 reg)
{
	outl(0xcf8, 0x80000000u | dev << 11 | fn << 8 | (reg & 0xfc));
	return inl(0xcfc);
}

static void pci_write(u32 dev, u32 fn, u32 reg, u32 v)
{
	outl(0xcf8, 0x80000000u | dev << 11 | fn << 8 | (reg & 0xfc));
	outl(0xcfc, v);
}

/* Where BARs go that firmware left unassigned or put above 4 GiB where `map_high` cannot map them, and
 * where `bench.move_bars` moves them, as an OS that reassigns resources (`pci=realloc`) would. */
static u64 next_bar = 0xe0000000ul;
static int move_bars;
static u32 moved_bars; /* bit dev * 6 + bar, for the first five devices */

/* The page tables of entry.S, identity-mapped and user-writable like all of RAM. */
extern u64 pml4[512];
/* A page directory of 2 MiB pages for one 1 GiB window above 4 GiB, and its PDPT. */
static u64 high_pdpt[512] __attribute__((aligned(4096)));
static u64 high_pd[512] __attribute__((aligned(4096)));
static u64 high_gib; /* the window high_pd maps; 0: none yet */
#define PTE_2M_UNCACHED 0x9f /* present, writable, user, PWT, PCD, 2 MiB page */

/* Maps the 4 MiB from the 2 MiB page of `addr` on, uncached, where a VMM placed a 64-bit BAR
 * above 4 GiB (Cloud Hypervisor does, and refuses to move them below), so that the BAR is used
 * where it is, as an OS would. Entries only go from not present to present, which needs no TLB
 * flush. Returns 0 when the window is not the one already mapped or its PML4 entry is taken. */
static int map_high(u64 addr)
{
	u64 gib = addr >> 30, end = addr + 0x400000;
	if (addr < 0x100000000ul || addr >= 1ul << 47 || (end - 1) >> 30 != gib)
		return 0;
	if (!high_gib) {
		if (pml4[gib >> 9])
			return 0;
		high_pdpt[gib & 511] = (u64)high_pd | 7;
		barrier();
		pml4[gib >> 9] = (u64)high_pdpt | 7;
		high_gib = gib;
	} else if (high_gib != gib) {
		return 0;
	}
	for (u64 a = addr & ~0x1ffffful; a < end; a += 0x200000)
		high_pd[(a >> 21) & 511] = a | PTE_2M_UNCACHED;
	barrier();
	return 1;
}

/* The memory address of BAR `bar` of dev/fn, assigning one when needed; 0 if it is not memory. */
static u64 pci_bar(u32 dev, u32 fn, u32 bar)
{
	if (bar > 5)
		return 0;
	u32 reg = 0x10 + bar * 4;
	u32 lo = pci_read(dev, fn, reg);
	if (lo & 1)
		return 0; /* I/O BAR */
	int is64 = ((lo >> 1) & 3) == 2;
	if (is64 && bar == 5)
		return 0;
	u64 addr = lo & ~0xful;
	if (is64)
		addr |= (u64)pci_read(dev, fn, reg + 4) << 32;
	u32 bit = dev < 5 ? 1u << (dev * 6 + bar) : 0;
	int move = move_bars && bit && !(moved_bars & bit);
	if (!move && addr && addr + 0x1000 <= 0xfec00000ul && addr >= 0xc0000000ul)
		return addr;
	if (!move && map_high(addr))
		return addr;
	/* Size it and place it ourselves, with memory decoding off meanwhile (PCI 3.0, 6.2.5.1). */
	u32 cmd = pci_read(dev, fn, 0x04) & 0xffff;
	pci_write(dev, fn, 0x04, cmd & ~0x0002u);
	pci_write(dev, fn, reg, 0xffffffffu);
	u32 mask = pci_read(dev, fn, reg) & ~0xfu;
	u64 size = mask ? (u64)(~mask) + 1 : 0;
	if (size == 0 || size > 0x10000000ul)
		return 0;
	next_bar = (next_bar + size - 1) & ~(size - 1);
	addr = next_bar;
	next_bar += size;
	if (next_bar > 0xfec00000ul)
		return 0;
	pci_write(dev, fn, reg, (u32)addr);
	if (is64)
		pci_write(dev, fn, reg + 4, 0);
	pci_write(dev, fn, 0x04, cmd);
	if (move) {
		moved_bars |= bit;
		line_len = 0;
		put("bench: pci moved device=");
		put_u64(dev);
		put(" bar=");
		put_u64(bar);
		put(" to=");
		put_hex(addr);
		flush_line();
	}
	return addr;
}

/* The PCI device ID of virtio device type `device_id`: modern (0x1040 + type), or transitional
 * (network 0x1000, block 0x1001), which has the modern capabilities as well (4.1.2.1). */
static int virtio_pci_id(u32 pci_device, u32 device_id)
{
	if (pci_device == 0x1040 + device_id)
		return 1;
	return (device_id == 1 && pci_device == 0x1000) || (device_id == 2 && pci_device == 0x1001);
}

static int find_pci(struct device *d, u32 device_id)
{
	for (u32 dev = 0; dev < 32; dev++) {
		for (u32 fn = 0; fn < 8; fn++) {
			u32 id = pci_read(dev, fn, 0);
			if ((id & 0xffff) == 0xffff) {
				if (fn == 0)
					break;
				continue;
			}
			int multi = (pci_read(dev, fn, 0x0c) >> 16) & 0x80;
			u32 vendor = id & 0xffff, device = id >> 16;
			if (vendor == 0x1af4 && virtio_pci_id(device, device_id)) {
				u64 common = 0, notify = 0, devcfg = 0;
				u32 multiplier = 0;
				u32 status = pci_read(dev, fn, 0x04) >> 16;
				u32 cap = (status & 0x10) ? pci_read(dev, fn, 0x34) & 0xfc : 0;
				for (int n = 0; cap && n < 48; n++) {
					u32 head = pci_read(dev, fn, cap);
					if ((head & 0xff) == 0x09) {
						u32 type = head >> 24;
						u32 bar = pci_read(dev, fn, cap + 4) & 0xff;
						u32 offset = pci_read(dev, fn, cap + 8);
						u64 base = pci_bar(dev, fn, bar);
						if (base) {
							if (type == 1 && !common)
								common = base + offset;
							else if (type == 2 && !notify) {
								notify = base + offset;
								multiplier = pci_read(dev, fn, cap + 16);
							} else if (type == 4 && !devcfg)
								devcfg = base + offset;
						}
					}
					cap = (head >> 8) & 0xfc;
				}
				if (common && notify && devcfg) {
					/* Memory space and bus mastering on, INTx off: we poll. */
					u32 cmd = pci_read(dev, fn, 0x04) & 0xffff;
					pci_write(dev, fn, 0x04, cmd | 0x0006 | 0x0400);
					d->transport = PCI;
					d->base = common;
					d->devcfg = devcfg;
					/* The queue's notify offset is read once the queue is selected. */
					d->notify = notify;
					d->notify_multiplier = multiplier;
					return 1;
				}
			}
			if (fn == 0 && !multi)
				break;
		}
	}
	return 0;
}

/* ---- the virtqueue (split ring, 2.7) -------------------------------------------------------- */

#define QSIZE_MAX 256
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
struct avail {
	u16 flags;
	u16 idx;
	u16 ring[QSIZE_MAX];
	u16 used_event;
};
struct used_elem {
	u32 id;
	u32 len;
};
struct used {
	u16 flags;
	u16 idx;
	struct used_elem ring[QSIZE_MAX];
	u16 avail_event;
};

static struct desc descs[QSIZE_MAX] __attribute__((aligned(4096)));
static struct avail avail __attribute__((aligned(4096)));
static struct used used __attribute__((aligned(4096)));
static u16 qsize;
static u16 avail_idx;     /* next avail index the driver publishes */
static u16 used_seen;     /* next used index the driver consumes */
static u32 in_flight;
static u64 notifications; /* notifications actually sent (not suppressed) */

/* One request slot: descriptors 3s (header), 3s+1 (data), 3s+2 (status). */
#define MAX_SLOTS 32
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4

struct blk_header {
	u32 type;
	u32 reserved;
	u64 sector;
};
static struct blk_header headers[MAX_SLOTS] __attribute__((aligned(64)));
static volatile u8 statuses[MAX_SLOTS];
static u8 busy[MAX_SLOTS];
static u64 submitted_at[MAX_SLOTS];
static u32 expect_len[MAX_SLOTS];

#define SEQ_DEPTH 4
#define SEQ_BYTES (1u << 20)
/* The data buffers: 32 x 4 KiB for random I/O, or 4 x 1 MiB for sequential I/O. */
static u8 data[SEQ_DEPTH * SEQ_BYTES] __attribute__((aligned(4096)));

/* Latency samples in TSC ticks, for the mean and the 99th percentile. */
#define MAX_SAMPLES (1u << 20)
static u32 samples[MAX_SAMPLES];
static u32 nsamples;

static struct device blk;
static u64 capacity; /* sectors of 512 bytes */

/* Sets up queue `index` of `d` on the given rings, at most QSIZE_MAX entries (the largest power
 * of two the device allows); returns the size and stores the queue's notification address. */
static u16 setup_ring(struct device *d, u16 index, struct desc *ring_descs, struct avail *ring_avail,
		      struct used *ring_used, u64 *notify_addr)
{
	u64 desc_a = (u64)ring_descs, avail_a = (u64)ring_avail, used_a = (u64)ring_used;
	u32 max;
	if (d->transport == MMIO) {
		wr32(d->base + MMIO_QUEUE_SEL, index);
		if (rd32(d->base + MMIO_QUEUE_READY))
			fail("queue already ready", index);
		max = rd32(d->base + MMIO_QUEUE_NUM_MAX);
	} else {
		wr16(d->base + PCI_QUEUE_SELECT, index);
		max = rd16(d->base + PCI_QUEUE_SIZE);
	}
	if (max < 3)
		fail("queue too small; size", max);
	u16 size = max > QSIZE_MAX ? QSIZE_MAX : (u16)max;
	/* A split ring's size is a power of two (2.7). */
	while (size & (size - 1))
		size &= (u16)(size - 1);
	memset(ring_descs, 0, sizeof(struct desc) * QSIZE_MAX);
	memset(ring_avail, 0, sizeof(struct avail));
	memset(ring_used, 0, sizeof(struct used));
	ring_avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
	if (d->transport == MMIO) {
		wr32(d->base + MMIO_QUEUE_NUM, size);
		wr64(d->base + MMIO_QUEUE_DESC, desc_a);
		wr64(d->base + MMIO_QUEUE_DRIVER, avail_a);
		wr64(d->base + MMIO_QUEUE_DEVICE, used_a);
		wr32(d->base + MMIO_QUEUE_READY, 1);
		*notify_addr = d->notify;
	} else {
		wr16(d->base + PCI_QUEUE_SIZE, size);
		wr16(d->base + PCI_QUEUE_MSIX_VECTOR, 0xffff);
		wr64(d->base + PCI_QUEUE_DESC, desc_a);
		wr64(d->base + PCI_QUEUE_DRIVER, avail_a);
		wr64(d->base + PCI_QUEUE_DEVICE, used_a);
		*notify_addr = d->notify + (u64)rd16(d->base + PCI_QUEUE_NOTIFY_OFF) * d->notify_multiplier;
		wr16(d->base + PCI_QUEUE_ENABLE, 1);
	}
	return size;
}

/* Notifies queue `index` at `addr` (4.1.4.4, 4.2.2), unless the device said it polls. */
static void kick(const struct device *d, u64 addr, u16 index, const struct used *ring_used)
{
	/* The avail index must be visible before we read the device's suppression flag. */
	mb();
	if (*(volatile u16 *)&ring_used->flags & VRING_USED_F_NO_NOTIFY)
		return;
	notifications++;
	if (d->transport == MMIO)
		wr32(addr, index);
	else
		wr16(addr, index);
}

/* Device initialization (3.1.1) up to FEATURES_OK: VIRTIO_F_VERSION_1 and what of `optional` the
 * device offers. Returns the features accepted. */
static u64 negotiate(struct device *d, u64 optional)
{
	set_status(d, 0);
	for (int i = 0; get_status(d) != 0; i++)
		if (i > 1000)
			fail("device does not reset", get_status(d));
	set_status(d, STATUS_ACKNOWLEDGE);
	set_status(d, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	u64 offered = device_features(d, 0) | (u64)device_features(d, 1) << 32;
	if (!(offered & (1ul << VIRTIO_F_VERSION_1)))
		fail("device does not offer VIRTIO_F_VERSION_1", offered);
	u64 want = (1ul << VIRTIO_F_VERSION_1) | (offered & optional);
	driver_features(d, 0, (u32)want);
	driver_features(d, 1, (u32)(want >> 32));
	set_status(d, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(get_status(d) & STATUS_FEATURES_OK))
		fail("device refused the features", want);
	d->features = want;
	return want;
}

/* The end of initialization, once the queues are set up. */
static void driver_ok(struct device *d)
{
	set_status(d, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	if (get_status(d) & (STATUS_NEEDS_RESET | STATUS_FAILED))
		fail("device failed at DRIVER_OK", get_status(d));
}

/* The disk: its one request queue. */
static void init_device(struct device *d)
{
	u64 optional = 1ul << VIRTIO_BLK_F_FLUSH;
	if (attack_mode)
		optional |= 1ul << VIRTIO_RING_F_INDIRECT_DESC;
	negotiate(d, optional);
	u64 notify_addr;
	qsize = setup_ring(d, 0, descs, &avail, &used, &notify_addr);
	d->notify = notify_addr;
	capacity = rd32(d->devcfg) | (u64)rd32(d->devcfg + 4) << 32;
	driver_ok(d);
}

static void notify(void) { kick(&blk, blk.notify, 0, &used); }

/* Fills slot `s`'s chain and publishes it; the caller notifies. */
static void submit(u32 s, u32 type, u64 sector, u8 *buf, u32 len)
{
	u16 head = (u16)(3 * s);
	headers[s].type = type;
	headers[s].reserved = 0;
	headers[s].sector = sector;
	statuses[s] = 0xff;
	descs[head].addr = (u64)&headers[s];
	descs[head].len = sizeof(struct blk_header);
	descs[head].flags = VRING_DESC_F_NEXT;
	descs[head].next = (u16)(head + 1);
	u16 st = head + 1;
	if (len) {
		descs[head + 1].addr = (u64)buf;
		descs[head + 1].len = len;
		descs[head + 1].flags = VRING_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VRING_DESC_F_WRITE : 0);
		descs[head + 1].next = (u16)(head + 2);
		st = head + 2;
	}
	descs[st].addr = (u64)&statuses[s];
	descs[st].len = 1;
	descs[st].flags = VRING_DESC_F_WRITE;
	descs[st].next = 0;
	/* What the device must report as written: the data it read for us, plus the status. */
	expect_len[s] = (type == VIRTIO_BLK_T_IN ? len : 0) + 1;
	busy[s] = 1;
	in_flight++;
	submitted_at[s] = rdtsc();
	avail.ring[avail_idx % qsize] = head;
	barrier(); /* x86 keeps stores in order; the compiler must too */
	avail_idx++;
	avail.idx = avail_idx;
}

/* Whether requests were submitted without a notification (see notify_unless_busy). */
static int unnotified;

/* After a resubmission: notifies once the completions seen so far are resubmitted, so that a
 * busy device gets one notification per batch. Otherwise the device is likely still working and
 * will see the request, which counts as not notified until `reap` finds the device idle. */
static void notify_unless_busy(void)
{
	if (*(volatile u16 *)&used.idx == used_seen) {
		notify();
		unnotified = 0;
	} else {
		unnotified = 1;
	}
}

/* Waits for one completion and returns its slot, after checking what the device wrote. While
 * none comes, requests submitted without a notification get one: the device may have gone idle
 * before it saw them (its last look at the available ring raced with our submission). */
static u64 completion_tsc;
static u32 reap(u64 timeout_ticks)
{
	u64 start = rdtsc();
	u16 idx;
	for (;;) {
		idx = *(volatile u16 *)&used.idx;
		if (idx != used_seen)
			break;
		if (unnotified) {
			unnotified = 0;
			notify();
		}
		if (rdtsc() - start > timeout_ticks)
			fail("no completion within the timeout; in flight", in_flight);
		__asm__ __volatile__("pause");
	}
	completion_tsc = rdtsc();
	barrier();
	if ((u16)(idx - used_seen) > in_flight)
		fail("used idx ran ahead of the requests in flight", idx);
	struct used_elem e = *(volatile struct used_elem *)&used.ring[used_seen % qsize];
	used_seen++;
	if (e.id >= qsize || e.id % 3 || e.id / 3 >= MAX_SLOTS || !busy[e.id / 3])
		fail("used element names no request in flight", e.id);
	u32 s = e.id / 3;
	if (e.len > expect_len[s])
		fail("used length larger than the buffers", e.len);
	if (statuses[s] != 0)
		fail("request failed with status", statuses[s]);
	busy[s] = 0;
	in_flight--;
	return s;
}

/* ---- the tests ------------------------------------------------------------------------------ */

static u64 test_ticks;
static u64 timeout_ticks;

/* The write area, which random reads do not verify: the last quarter of the disk, <= 64 MiB. */
static u64 write_start, write_sectors;

static void start_line(const char *name)
{
	line_len = 0;
	put("bench: start blk ");
	put(name);
	flush_line();
}

static int verify_read(u64 sector, const u8 *buf)
{
	if (sector + 8 > write_start)
		return -1;
	const u64 *w = (const u64 *)buf;
	for (u32 i = 0; i < 512; i++)
		if (w[i] != PATTERN(sector + i / 64, i % 64))
			return 0;
	return 1;
}

static u64 random_4k_sector(void)
{
	u64 blocks = capacity / 8;
	return (rand64() % blocks) * 8;
}

/* Quickselect: the k-th smallest of samples[0..n). */
static u32 kth(u32 n, u32 k)
{
	u32 lo = 0, hi = n - 1;
	while (lo < hi) {
		u32 pivot = samples[lo + (hi - lo) / 2];
		u32 i = lo, j = hi;
		while (i <= j) {
			while (samples[i] < pivot)
				i++;
			while (samples[j] > pivot)
				j--;
			if (i <= j) {
				u32 t = samples[i];
				samples[i] = samples[j];
				samples[j] = t;
				i++;
				if (j == 0)
					break;
				j--;
			}
		}
		if (k <= j)
			hi = j;
		else if (k >= i)
			lo = i;
		else
			break;
	}
	return samples[k];
}

static void randread(u32 depth, const char *name)
{
	u64 verified = 0, bad = 0, reqs = 0, total_ticks = 0, max_ticks = 0;
	nsamples = 0;
	start_line(name);
	u64 start = rdtsc(), end = start + test_ticks;
	for (u32 s = 0; s < depth; s++)
		submit(s, VIRTIO_BLK_T_IN, random_4k_sector(), data + s * 4096, 4096);
	notify();
	u64 last = start;
	while (in_flight) {
		u32 s = reap(timeout_ticks);
		u64 lat = completion_tsc - submitted_at[s];
		last = completion_tsc;
		reqs++;
		total_ticks += lat;
		if (lat > max_ticks)
			max_ticks = lat;
		if (nsamples < MAX_SAMPLES)
			samples[nsamples++] = lat > 0xffffffffu ? 0xffffffffu : (u32)lat;
		int v = verify_read(headers[s].sector, data + s * 4096);
		verified += v == 1;
		bad += v == 0;
		if (last < end) {
			submit(s, VIRTIO_BLK_T_IN, random_4k_sector(), data + s * 4096, 4096);
			notify_unless_busy();
		}
	}
	u64 elapsed = last - start;
	line_len = 0;
	put("bench: blk ");
	put(name);
	put(" randread iops=");
	put_u64(reqs * 1000000000ul / (ticks_to_ns(elapsed) | 1));
	put(" lat_mean_us=");
	put_fixed(ticks_to_ns(total_ticks / (reqs | !reqs)), 1000, 1);
	/* The median and the maximum beside the 99th percentile: where the host's CPUs are
	 * oversubscribed, a vCPU or the device's worker waiting for a core (a scheduler slice, some
	 * milliseconds) lands on a few requests, which the mean shows and the median does not. */
	put(" lat_p50_us=");
	u32 p50 = nsamples ? kth(nsamples, nsamples / 2) : 0;
	put_fixed(ticks_to_ns(p50), 1000, 1);
	put(" lat_p99_us=");
	u32 p99 = nsamples ? kth(nsamples, (u32)((u64)nsamples * 99 / 100)) : 0;
	put_fixed(ticks_to_ns(p99), 1000, 1);
	put(" lat_max_us=");
	put_fixed(ticks_to_ns(max_ticks), 1000, 1);
	put(" reqs=");
	put_u64(reqs);
	put(" verify=");
	put(bad ? "bad" : verified ? "ok" : "none");
	flush_line();
}

static void sequential(int write, const char *name)
{
	u64 reqs = 0;
	u64 area_start = write ? write_start : 0;
	u64 area = write ? write_sectors : capacity;
	u64 step = SEQ_BYTES / 512;
	if (area < step)
		fail("disk too small for 1 MiB requests; sectors", area);
	u64 next = 0;
	start_line(name);
	u64 start = rdtsc(), end = start + test_ticks, last = start;
	for (u32 s = 0; s < SEQ_DEPTH; s++) {
		if (next + step > area)
			next = 0;
		submit(s, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, area_start + next,
		       data + (u64)s * SEQ_BYTES, SEQ_BYTES);
		next += step;
	}
	notify();
	while (in_flight) {
		u32 s = reap(timeout_ticks);
		last = completion_tsc;
		reqs++;
		if (last < end) {
			if (next + step > area)
				next = 0;
			submit(s, write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, area_start + next,
			       data + (u64)s * SEQ_BYTES, SEQ_BYTES);
			next += step;
			notify_unless_busy();
		}
	}
	u64 ns = ticks_to_ns(last - start) | 1;
	line_len = 0;
	put("bench: blk ");
	put(name);
	put(" mb_s=");
	/* bytes / ns * 1000 = MB/s */
	put_fixed(reqs * SEQ_BYTES * 1000ul, ns, 1);
	put(" reqs=");
	put_u64(reqs);
	put(" req_kib=1024 qd=");
	put_u64(SEQ_DEPTH);
	flush_line();
}

/* Whether the device offers flushes; prints `bench: blk TEST unsupported` when it does not. */
static int flush_offered(const char *test)
{
	if (blk.features & (1ul << VIRTIO_BLK_F_FLUSH))
		return 1;
	line_len = 0;
	put("bench: blk ");
	put(test);
	put(" unsupported");
	flush_line();
	return 0;
}

static void flush_test(void)
{
	if (!flush_offered("flush"))
		return;
	u64 reqs = 0, next = 0;
	start_line("flush");
	u64 start = rdtsc(), end = start + test_ticks, now = start;
	memset(data, 0xa5, 4096);
	while (now < end) {
		submit(0, VIRTIO_BLK_T_OUT, write_start + next, data, 4096);
		notify();
		reap(timeout_ticks);
		submit(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
		notify();
		reap(timeout_ticks);
		now = completion_tsc;
		reqs++;
		next = (next + 8) % (write_sectors & ~7ul);
	}
	u64 ns = ticks_to_ns(now - start) | 1;
	line_len = 0;
	put("bench: blk flush ops_s=");
	put_u64(reqs * 1000000000ul / ns);
	put(" lat_mean_us=");
	put_fixed(ns / (reqs | !reqs), 1000, 1);
	put(" reqs=");
	put_u64(reqs);
	flush_line();
}

/* Random 4 KiB reads at depth 31 while slot 0 writes 4 KiB and flushes in turn, as a database
 * writes its log: what a flush costs the reads around it. A device that holds requests back
 * behind a flush shows it in the reads' rate and their 99th-percentile latency. */
static void mixed_test(void)
{
	if (!flush_offered("mixed"))
		return;
	u64 reads = 0, flushes = 0, next = 0, bad = 0;
	nsamples = 0;
	start_line("mixed");
	u64 start = rdtsc(), end = start + test_ticks, last = start;
	memset(data, 0x5a, 4096);
	submit(0, VIRTIO_BLK_T_OUT, write_start, data, 4096);
	for (u32 s = 1; s < 32; s++)
		submit(s, VIRTIO_BLK_T_IN, random_4k_sector(), data + s * 4096, 4096);
	notify();
	while (in_flight) {
		u32 s = reap(timeout_ticks);
		last = completion_tsc;
		if (s == 0 && headers[0].type == VIRTIO_BLK_T_OUT) {
			/* Every write is followed by its flush, even after the end. */
			submit(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
			notify_unless_busy();
			continue;
		}
		if (s == 0) {
			flushes++;
			next = (next + 8) % (write_sectors & ~7ul);
			if (last < end) {
				submit(0, VIRTIO_BLK_T_OUT, write_start + next, data, 4096);
				notify_unless_busy();
			}
			continue;
		}
		u64 lat = completion_tsc - submitted_at[s];
		if (nsamples < MAX_SAMPLES)
			samples[nsamples++] = lat > 0xffffffffu ? 0xffffffffu : (u32)lat;
		reads++;
		bad += verify_read(headers[s].sector, data + s * 4096) == 0;
		if (last < end) {
			submit(s, VIRTIO_BLK_T_IN, random_4k_sector(), data + s * 4096, 4096);
			notify_unless_busy();
		}
	}
	if (bad)
		fail("mixed: reads returned wrong data; count", bad);
	u64 ns = ticks_to_ns(last - start) | 1;
	line_len = 0;
	put("bench: blk mixed read_iops=");
	put_u64(reads * 1000000000ul / ns);
	put(" read_p99_us=");
	u32 p99 = nsamples ? kth(nsamples, (u32)((u64)nsamples * 99 / 100)) : 0;
	put_fixed(ticks_to_ns(p99), 1000, 1);
	put(" flush_ops_s=");
	put_u64(flushes * 1000000000ul / ns);
	put(" reqs=");
	put_u64(reads + 2 * flushes);
	flush_line();
}

/* ---- main ----------------------------------------------------------------------------------- */

/* struct hvm_start_info (Xen's arch-x86/hvm/start_info.h) */
struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;
	u32 memmap_entries;
	u32 reserved;
};

/* The value of `key` on the command line (up to the next space), or 0. */
static const char *param(const char *key)
{
	u32 n = 0;
	while (key[n])
		n++;
	for (const char *p = cmdline; *p; p++)
		if ((p == cmdline || p[-1] == ' ') && starts_with(p, key) && p[n] == '=')
			return p + n + 1;
	return 0;
}

static int wants(const char *tests, const char *name)
{
	if (!tests)
		return 1;
	u32 n = 0;
	while (name[n])
		n++;
	for (const char *p = tests; *p && *p != ' '; p++) {
		if ((p == tests || p[-1] == ',') && starts_with(p, name) &&
		    (p[n] == ',' || p[n] == ' ' || p[n] == 0))
			return 1;
	}
	return 0;
}

/* Seconds with up to three decimals, in milliseconds. */
static u64 parse_ms(const char *s)
{
	u64 ms = parse_u64(s, &s) * 1000;
	if (*s == '.') {
		u64 scale = 100;
		for (s++; *s >= '0' && *s <= '9' && scale; s++, scale /= 10)
			ms += (u64)(*s - '0') * scale;
	}
	return ms;
}

/* The last line of a run of tests, then the stop. */
static __attribute__((noreturn)) void done(void)
{
	line_len = 0;
	put("bench: done notifications=");
	put_u64(notifications);
	flush_line();
	stop();
}

#include "attack.c"
#include "net.c"

void __attribute__((noreturn)) bench_main(u32 start_info)
{
	static char cmdline_copy[4096];
	const struct hvm_start_info *info = (const struct hvm_start_info *)(u64)start_info;
	if (info && info->magic == 0x336ec578 && info->cmdline_paddr &&
	    info->cmdline_paddr < 0xc0000000ul) {
		const char *src = (const char *)info->cmdline_paddr;
		u32 i = 0;
		for (; i < sizeof(cmdline_copy) - 1 && src[i]; i++)
			cmdline_copy[i] = src[i];
		cmdline_copy[i] = 0;
		cmdline = cmdline_copy;
	}

	line_len = 0;
	put("bench: cmdline ");
	put(cmdline);
	flush_line();

	const char *source = calibrate_tsc();
	line_len = 0;
	put("bench: tsc khz=");
	put_u64(tsc_khz);
	put(" source=");
	put(source);
	flush_line();

	const char *secs = param("bench.secs");
	u64 ms = secs ? parse_ms(secs) : 2000;
	if (ms == 0)
		ms = 1;
	test_ticks = ms * tsc_khz;
	timeout_ticks = 10000 * tsc_khz; /* 10 s for one request */

	move_bars = param("bench.move_bars") != 0;
	const char *attacks = param("bench.attack");
	attack_mode = attacks != 0;
	const char *tests = param("bench.blk");
	const char *net_tests = param("bench.net");
	if (net_tests)
		run_net(net_tests);
	/* The disk's tests run when asked for, or when nothing else was. */
	if (net_tests && !tests && !attacks)
		done();
	if (!find_mmio(&blk, 2) && !find_pci(&blk, 2))
		fail("no modern virtio-blk device (PCI or virtio_mmio.device=)", 0);
	notify_base = blk.notify;
	init_device(&blk);
	write_sectors = capacity / 4;
	if (write_sectors > (64u << 20) / 512)
		write_sectors = (64u << 20) / 512;
	write_sectors &= ~7ul;
	write_start = capacity - write_sectors;
	line_len = 0;
	put("bench: blk device transport=");
	put(blk.transport == PCI ? "pci" : "mmio");
	put(" capacity_sectors=");
	put_u64(capacity);
	put(" queue_size=");
	put_u64(qsize);
	flush_line();
	if (capacity < 16)
		fail("disk too small; sectors", capacity);

	if (attacks) {
		run_attacks(attacks);
		line_len = 0;
		put("bench: done attacks");
		flush_line();
		stop();
	}

	u32 depth = qsize / 3 < MAX_SLOTS ? qsize / 3 : MAX_SLOTS;
	if (wants(tests, "qd1"))
		randread(1, "qd1");
	if (wants(tests, "qd32")) {
		if (depth < 32)
			fail("queue too small for 32 requests; size", qsize);
		randread(32, "qd32");
	}
	if (wants(tests, "seq") || wants(tests, "seqread"))
		sequential(0, "seqread");
	if (wants(tests, "seq") || wants(tests, "seqwrite"))
		sequential(1, "seqwrite");
	if (wants(tests, "flush"))
		flush_test();
	if (wants(tests, "mixed")) {
		if (depth < 32)
			fail("queue too small for 32 requests; size", qsize);
		mixed_test();
	}

	done();
}
