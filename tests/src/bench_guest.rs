//! The bench guest (`tests/bench-guest/`): a PVH ELF whose ring-3 polling driver measures the
//! virtio-blk data path and prints one `bench: ...` line per figure on COM1. Built from source
//! with the machine's gcc (no binary is committed); the test command runs it once against our
//! VMM and `vmm-bench` runs it against ours and QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The flags the guest is built with: freestanding, no red zone (nothing may clobber the stack
/// below RSP) and no SSE (ring 3 has no FPU state set up by the stub).
pub const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
];

/// The guest's source directory in the workspace.
pub fn source_dir() -> PathBuf {
    crate::workspace_root().join("tests/bench-guest")
}

/// Compiles the guest into `out_dir` with `$CC` (default `gcc`) and returns the ELF's path, or
/// gcc's complaint.
pub fn build(out_dir: &Path) -> Result<PathBuf, String> {
    let src = source_dir();
    let out = out_dir.join("bench-guest.elf");
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    let output = Command::new(&cc)
        .args(CFLAGS)
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg(src.join("entry.S"))
        // attack.c is #included by bench.c: it shares the driver's statics.
        .arg(src.join("bench.c"))
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| format!("cannot run {cc}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{cc} failed to build the bench guest ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(out)
}

/// The word the guest expects at u64 index `word` (0..64) of 512-byte `sector` of the image
/// (`PATTERN` in bench.c).
pub fn pattern_word(sector: u64, word: u64) -> u64 {
    ((sector << 8) | word) ^ 0x5a5a_5a5a_0000_0000
}

/// Writes a disk image of `sectors` 512-byte sectors filled with [`pattern_word`].
pub fn write_pattern_image(path: &Path, sectors: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut sector_bytes = [0u8; 512];
    for sector in 0..sectors {
        for (word, chunk) in sector_bytes.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&pattern_word(sector, word as u64).to_le_bytes());
        }
        file.write_all(&sector_bytes)?;
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// The guest's command line: the tests to run and the seconds each takes.
pub fn cmdline(tests: &str, secs: f64) -> String {
    format!("bench.blk={tests} bench.secs={secs:.3}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_names_sector_and_word() {
        assert_eq!(pattern_word(0, 0), 0x5a5a_5a5a_0000_0000);
        assert_eq!(pattern_word(1, 2), 0x5a5a_5a5a_0000_0102);
        assert_ne!(pattern_word(7, 3), pattern_word(3, 7));
    }

    #[test]
    fn cmdline_has_both_parameters() {
        assert_eq!(
            cmdline("qd1,flush", 0.5),
            "bench.blk=qd1,flush bench.secs=0.500"
        );
    }
}
