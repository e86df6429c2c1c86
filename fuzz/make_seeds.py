#!/usr/bin/env python3
"""Writes the hand-made seed corpus, seeds/<target>/<name>, a few KB in all.

Each input follows the layout documented on the target's entry point:
  serial, cmos, i8042, acpi_pm  devices/legacy/src/fuzz.rs  4-byte records [op, offset, v0, v1]
  vcpu_exit            vmm/src/fuzz.rs, cpu::fuzz_exit 18-byte records [kind, addr u64, size, data]
  kernel_loader        vmm/src/fuzz.rs                 a whole kernel image
  insn_fallback        pvm/src/fallback/fuzz.rs        29-byte header, then GPRs / memory pattern
  pci_config, virtio_pci                    devices/virtio/src/pci/fuzz.rs  6-byte records
  virtqueue_blk, virtqueue_net, virtqueue_rng   devices/virtio/src/fuzz.rs (queue and memory),
                       entry points in devices/virtio-{blk,net,rng}/src/fuzz.rs
  virtio_mmio          devices/virtio-blk/src/fuzz.rs  8-byte records, then memory as above
Crash regressions are not made here: they are libFuzzer's own files, copied in as
seeds/<target>/regress-<what>. Run from anywhere: python3 fuzz/make_seeds.py
"""

import bz2
import gzip
import lzma
import os
import struct

SEEDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


# Register streams: op 0 read, 1 write, 2 event; width bits (op >> 2) & 7 pick 1,1,1,1,2,4,8,0.
def rd(off, op=0):
    return [op, off & 0xFF, 0, 0]


def wr(off, v, op=1):
    return [op, off & 0xFF, v, v]


def ev(a, b):
    return [2, 0, a, b]


def flat(*records):
    return [b for r in records for b in r]


def serial():
    # Linux's 8250 probe and setup: DLAB, 115200 baud, 8N1, IER, MCR, then output and status.
    write("serial", "init-and-print", flat(
        wr(3, 0x80), wr(0, 0x01), wr(1, 0x00), wr(3, 0x03), wr(1, 0x0F), wr(4, 0x0B),
        wr(2, 0xC7), [1, 0, ord("h"), 0], [1, 0, ord("i"), 0], rd(5), rd(2), rd(6), wr(7, 0x5A), rd(7)))
    # Loopback: what is sent comes back as received data and modem status follows MCR.
    write("serial", "loopback", flat(
        wr(4, 0x10), [1, 0, 0x41, 0], rd(5), rd(0), wr(4, 0x1F), rd(6), wr(4, 0x10), rd(6), rd(2)))
    # Host input until the FIFO fills, with the receive interrupt enabled, then drain it.
    write("serial", "input-fifo", flat(
        wr(1, 0x01), *[ev(0x30 + i, 0x31 + i) for i in range(40)], rd(2), *[rd(0) for i in range(70)], rd(5)))
    # Wide, empty and straddling accesses, and offsets just outside the device.
    write("serial", "odd-widths", flat(
        [0x10, 0, 0, 0], [0x14, 4, 0, 0], [0x18, 0, 0, 0], [0x1C, 0, 0, 0], [0x11, 7, 1, 2],
        [0x15, 6, 1, 2], rd(0xFF), wr(8, 1), rd(8), [0x1D, 3, 0, 0]))


def cmos():
    # Read the clock the way Linux does: wait for UIP clear, then every time register.
    regs = [0x0A, 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32, 0x0B, 0x0C, 0x0D]
    write("cmos", "read-clock", flat(*[r for i in regs for r in (wr(0, i), rd(1))]))
    # Set the time: SET in B, garbage in every time register with the clock moving, SET cleared.
    set_time = [wr(0, 0x0B), wr(1, 0x84)]
    for i in [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32]:
        set_time += [wr(0, i), wr(1, 0x59), ev(0xFF, 0x03)]
    set_time += [wr(0, 0x0B), wr(1, 0x02), wr(0, 0x00), rd(1), wr(0, 0x04), rd(1)]
    write("cmos", "set-time", flat(*set_time))
    # Poll register A across second boundaries (UIP) and C for the update-ended flag.
    poll = []
    for step in [1, 2, 250, 1003, 5, 60000]:
        poll += [wr(0, 0x0A), rd(1), wr(0, 0x0C), rd(1), ev(step & 0xFF, step >> 8)]
    write("cmos", "poll-uip", flat(*poll))
    # NVRAM: memory-size bytes, writes with the NMI-disable bit, 12-hour BCD mode.
    write("cmos", "nvram-and-modes", flat(
        wr(0, 0x34), rd(1), wr(0, 0x35), rd(1), wr(0, 0x5B), rd(1), wr(0, 0x90), wr(1, 0xAA),
        wr(0, 0x10), rd(1), wr(0, 0x8B), wr(1, 0x00), wr(0, 0x04), rd(1), wr(0, 0x7F), wr(1, 1),
        [0x10, 0, 0, 0], [0x11, 0, 0x0B, 0x0B], rd(2), wr(0xFF, 0)))


def i8042():
    # Controller commands: read and write the command byte, self tests, enable the keyboard.
    write("i8042", "controller", flat(
        rd(4), wr(4, 0x20), rd(0), wr(4, 0x60), wr(0, 0x47), wr(4, 0x20), rd(0), wr(4, 0xAA),
        rd(0), wr(4, 0xAB), rd(0), wr(4, 0xAE), wr(4, 0xA7), wr(4, 0xA8), wr(4, 0xD0), rd(0)))
    # Keyboard commands through the data port: reset, identify, LEDs, scan set, enable.
    write("i8042", "keyboard", flat(
        wr(0, 0xFF), rd(4), rd(0), rd(0), wr(0, 0xF2), rd(0), rd(0), rd(0), wr(0, 0xED),
        wr(0, 0x07), rd(0), wr(0, 0xF0), wr(0, 0x00), rd(0), rd(0), wr(0, 0xF4), rd(0)))
    # Port B: speaker gate and the refresh bit toggling on reads.
    write("i8042", "port-b", flat(wr(1, 0x03), rd(1), rd(1), rd(1), wr(1, 0x00), rd(1), [0x10, 0, 0, 0]))
    # CPU reset through the controller, and through the output port.
    write("i8042", "reset", flat(wr(4, 0xD1), wr(0, 0xFE), wr(4, 0xFE), rd(4), wr(4, 0xF0), wr(3, 0)))


def vcpu_exit():
    def exit_(kind, addr, size, data=b"", element=0):
        # element: string I/O element size index (0 none, 1, 2 or 3 for 1, 2 or 4 bytes)
        data = bytes(data) + bytes(8 - len(data))
        return list(struct.pack("<BQB", kind, addr, (size - 1) | element << 4)) + list(data)

    pin = lambda port, size=1: exit_(0, port, size)
    pout = lambda port, data: exit_(1, port, len(data), data)
    write("vcpu_exit", "uart", flat(
        pout(0x3FB, b"\x03"), pout(0x3F9, b"\x01"), pout(0x3F8, b"o"), pout(0x3F8, b"k"), pin(0x3FD), pin(0x3FA)))
    write("vcpu_exit", "rtc", flat(pout(0x70, b"\x0a"), pin(0x71), pout(0x70, b"\x00"), pin(0x71), pout(0x70, b"\x0b"), pin(0x71)))
    write("vcpu_exit", "i8042", flat(pin(0x64), pout(0x64, b"\x20"), pin(0x60), pout(0x60, b"\xf2"), pin(0x60), pout(0x64, b"\xfe")))
    write("vcpu_exit", "post-and-unclaimed", flat(
        pout(0x80, b"\x42"), pin(0x80), pin(0x62), pin(0xCF8, 4), pout(0xCFC, b"\x00\x00\x00\x80"),
        exit_(2, 0xFEE0_0000, 4), exit_(3, 0xD000_0000, 8, b"\x01\x02\x03\x04\x05\x06\x07\x08")))
    # Wide port accesses at and across device ends.
    write("vcpu_exit", "wide-ports", flat(pin(0x70, 2), pin(0x71, 2), pin(0x3F8, 4), pout(0x3FF, b"\x01\x02"), pin(0x5F, 2)))
    # String I/O: rep outsb to the UART, rep insb from its scratch register, rep outsw/insd.
    write("vcpu_exit", "string-io", flat(
        exit_(1, 0x3F8, 8, b"rep outs", element=1), exit_(1, 0x3FF, 1, b"Z"), exit_(0, 0x3FF, 4, element=1),
        exit_(1, 0x70, 4, b"\x0a\x00\x0b\x00", element=2), exit_(0, 0x71, 8, element=3)))


def elf(entry, segs, tail=b""):
    """A 64-bit x86 ELF executable with one PT_LOAD per (paddr, data, memsz) segment."""
    phoff = 64
    data_start = phoff + 56 * len(segs)
    out = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    out += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, phoff, 0, 0, 64, 56, len(segs), 64, 0, 0)
    offset = data_start
    for paddr, data, memsz in segs:
        out += struct.pack("<IIQQQQQQ", 1, 7, offset, 0xFFFFFFFF80000000 | paddr, paddr, len(data), memsz, 0x200000)
        offset += len(data)
    for _, data, _ in segs:
        out += data
    return out + tail


def bzimage(payload, init_size=0x40_0000, pref=0x100_0000, xloadflags=0x7F, version=0x020F):
    """A bzImage: one setup sector after the boot sector, a 0x40-byte stub, the payload, 0x20 bytes."""
    setup_sects = 1
    hdr = bytearray(0x26C - 0x1F1)

    def put(off, fmt, value):
        struct.pack_into(fmt, hdr, off - 0x1F1, value)

    put(0x1F1, "<B", setup_sects)
    put(0x1FE, "<H", 0xAA55)
    put(0x202, "<I", 0x53726448)  # "HdrS"
    put(0x206, "<H", version)
    put(0x211, "<B", 0x01)  # loadflags: LOADED_HIGH
    put(0x214, "<I", 0x100000)  # code32_start
    put(0x22C, "<I", 0x7FFFFFFF)  # initrd_addr_max
    put(0x230, "<I", 0x200000)  # kernel_alignment
    put(0x234, "<B", 1)  # relocatable_kernel
    put(0x235, "<B", 21)  # min_alignment
    put(0x236, "<H", xloadflags)
    put(0x238, "<I", 2047)  # cmdline_size
    put(0x248, "<I", 0x40)  # payload_offset
    put(0x24C, "<I", len(payload))  # payload_length
    put(0x258, "<Q", pref)  # pref_address
    put(0x260, "<I", init_size)
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1:0x26C] = hdr
    return bytes(image) + bytes(range(0x40)) + payload + b"\xcc" * 0x20


def kernel_loader():
    code = bytes((i * 7) & 0xFF for i in range(0x100))
    vmlinux = elf(0x100_0000, [(0x100_0000, code, 0x1_0000)], tail=b"\xee" * 16)
    write("kernel_loader", "tiny-vmlinux", vmlinux)
    # Two segments, the second running past the end of the fuzzers' 64 MiB of RAM.
    write("kernel_loader", "elf-outside-ram", elf(0x100_0000, [(0x100_0000, code[:16], 0x10), (0x3FF_0000, code[:16], 0x2_0000)]))
    size = struct.pack("<I", len(vmlinux))
    write("kernel_loader", "bzimage-gzip", bzimage(gzip.compress(vmlinux, 9, mtime=0)))
    write("kernel_loader", "bzimage-bzip2", bzimage(bz2.compress(vmlinux, 9) + size))
    xz = lzma.compress(vmlinux, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32,
                       filters=[{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 1, "dict_size": 1 << 16}])
    write("kernel_loader", "bzimage-xz", bzimage(xz + size))
    # A payload the host cannot decompress (LZO magic): loaded whole for the guest's decompressor.
    write("kernel_loader", "bzimage-lzo", bzimage(b"\x89LZO\x00" + bytes(16)))


def insn_fallback():
    def seed(mode, exit_len, insn, regs=(), tail=b"", present=0xFFFF, read_only=0, fcw=0x37F, fsw=0, mxcsr=0x1F80):
        insn = bytes(insn) + b"\x90" * (15 - len(insn))
        out = bytes([mode, exit_len]) + insn + struct.pack("<HHHHI", present, read_only, fcw, fsw, mxcsr)
        assert len(out) == 29
        gprs = list(regs) + [0] * (16 - len(regs))
        return out + struct.pack("<16Q", *gprs) + tail

    rax = 0x3000  # memory operands through [rax]
    write("insn_fallback", "int3", seed(0, 1, [0xCC]))
    write("insn_fallback", "stac-ring3", seed(1, 3, [0x0F, 0x01, 0xCB]))
    write("insn_fallback", "fwait-pending-fault", seed(0, 1, [0x9B], fcw=0x37E, fsw=0x81))
    write("insn_fallback", "fnstsw-ax", seed(2, 2, [0xDF, 0xE0], fsw=0x3800))
    write("insn_fallback", "fldcw-real-mode", seed(3, 2, [0xD9, 0x28], regs=[rax], tail=struct.pack("<H", 0x27F)))
    write("insn_fallback", "ldmxcsr-reserved", seed(0, 3, [0x0F, 0xAE, 0x10], regs=[0x80], tail=struct.pack("<I", 0x10000)))
    write("insn_fallback", "stmxcsr-fetched", seed(0, 0, [0x0F, 0xAE, 0x18], regs=[rax]))
    write("insn_fallback", "pxor-straddles-page", seed(0x40, 0, [0x66, 0x0F, 0xEF, 0xC1], present=0x0003))
    write("insn_fallback", "movaps-misaligned", seed(0, 3, [0x0F, 0x28, 0x00], regs=[rax + 8]))
    write("insn_fallback", "movdqu-store-readonly", seed(0, 4, [0xF3, 0x0F, 0x7F, 0x00], regs=[rax], read_only=0x0008))
    write("insn_fallback", "popcnt", seed(0, 5, [0xF3, 0x48, 0x0F, 0xB8, 0xC3], regs=[0, 0xF0F0_0000_0000_00FF]))
    write("insn_fallback", "cmpxchg16b", seed(0, 4, [0x48, 0x0F, 0xC7, 0x0E], regs=[1, 2, 3, 4, rax]))
    write("insn_fallback", "xgetbv-ts-em", seed(0x30 | 0x80, 0x63, [0x0F, 0x01, 0xD0]))
    write("insn_fallback", "vzeroupper", seed(0, 3, [0xC5, 0xF8, 0x77]))
    # Failures that become guest faults: an instruction the fallback lacks (xsave) in ring 3.
    write("insn_fallback", "xsave-ring3-ud", seed(1, 3, [0x0F, 0xAE, 0x20], regs=[rax]))

    # Page-table mode (pages present = 0): 32 KiB of memory (repeated over the 64 KiB) with
    # 4-level tables at 0x5000 (PML4), 0x6000 (PDPT), 0x7000 (PD), whose PD[0] maps the first
    # 2 MiB with `pd0` as flags and PDPT[1] a 1 GiB page at 1 GiB (past the 64 KiB of RAM: a
    # device page); at 0xf000 (0x7000 repeated) an IDT with present #UD, #GP and #PF gates.
    # `ro` is the read-only field: CR3 page 5 plus the mode bits (16 SMAP, 32 SMEP, 64 NXE,
    # 128 clear WP).
    def walk_seed(mode, exit_len, insn, pd0, ro=5, regs=()):
        mem = bytearray(0x8000)
        struct.pack_into("<Q", mem, 0x5000, 0x6000 | 0x7)
        struct.pack_into("<Q", mem, 0x6000, 0x7000 | 0x7)
        struct.pack_into("<Q", mem, 0x6008, 0x4000_0000 | 0x87)
        struct.pack_into("<Q", mem, 0x7000, pd0)
        for vector in (6, 13, 14):
            struct.pack_into("<HHBBHI", mem, 0x7000 + vector * 16, 0x1000, 0x08, 0, 0x8E, 0, 0)
        gprs = list(regs) + [0] * (16 - len(regs))
        return seed(mode, exit_len, insn, regs=gprs, tail=bytes(mem[128:]), present=0, read_only=ro)

    stmxcsr_rax, ldmxcsr_rax = [0x0F, 0xAE, 0x18], [0x0F, 0xAE, 0x10]
    # A kernel write to a read-only page (CR0.WP): #PF present|write.
    write("insn_fallback", "walk-read-only", walk_seed(0, 3, stmxcsr_rax, 0x85, regs=[0x3000]))
    # A kernel read of a user page under SMAP with RFLAGS.AC clear: #PF present.
    write("insn_fallback", "walk-smap", walk_seed(0, 3, ldmxcsr_rax, 0x87, ro=5 | 16, regs=[0x3000]))
    # Operands on a device page, from ring 0 (the IDT takes #UD) and from ring 3.
    write("insn_fallback", "walk-device-ring0", walk_seed(0, 3, ldmxcsr_rax, 0x87, regs=[0x4000_0000]))
    write("insn_fallback", "walk-device-ring3", walk_seed(1, 3, ldmxcsr_rax, 0x87, regs=[0x4000_0010]))
    # Instruction bytes fetched from an execute-disabled page (EFER.NXE): #PF on the fetch.
    write("insn_fallback", "walk-nx-fetch", walk_seed(1, 0, stmxcsr_rax, 0x87 | 1 << 63, ro=5 | 64, regs=[0x3000]))


def pci():
    # 6-byte records [op, at, v0, v1, v2, v3] (devices/virtio/src/pci/fuzz.rs).
    def cfg_addr(slot, reg):
        return [0x08, 0, slot, reg, 0, 0]

    def cfg_read(width_idx=2, byte=0):
        return [width_idx << 1, 5 + byte, 0, 0, 0, 0]  # 0xcf7 + 5 = 0xcfc

    def cfg_write(value, width_idx=2, byte=0):
        return [1 | width_idx << 1, 5 + byte] + list(struct.pack("<I", value))

    # Enumeration: vendor/device of slots 0..3, class, header type.
    enum = []
    for slot in range(4):
        enum += [cfg_addr(slot, 0), cfg_read(), cfg_addr(slot, 2), cfg_read(), cfg_addr(slot, 3), cfg_read(0, 2)]
    write("pci_config", "enumerate", flat(*enum))
    # BAR sizing the way Linux does it: save, write all ones, read the size mask, restore; then
    # place BAR 0, enable memory decode, and read CONFIG_ADDRESS back.
    write("pci_config", "bar-sizing", flat(
        cfg_addr(1, 1), cfg_write(0x0000, 1), cfg_addr(1, 4), cfg_read(), cfg_write(0xFFFFFFFF), cfg_read(),
        cfg_write(0xC0000000), cfg_addr(1, 5), cfg_write(0xFFFFFFFF), cfg_read(), cfg_write(0),
        cfg_addr(1, 1), cfg_write(0x0006, 1), cfg_read(), [0x04, 1, 0, 0, 0, 0], cfg_addr(1, 4),
        cfg_write(0xC0004000), cfg_addr(1, 15), cfg_write(0x0105)))
    # Capability walk (pointer at 0x34) and MSI-X enable in its message control.
    caps = [cfg_addr(1, 13), cfg_read(0)]
    for reg in range(16, 40):
        caps += [cfg_addr(1, reg), cfg_read()]
    caps += [cfg_addr(1, 16), cfg_write(0xC000, 1, 2), cfg_read(), [0xFF, 0, 1, 0, 0, 0], [0xFF, 0, 0, 0, 0, 0]]
    write("pci_config", "capabilities-msix", flat(*caps))
    # Odd accesses: bytes of CONFIG_ADDRESS, 8-byte and straddling accesses, ports beside it.
    write("pci_config", "odd-accesses", flat(
        [0x01, 1, 0x80, 0, 0, 0], [0x00, 1, 0, 0, 0, 0], [0x06, 0, 0, 0, 0, 0], [0x07, 7, 1, 2, 3, 4],
        [0x02, 9, 0, 0, 0, 0], [0x00, 0, 0, 0, 0, 0], cfg_addr(3, 63), cfg_read(2), cfg_read(0, 3), cfg_write(0xAA, 0, 3)))

    def common(off, value, width):
        idx = {1: 0, 2: 1, 4: 2, 8: 3}[width]
        return [1 | idx << 1, off] + list(struct.pack("<I", value & 0xFFFFFFFF))

    def common_rd(off, width):
        return [{1: 0, 2: 1, 4: 2, 8: 3}[width] << 1, off, 0, 0, 0, 0]

    status = lambda s: common(0x14, s, 1)
    # The virtio 1.x driver sequence (spec 3.1.1) over the modern PCI transport, then a reset.
    init = [status(0), status(1), status(3), common(0x00, 0, 4), common_rd(0x04, 4), common(0x00, 1, 4),
            common_rd(0x04, 4), common(0x08, 1, 4), common(0x0C, 1, 4), common(0x08, 0, 4),
            common(0x0C, 1, 4), status(0x0B), common_rd(0x14, 1), common(0x10, 0, 2),
            common(0x16, 0, 2), common_rd(0x18, 2), common(0x18, 8, 2), common(0x1A, 1, 2),
            common(0x20, 0x1000, 4), common(0x24, 0, 4), common(0x28, 0x2000, 4), common(0x30, 0x3000, 4),
            common(0x1C, 1, 2), common_rd(0x1E, 2), status(0x0F), common_rd(0x15, 1),
            [0x1B, 0, 0, 0, 0, 0], [0x08, 0, 0, 0, 0, 0], [0xFF, 0, 1, 0, 0, 0], [0x08, 0, 0, 0, 0, 0],
            status(0), common_rd(0x14, 1)]
    write("virtio_pci", "driver-init-reset", flat(*init))
    # MSI-X table entries and the PBA, masking and unmasking a vector with an interrupt pending.
    msix = [[0x25, 0x00] + list(struct.pack("<I", 0xFEE00000)), [0x25, 0x04, 0, 0, 0, 0],
            [0x25, 0x08, 0x41, 0, 0, 0], [0x25, 0x0C, 1, 0, 0, 0], [0x36, 4 + 0] + list(struct.pack("<I", 0)),
            status(1), status(3), status(0x0B), common(0x16, 1, 2), common(0x1A, 0, 2), common(0x1C, 1, 2),
            status(0x0F), [0xFF, 0, 2, 0, 0, 0], [0x2C, 0, 0, 0, 0, 0], [0x25, 0x0C, 0, 0, 0, 0],
            [0x2C, 0, 0, 0, 0, 0], [0x24, 0x08, 0, 0, 0, 0]]
    write("virtio_pci", "msix-table-pba", flat(*msix))
    # Device configuration, configuration space registers, and accesses anywhere in BAR 0.
    write("virtio_pci", "config-and-bar", flat(
        [0x15, 0, 1, 2, 3, 4], [0x14, 0, 0, 0, 0, 0], [0x17, 12, 9, 9, 9, 9], [0x16, 14, 0, 0, 0, 0],
        [0x30, 0, 0, 0, 0, 0], [0x35, 4, 0xFF, 0xFF, 0xFF, 0xFF], [0x30, 4, 0, 0, 0, 0], [0x71, 1, 6, 0, 0, 0],
        [0x3E, 0xFF, 0, 0, 0, 0x7F], [0x3F, 0x10, 1, 2, 3, 0x30], [0x06, 0x3C, 0, 0, 0, 0], [0x07, 0x3E, 1, 1, 1, 1]))


def queue_memory(descs, heads, extra=()):
    """Guest memory for the virtqueue targets (devices/virtio/src/fuzz.rs): descriptor table at 0,
    available ring at 0x200 (used ring at 0x400 left zero), `extra` (address, bytes) pieces.
    Memory past the end of the input reads as zero, so buffers may point anywhere below 0x4000."""
    mem = bytearray(0x200 + 4 + 2 * len(heads))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", mem, 16 * i, addr, length, flags, nxt)
    struct.pack_into("<HH", mem, 0x200, 0, len(heads))
    for i, head in enumerate(heads):
        struct.pack_into("<H", mem, 0x204 + 2 * i, head)
    for addr, data in extra:
        if len(mem) < addr + len(data):
            mem.extend(bytes(addr + len(data) - len(mem)))
        mem[addr:addr + len(data)] = data
    return bytes(mem)


NEXT, WRITE = 1, 2


def virtqueues():
    size16 = 4  # queue size 1 << (4 % 5) = 16
    blk_hdr = lambda kind, sector: struct.pack("<IIQ", kind, 0, sector)
    read_chain = [(0x100, 16, NEXT, 1), (0x1000, 512, NEXT | WRITE, 2), (0x2000, 1, WRITE, 0)]
    write("virtqueue_blk", "read-sector-2", [size16, 0, 0, 0] + list(queue_memory(read_chain, [0], [(0x100, blk_hdr(0, 2))])))
    write_chain = [(0x100, 16, NEXT, 1), (0x1000, 1024, NEXT, 2), (0x2000, 1, WRITE, 0)]
    write("virtqueue_blk", "write-read-only", [size16, 0, 0, 2] + list(queue_memory(write_chain, [0], [(0x100, blk_hdr(1, 15))])))
    # Flush, get-id, discard (with its segment) and an out-of-range read, event index on.
    reqs = [(0x100, 16, NEXT, 1), (0x2000, 1, WRITE, 0),
            (0x110, 16, NEXT, 3), (0x1000, 20, NEXT | WRITE, 4), (0x2001, 1, WRITE, 0),
            (0x120, 16, NEXT, 6), (0x130, 16, NEXT, 7), (0x2002, 1, WRITE, 0),
            (0x140, 16, NEXT, 9), (0x1000, 512, NEXT | WRITE, 10), (0x2003, 1, WRITE, 0)]
    extra = [(0x100, blk_hdr(4, 0)), (0x110, blk_hdr(8, 0)), (0x120, blk_hdr(11, 0)),
             (0x130, struct.pack("<QII", 3, 4, 0)), (0x140, blk_hdr(0, 16))]
    write("virtqueue_blk", "flush-id-discard-oob", [size16, 0, 0, 5] + list(queue_memory(reqs, [0, 2, 5, 8], extra)))
    # The same kinds of request on a disk file through io_uring (flags bit 3): a read split over
    # two buffers, a write, a flush after it and an out-of-range read (synchronous path, IOERR).
    reqs = [(0x100, 16, NEXT, 1), (0x1000, 256, NEXT | WRITE, 2), (0x1400, 256, NEXT | WRITE, 3), (0x2000, 1, WRITE, 0),
            (0x110, 16, NEXT, 5), (0x1800, 512, NEXT, 6), (0x2001, 1, WRITE, 0),
            (0x120, 16, NEXT, 8), (0x2002, 1, WRITE, 0),
            (0x140, 16, NEXT, 10), (0x1000, 512, NEXT | WRITE, 11), (0x2003, 1, WRITE, 0)]
    extra = [(0x100, blk_hdr(0, 2)), (0x110, blk_hdr(1, 3)), (0x120, blk_hdr(4, 0)), (0x140, blk_hdr(0, 16))]
    write("virtqueue_blk", "uring-read-write-flush", [size16, 0, 0, 8 | 4] + list(queue_memory(reqs, [0, 4, 7, 9], extra)))
    # A descriptor chain that loops on itself, and a head past the queue size.
    write("virtqueue_blk", "loop-and-bad-head", [1, 0, 0, 0] + list(queue_memory([(0x100, 16, NEXT, 0)], [0, 7], [(0x100, blk_hdr(0, 0))])))

    write("virtqueue_rng", "two-buffers", [size16, 0, 0, 0] + list(queue_memory(
        [(0x1000, 64, WRITE, 0), (0x1100, 8, NEXT | WRITE, 2), (0x1200, 8, WRITE, 0)], [0, 1])))
    write("virtqueue_rng", "read-only-buffer", [2, 0, 0, 0] + list(queue_memory([(0x1000, 64, 0, 0), (0x3ff8, 64, WRITE, 0)], [0, 1])))

    # Receive buffers: one big, one split header/data, one too small.
    rx = [(0x1000, 0x800, WRITE, 0), (0x2000, 12, NEXT | WRITE, 2), (0x2010, 0x600, WRITE, 0), (0x3000, 8, WRITE, 0)]
    write("virtqueue_net", "rx-buffers", [size16, 0, 0, 0] + list(queue_memory(rx, [0, 1, 3])))
    write("virtqueue_net", "rx-mergeable", [size16, 0, 0, 2] + list(queue_memory(rx, [0, 1, 3, 0])))
    # Transmit first: a header and a frame, a frame over the size limit, a header only.
    frame = bytes(12) + bytes([0xFF] * 6 + [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x00]) + bytes(46)
    tx = [(0x100, 12 + 60, 0, 0), (0x1000, 12, NEXT, 2), (0x1100, 0x3000, 0, 0), (0x1000, 12, 0, 0)]
    write("virtqueue_net", "tx-first", [size16, 0, 0, 4] + list(queue_memory(tx, [0, 1, 3], [(0x100, frame)])))
    # The control queue (flags bit 3): two queue pairs (OK), nine (refused), a command of a
    # class not offered, one without its header, one with no room for its status.
    ctrl = [(0x100, 4, NEXT, 1), (0x2000, 1, WRITE, 0),
            (0x110, 4, NEXT, 3), (0x2001, 1, WRITE, 0),
            (0x120, 3, NEXT, 5), (0x2002, 1, WRITE, 0),
            (0x2003, 1, WRITE, 0),
            (0x100, 4, 0, 0)]
    extra = [(0x100, bytes([4, 0, 2, 0])), (0x110, bytes([4, 0, 9, 0])), (0x120, bytes([0, 0, 1]))]
    write("virtqueue_net", "control-queue", [size16, 0, 0, 8] + list(queue_memory(ctrl, [0, 2, 4, 6, 7], extra)))

    # virtio-mmio: [op, off_lo, off_hi, width, v0..v3]; op 3 writes DRIVER_VALUES[v0 & 15].
    def rd(off, width=2):
        return [0, off & 0xFF, off >> 8, width, 0, 0, 0, 0]

    def wr(off, value, width=2):
        return [1, off & 0xFF, off >> 8, width] + list(struct.pack("<I", value))

    def drv(off, index):
        return [3, off & 0xFF, off >> 8, 2, index, 0, 0, 0]

    records = flat(
        rd(0x000), rd(0x004), rd(0x008), drv(0x070, 0), drv(0x070, 1), drv(0x070, 2),
        wr(0x014, 1), rd(0x010), wr(0x024, 1), drv(0x020, 6), wr(0x024, 0), drv(0x020, 7), drv(0x070, 3), rd(0x070),
        drv(0x030, 0), rd(0x034), drv(0x038, 12), drv(0x080, 8), drv(0x084, 0), drv(0x090, 9), drv(0x0A0, 10),
        drv(0x044, 11), drv(0x070, 4), drv(0x050, 0), [2, 0, 0, 0, 0, 0, 0, 0], rd(0x060), wr(0x064, 1),
        rd(0x100, 3), rd(0x0FC), drv(0x070, 0), rd(0x044), [0xFF, 0, 0, 0, 0, 0, 0, 0])
    blk_mem = queue_memory(read_chain, [0], [(0x100, blk_hdr(0, 2))])
    write("virtio_mmio", "blk-driver-read", records + list(blk_mem))
    # Registers out of order: queue set-up before features, notify before DRIVER_OK, odd widths.
    write("virtio_mmio", "out-of-order", flat(
        drv(0x044, 11), drv(0x050, 0), drv(0x070, 4), wr(0x038, 0x1000), rd(0x100, 0), rd(0x103, 1),
        wr(0x104, 0xFFFFFFFF, 3), rd(0x1FE, 3), rd(0x200), drv(0x070, 5), drv(0x064, 15), [0xFF] + [0] * 7))


def acpi_pm():
    # Linux's power-button set-up and a press: enable PWRBTN_EN (offset 3, bit 0), press, read
    # and acknowledge PM1_STS (write 1 to clear), then S5 with SLP_EN in PM1_CNT's high byte.
    write("acpi_pm", "button-then-s5", flat(
        rd(2, 0x10), wr(3, 0x01), ev(0, 0), rd(0, 0x14), wr(1, 0x01), rd(0), rd(4, 0x10),
        wr(5, 0x14), wr(5, 0x34), rd(4, 0x10)))


if __name__ == "__main__":
    serial()
    cmos()
    i8042()
    acpi_pm()
    vcpu_exit()
    kernel_loader()
    insn_fallback()
    pci()
    virtqueues()
