//! Tiny hand-made 64-bit guests (for [`crate::tiny_elf`]) that poke at one corner of the VMM each,
//! report on COM1 and reset through the i8042.

/// Where a reference points: a code label or a data item.
#[derive(Clone, Copy)]
enum Target {
    Label(&'static str),
    Data(usize),
}

/// A reference to patch once the layout is known.
enum Fixup {
    /// A rel32 field in the code at `at`.
    Rel32 { at: usize, to: Target },
    /// The 64-bit absolute address of `to` at `offset` in data item `item`.
    Abs64 {
        item: usize,
        offset: usize,
        to: Target,
    },
    /// The handler address of a 64-bit interrupt gate at `offset` in data item `item`.
    Gate {
        item: usize,
        offset: usize,
        to: Target,
    },
}

/// 64-bit code, loaded at [`crate::TINY_LOAD`], with labels and data placed after the code.
struct Asm {
    code: Vec<u8>,
    labels: Vec<(&'static str, usize)>,
    fixups: Vec<Fixup>,
    data: Vec<Vec<u8>>,
}

impl Asm {
    fn new() -> Self {
        Asm {
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
            data: Vec::new(),
        }
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.code.len()));
        self
    }

    /// Adds a data item placed after the code; returns its index.
    fn data(&mut self, bytes: &[u8]) -> usize {
        self.data.push(bytes.to_vec());
        self.data.len() - 1
    }

    /// `bytes` followed by a rel32 field pointing at `to` (a rip-relative operand or a jump).
    fn rel32(&mut self, bytes: &[u8], to: Target) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self.fixups.push(Fixup::Rel32 {
            at: self.code.len(),
            to,
        });
        self.code.extend_from_slice(&[0; 4]);
        self
    }

    /// `lea <reg>, [rip + data item]`, `modrm_reg` 6 for rsi, 7 for rdi.
    fn lea(&mut self, modrm_reg: u8, item: usize) -> &mut Self {
        self.rel32(&[0x48, 0x8d, 0x05 | (modrm_reg << 3)], Target::Data(item))
    }

    /// `jne label` (rel32).
    fn jne(&mut self, label: &'static str) -> &mut Self {
        self.rel32(&[0x0f, 0x85], Target::Label(label))
    }

    /// `jmp label` (rel32).
    fn jmp(&mut self, label: &'static str) -> &mut Self {
        self.rel32(&[0xe9], Target::Label(label))
    }

    /// `mov ecx, value`
    fn ecx(&mut self, value: u32) -> &mut Self {
        self.code.push(0xb9);
        self.code.extend_from_slice(&value.to_le_bytes());
        self
    }

    /// `mov dx, port`
    fn dx(&mut self, port: u16) -> &mut Self {
        self.code.extend_from_slice(&[0x66, 0xba]);
        self.code.extend_from_slice(&port.to_le_bytes());
        self
    }

    /// Prints `text` on COM1 one `out` at a time (`lodsb; out dx, al; loop`).
    fn print(&mut self, text: &str) -> &mut Self {
        let item = self.data(text.as_bytes());
        self.dx(0x3f8).lea(6, item).ecx(text.len() as u32);
        self.bytes(&[0xac, 0xee, 0xe2, 0xfc])
    }

    /// Pulses the i8042 reset line, then halts for good.
    fn reset(&mut self) -> &mut Self {
        self.bytes(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd])
    }

    fn finish(&self) -> Vec<u8> {
        let mut out = self.code.clone();
        let mut at = Vec::with_capacity(self.data.len());
        for item in &self.data {
            // 16-byte aligned, as a descriptor table wants.
            out.resize(out.len().next_multiple_of(16), 0x90);
            at.push(out.len());
            out.extend_from_slice(item);
        }
        let offset = |to: Target| match to {
            Target::Data(item) => at[item],
            Target::Label(name) => {
                self.labels
                    .iter()
                    .find(|(label, _)| *label == name)
                    .unwrap_or_else(|| panic!("no label {name}"))
                    .1
            }
        };
        let absolute = |to: Target| crate::TINY_LOAD + offset(to) as u64;
        for fixup in &self.fixups {
            match *fixup {
                Fixup::Rel32 { at: field, to } => {
                    let rel = (offset(to) as i64 - (field as i64 + 4)) as i32;
                    out[field..field + 4].copy_from_slice(&rel.to_le_bytes());
                }
                Fixup::Abs64 {
                    item,
                    offset: o,
                    to,
                } => {
                    let field = at[item] + o;
                    out[field..field + 8].copy_from_slice(&absolute(to).to_le_bytes());
                }
                Fixup::Gate {
                    item,
                    offset: o,
                    to,
                } => {
                    let handler = absolute(to);
                    let field = at[item] + o;
                    out[field..field + 2].copy_from_slice(&(handler as u16).to_le_bytes());
                    out[field + 6..field + 8]
                        .copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
                    out[field + 8..field + 12]
                        .copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
                }
            }
        }
        out
    }
}

/// What [`string_port_io`] prints with `rep outsb`.
pub const STRING_OUT_MARKER: &str = "string io: rep outsb reached the console";
/// What [`string_port_io`] prints after its `rep insb`: the four bytes read, which are the
/// UART scratch register's `Z` each when every element was read from the port.
pub const STRING_IN_PREFIX: &str = "rep insb read: ";

/// String port I/O in ring 0: `rep outsb` of [`STRING_OUT_MARKER`] to COM1, then `Z` into the
/// UART's scratch register (0x3ff) and `rep insb` of 4 bytes from it into a buffer preset to
/// `....`, printed after [`STRING_IN_PREFIX`] with plain `out`s.
pub fn string_port_io() -> Vec<u8> {
    let mut asm = Asm::new();
    let out_msg = format!("{STRING_OUT_MARKER}\n");
    let out_item = asm.data(out_msg.as_bytes());
    let in_msg = format!("{STRING_IN_PREFIX}....\n");
    let in_item = asm.data(in_msg.as_bytes());
    asm.dx(0x3f8).lea(6, out_item).ecx(out_msg.len() as u32);
    asm.bytes(&[0xfc, 0xf3, 0x6e]); // cld; rep outsb
    asm.dx(0x3ff).bytes(&[0xb0, b'Z', 0xee]); // mov al, 'Z'; out dx, al
    asm.lea(7, in_item);
    asm.bytes(&[0x48, 0x83, 0xc7, STRING_IN_PREFIX.len() as u8]); // add rdi, prefix length
    asm.ecx(4).bytes(&[0xf3, 0x6c]); // rep insb
                                     // Print the line, buffer included, with plain `out`s.
    asm.dx(0x3f8).lea(6, in_item).ecx(in_msg.len() as u32);
    asm.bytes(&[0xac, 0xee, 0xe2, 0xfc]).reset();
    asm.finish()
}

/// What the #PF handler of [`faults_in_the_guest`] prints when the write to the read-only page
/// faulted as it should (error code: present, write; CR2 the page) and left the page unchanged.
pub const PF_MARKER: &str = "guest: #PF on the read-only page, nothing written";
/// What its #UD handler prints when the fault came from ring 3.
pub const UD_MARKER: &str = "guest: #UD from ring 3 handled in ring 0";
/// What it prints after both faults, before it resets.
pub const STILL_RUNNING_MARKER: &str = "guest: still running after both faults";
/// Guest-physical address of the page [`faults_in_the_guest`] reads from ring 3: past the end of
/// RAM when the VM has less than 128 MiB, so that nothing backs it and KVM treats it as MMIO.
pub const FAULT_MMIO_ADDR: u32 = 0x0800_0000;
/// The page [`faults_in_the_guest`] makes read-only (the 2 MiB page at 2 MiB).
const READ_ONLY_ADDR: u32 = 0x0020_0000;
/// Ring 0's stack on entry from ring 3 (TSS.RSP0).
const KERNEL_STACK: u32 = 0x001f_f000;

/// A guest kernel in miniature that meets the faults the VMM's instruction fallback must raise
/// rather than end the VM (run it with `--memory 64M`):
///
/// 1. Ring 0 installs an IDT with #UD, #GP and #PF handlers, sets TSS.RSP0, CR0.WP and
///    CR4.OSFXSR, makes the 2 MiB page at 2 MiB read-only and the first 2 MiB and the (unbacked)
///    page at [`FAULT_MMIO_ADDR`] user-accessible.
/// 2. Ring 0 runs `stmxcsr` into the read-only page: on kvm-pvm KVM's emulator cannot run it, so the
///    fallback does, and must raise #PF (present, write) without writing. The #PF handler checks
///    the error code, CR2 and the page, prints [`PF_MARKER`] and goes on to 3.
/// 3. Ring 0 drops to ring 3 (`sysretq`), which runs `popcnt rax, [FAULT_MMIO_ADDR]`: KVM's
///    emulator lacks `popcnt`, and the fallback cannot read a device page, so the guest must get
///    #UD. The #UD handler checks that it came from ring 3, prints [`UD_MARKER`] and
///    [`STILL_RUNNING_MARKER`], and resets.
///
/// Any other outcome prints a line saying what went wrong and resets.
pub fn faults_in_the_guest() -> Vec<u8> {
    let mut asm = Asm::new();
    // IDT: 16 gates, of which #UD (6), #GP (13) and #PF (14) are present: 64-bit interrupt gates,
    // code selector 0x10, DPL 0. IDTR: limit, then the base.
    let mut idt = vec![0u8; 16 * 16];
    for vector in [6usize, 13, 14] {
        let gate = &mut idt[vector * 16..];
        gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        gate[5] = 0x8e;
    }
    let idt_item = asm.data(&idt);
    for (vector, handler) in [(6, "ud"), (13, "gp"), (14, "pf")] {
        asm.fixups.push(Fixup::Gate {
            item: idt_item,
            offset: vector * 16,
            to: Target::Label(handler),
        });
    }
    let mut idtr = vec![0u8; 10];
    idtr[..2].copy_from_slice(&(16u16 * 16 - 1).to_le_bytes());
    let idtr_item = asm.data(&idtr);
    asm.fixups.push(Fixup::Abs64 {
        item: idtr_item,
        offset: 2,
        to: Target::Data(idt_item),
    });

    // 1. Ring 0 set-up.
    asm.rel32(&[0x0f, 0x01, 0x1d], Target::Data(idtr_item)); // lidt [rip + idtr]
    asm.bytes(&[0x48, 0xc7, 0x04, 0x25, 0x04, 0x00, 0x00, 0x00]); // mov qword [4], imm32:
    asm.bytes(&KERNEL_STACK.to_le_bytes()); // TSS.RSP0 (the boot TSS is at 0)
    asm.bytes(&[
        0x0f, 0x20, 0xc0, 0x48, 0x0d, 0x00, 0x00, 0x01, 0x00, 0x0f, 0x22, 0xc0,
    ]); // CR0.WP
    asm.bytes(&[
        0x0f, 0x20, 0xe0, 0x48, 0x0d, 0x00, 0x02, 0x00, 0x00, 0x0f, 0x22, 0xe0,
    ]); // CR4.OSFXSR
        // The page directory of the first GiB through CR3: user bit on PML4[0] and PDPT[0].
    asm.bytes(&[0x0f, 0x20, 0xd8]); // mov rax, cr3
    for _ in 0..2 {
        asm.bytes(&[
            0x48, 0x25, 0x00, 0xf0, 0xff, 0xff, // and rax, ~0xfff
            0x48, 0x83, 0x08, 0x04, // or qword [rax], 4
            0x48, 0x8b, 0x00, // mov rax, [rax]
        ]);
    }
    asm.bytes(&[0x48, 0x25, 0x00, 0xf0, 0xff, 0xff, 0x48, 0x89, 0xc3]); // and rax, ~0xfff; mov rbx, rax
    asm.bytes(&[0x48, 0x83, 0x0b, 0x04]); // or qword [rbx], 4: PD[0] user
    asm.bytes(&[0x48, 0x83, 0x63, 0x08, 0xfd]); // and qword [rbx + 8], ~2: PD[1] read-only
    let pde = (FAULT_MMIO_ADDR >> 21) * 8;
    asm.bytes(&[0x48, 0x83, 0x8b]); // or qword [rbx + PD index of the MMIO page], 4
    asm.bytes(&pde.to_le_bytes()).bytes(&[0x04]);
    asm.bytes(&[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]); // flush the TLB

    // 2. stmxcsr [READ_ONLY_ADDR]: the #PF handler goes on at `ring3`.
    asm.bytes(&[0x0f, 0xae, 0x1c, 0x25]);
    asm.bytes(&READ_ONLY_ADDR.to_le_bytes());
    asm.print("guest: stmxcsr wrote to a read-only page\n")
        .reset();

    // 3. Ring 3, with IOPL 3 and interrupts off.
    asm.label("ring3");
    asm.bytes(&[
        0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, EFER
        0x0f, 0x32, // rdmsr
        0x83, 0xc8, 0x01, // or eax, 1 (SCE)
        0x0f, 0x30, // wrmsr
        0xb9, 0x81, 0x00, 0x00, 0xc0, // mov ecx, STAR
        0x31, 0xc0, // xor eax, eax
        0xba, 0x00, 0x00, 0x10, 0x00, // mov edx, 0x100000: sysret selectors from 0x10
        0x0f, 0x30, // wrmsr
    ]);
    asm.rel32(&[0x48, 0x8d, 0x0d], Target::Label("user")); // lea rcx, [rip + user]
    asm.bytes(&[0x41, 0xbb, 0x02, 0x30, 0x00, 0x00]); // mov r11d, 0x3002
    asm.bytes(&[0x48, 0x0f, 0x07]); // sysretq
    asm.label("user");
    asm.bytes(&[0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25]); // popcnt rax, [FAULT_MMIO_ADDR]
    asm.bytes(&FAULT_MMIO_ADDR.to_le_bytes());
    asm.print("guest: popcnt on a device page did not fault\n")
        .reset();

    // #PF: error code 3 (present, write), CR2 the read-only page, the page still zero.
    asm.label("pf");
    asm.bytes(&[0x48, 0x8b, 0x04, 0x24, 0x48, 0x83, 0xf8, 0x03]); // mov rax, [rsp]; cmp rax, 3
    asm.jne("bad");
    asm.bytes(&[0x0f, 0x20, 0xd0, 0x48, 0x3d]); // mov rax, cr2; cmp rax, imm32
    asm.bytes(&READ_ONLY_ADDR.to_le_bytes());
    asm.jne("bad");
    asm.bytes(&[0x83, 0x3c, 0x25]); // cmp dword [READ_ONLY_ADDR], 0
    asm.bytes(&READ_ONLY_ADDR.to_le_bytes()).bytes(&[0x00]);
    asm.jne("bad");
    asm.print(&format!("{PF_MARKER}\n")).jmp("ring3");

    // #UD: the interrupted CS (after RIP on the stack) must be a ring-3 selector.
    asm.label("ud");
    asm.bytes(&[
        0x48, 0x8b, 0x44, 0x24, 0x08, 0x83, 0xe0, 0x03, 0x83, 0xf8, 0x03,
    ]); // mov rax, [rsp+8]; and eax, 3; cmp eax, 3
    asm.jne("bad");
    asm.print(&format!("{UD_MARKER}\n"));
    asm.print(&format!("{STILL_RUNNING_MARKER}\n")).reset();

    asm.label("gp");
    asm.print("guest: unexpected #GP\n").reset();
    asm.label("bad");
    asm.print("guest: the fault is not the one expected\n")
        .reset();
    asm.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rip_relative_references_land_on_their_data() {
        let code = string_port_io();
        // The first lea (after `mov dx, 0x3f8`) points at the rep outsb message.
        assert_eq!(&code[4..7], &[0x48, 0x8d, 0x35]);
        let rel = i32::from_le_bytes(code[7..11].try_into().unwrap()) as usize;
        assert!(code[11 + rel..].starts_with(STRING_OUT_MARKER.as_bytes()));
        let tail = format!("{STRING_IN_PREFIX}....\n");
        let pos = code
            .windows(tail.len())
            .position(|w| w == tail.as_bytes())
            .unwrap();
        assert_eq!(pos % 16, 0, "data items are 16-byte aligned");
    }

    #[test]
    fn fault_guest_gates_point_at_their_handlers() {
        let code = faults_in_the_guest();
        // The IDTR follows the 256-byte IDT; its base is the IDT's absolute address.
        let lidt = code
            .windows(3)
            .position(|w| w == [0x0f, 0x01, 0x1d])
            .unwrap();
        let rel = i32::from_le_bytes(code[lidt + 3..lidt + 7].try_into().unwrap());
        let idtr = (lidt as i64 + 7 + i64::from(rel)) as usize;
        assert_eq!(u16::from_le_bytes([code[idtr], code[idtr + 1]]), 255);
        let base = u64::from_le_bytes(code[idtr + 2..idtr + 10].try_into().unwrap());
        let idt = (base - crate::TINY_LOAD) as usize;
        for vector in [6, 13, 14] {
            let gate = &code[idt + vector * 16..][..16];
            assert_eq!((gate[2], gate[5]), (0x10, 0x8e), "vector {vector}");
            let handler = u64::from(u16::from_le_bytes([gate[0], gate[1]]))
                | u64::from(u16::from_le_bytes([gate[6], gate[7]])) << 16;
            let at = (handler - crate::TINY_LOAD) as usize;
            // Each handler starts with `mov rax, [rsp...]` or a print (`mov dx, 0x3f8`).
            assert!(
                code[at..].starts_with(&[0x48, 0x8b]) || code[at..].starts_with(&[0x66, 0xba]),
                "vector {vector}"
            );
        }
        assert_eq!(code[idt + 7 * 16 + 5], 0, "vector 7 is not present");
    }
}
