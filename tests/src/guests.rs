//! Tiny hand-made 64-bit guests (for [`crate::tiny_elf`]) that poke at one corner of the VMM each,
//! report on COM1 and reset through the i8042.

/// Code that is assembled with rip-relative references to data placed after it.
struct Asm {
    code: Vec<u8>,
    /// (offset of a rel32 field, index of the data item it points at)
    fixups: Vec<(usize, usize)>,
    data: Vec<Vec<u8>>,
}

impl Asm {
    fn new() -> Self {
        Asm {
            code: Vec::new(),
            fixups: Vec::new(),
            data: Vec::new(),
        }
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    /// Adds a data item placed after the code; returns its index for [`Self::lea`].
    fn data(&mut self, bytes: &[u8]) -> usize {
        self.data.push(bytes.to_vec());
        self.data.len() - 1
    }

    /// `lea <reg>, [rip + data item]`, `modrm_reg` 6 for rsi, 7 for rdi.
    fn lea(&mut self, modrm_reg: u8, item: usize) -> &mut Self {
        self.code
            .extend_from_slice(&[0x48, 0x8d, 0x05 | (modrm_reg << 3)]);
        self.fixups.push((self.code.len(), item));
        self.code.extend_from_slice(&[0; 4]);
        self
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

    /// Prints data item `item` on COM1 one `out` at a time (`lodsb; out dx, al; loop`).
    fn print(&mut self, item: usize) -> &mut Self {
        let len = self.data[item].len() as u32;
        self.dx(0x3f8).lea(6, item).ecx(len);
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
            at.push(out.len());
            out.extend_from_slice(item);
        }
        for &(field, item) in &self.fixups {
            let rel = (at[item] as i64 - (field as i64 + 4)) as i32;
            out[field..field + 4].copy_from_slice(&rel.to_le_bytes());
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
    let out_msg = asm.data(format!("{STRING_OUT_MARKER}\n").as_bytes());
    let in_msg = asm.data(format!("{STRING_IN_PREFIX}....\n").as_bytes());
    let in_buf_offset = STRING_IN_PREFIX.len() as u32;
    let out_len = asm.data[out_msg].len() as u32;
    asm.dx(0x3f8).lea(6, out_msg).ecx(out_len);
    asm.bytes(&[0xfc, 0xf3, 0x6e]); // cld; rep outsb
    asm.dx(0x3ff).bytes(&[0xb0, b'Z', 0xee]); // mov al, 'Z'; out dx, al
    asm.lea(7, in_msg);
    asm.bytes(&[0x48, 0x83, 0xc7, in_buf_offset as u8]); // add rdi, prefix length
    asm.ecx(4).bytes(&[0xf3, 0x6c]); // rep insb
    asm.print(in_msg).reset();
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
        assert!(code.ends_with(format!("{STRING_IN_PREFIX}....\n").as_bytes()));
    }
}
