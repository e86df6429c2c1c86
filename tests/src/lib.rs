//! Helpers for the integration tests: spawn the `vmm` binary, talk to the guest over its serial
//! console as a person would, and fail with the console log when something goes wrong.

pub mod bench;
pub mod bench_guest;
pub mod guests;
pub mod netns;
pub mod startup_layout;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a Linux boot may take to its init marker before a test gives up: generous, because
/// where KVM emulates the guest kernel a stock kernel needs many minutes. `VMM_TEST_BOOT_TIMEOUT`
/// (seconds) overrides it.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("VMM_TEST_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(55 * 60);
    Duration::from_secs(secs)
}

/// A command in the guest's shell: user space runs natively even where the kernel is emulated, but
/// every system call runs in the emulated kernel.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// The marker the guest-kit `/init` prints before it starts the shell.
pub const INIT_READY: &str = "vmm-guest: init ready";

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// Makes `command`'s process stop at its `exec`, traced by this one (`PTRACE_TRACEME`): the bench
/// reads a VMM's peak memory when it exits, `vmm-startup-layout` single-steps one.
pub fn trace_from_exec(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and makes one system call,
    // PTRACE_TRACEME, which is async-signal-safe; the child then stops at its exec.
    unsafe {
        command.pre_exec(|| {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0usize, 0usize) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// The `vmm` binary under test: `$VMM_BIN`, or the one cargo built beside this test.
pub fn vmm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("VMM_BIN") {
        return PathBuf::from(path);
    }
    // target/<profile>/deps/<test-exe> -> target/<profile>/vmm
    let exe = std::env::current_exe().expect("the test knows its own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let vmm = profile_dir.join("vmm");
    assert!(
        vmm.exists(),
        "the vmm binary is missing at {}: run `cargo build -p vmm` first (the README's test command does)",
        vmm.display()
    );
    vmm
}

/// Whether KVM tests can run. Without /dev/kvm they fail with a clear message, unless
/// `VMM_TESTS_SKIP_KVM=1` asks to report them as skipped.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var("VMM_TESTS_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: /dev/kvm is missing and VMM_TESTS_SKIP_KVM=1");
        return false;
    }
    panic!("{test} needs /dev/kvm, which is missing (set VMM_TESTS_SKIP_KVM=1 to skip KVM tests)");
}

/// A guest file built by `scripts/guest-kit` (`stock`, `cloud`, `microvm`, `microvm-elf`,
/// `initramfs`).
pub fn guest_file(what: &str) -> PathBuf {
    let script = workspace_root().join("scripts/guest-kit");
    let out = Command::new(&script)
        .args(["path", what])
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "scripts/guest-kit path {what} failed ({})",
        out.status
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.exists(),
        "guest-kit gave {} which does not exist",
        path.display()
    );
    path
}

/// Bytes a reader thread collects, with a condition variable to wait for new ones.
#[derive(Default)]
struct Captured {
    bytes: Mutex<(Vec<u8>, bool)>,
    grew: Condvar,
}

fn capture(mut from: impl Read + Send + 'static, into: Arc<Captured>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let mut guard = into.bytes.lock().unwrap();
            if n == 0 {
                guard.1 = true;
                into.grew.notify_all();
                return;
            }
            guard.0.extend_from_slice(&buf[..n]);
            into.grew.notify_all();
        }
    });
}

/// A running `vmm` process and its guest's console.
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Captured>,
    log: Arc<Captured>,
    /// Where in the console output the next `wait_for` starts looking.
    cursor: usize,
    started: Instant,
}

static MARKERS: AtomicU32 = AtomicU32::new(0);

impl Guest {
    /// Starts `vmm` with `args`, the console on pipes, logging at `$RUST_LOG` or else info.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Guest {
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        Guest::spawn_logging(args, &log)
    }

    /// Starts `vmm` with `args` and `RUST_LOG=log`, for a test that reads a given log line.
    pub fn spawn_logging<S: AsRef<std::ffi::OsStr>>(args: &[S], log: &str) -> Guest {
        let mut command = Command::new(vmm_binary());
        command.args(args).env("RUST_LOG", log);
        Guest::spawn_command(command)
    }

    /// Starts `vmm` with `args` inside the network namespace `netns` (through `ip netns exec`,
    /// which execs the VMM in place, so signals still reach it), logging at info.
    pub fn spawn_in_netns<S: AsRef<std::ffi::OsStr>>(netns: &str, args: &[S]) -> Guest {
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(vmm_binary())
            .args(args)
            .env("RUST_LOG", log);
        Guest::spawn_command(command)
    }

    /// Starts `program` (a VMM built on the `vmm` crate, as `examples/fixed-entropy` is) with
    /// `args`, logging at info.
    pub fn spawn_program<S: AsRef<std::ffi::OsStr>>(program: &Path, args: &[S]) -> Guest {
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        let mut command = Command::new(program);
        command.args(args).env("RUST_LOG", log);
        Guest::spawn_command(command)
    }

    fn spawn_command(mut command: Command) -> Guest {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the vmm binary");
        let console = Arc::new(Captured::default());
        let log = Arc::new(Captured::default());
        capture(child.stdout.take().unwrap(), console.clone());
        capture(child.stderr.take().unwrap(), log.clone());
        Guest {
            stdin: child.stdin.take(),
            child,
            console,
            log,
            cursor: 0,
            started: Instant::now(),
        }
    }

    /// Everything the guest printed so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&self.console.bytes.lock().unwrap().0).into_owned()
    }

    /// Everything the VMM logged so far.
    pub fn vmm_log(&self) -> String {
        String::from_utf8_lossy(&self.log.bytes.lock().unwrap().0).into_owned()
    }

    /// Time since the VMM was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The console and the VMM log, for failure messages.
    pub fn transcript(&self) -> String {
        let console = self.console();
        let tail: String = {
            let chars: Vec<char> = console.chars().collect();
            let from = chars.len().saturating_sub(6000);
            chars[from..].iter().collect()
        };
        format!(
            "\n----- guest console (last 6000 chars) -----\n{tail}\n----- vmm log -----\n{}\n-----",
            self.vmm_log()
        )
    }

    /// Waits until `needle` appears in the console after what earlier waits consumed; returns the
    /// text between the previous position and the end of `needle`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut guard = self.console.bytes.lock().unwrap();
        loop {
            let hay = &guard.0[self.cursor.min(guard.0.len())..];
            if let Some(pos) = find(hay, needle.as_bytes()) {
                let end = self.cursor + pos + needle.len();
                let text = String::from_utf8_lossy(&guard.0[self.cursor..end]).into_owned();
                self.cursor = end;
                return text;
            }
            let now = Instant::now();
            if guard.1 || now >= deadline {
                let ended = guard.1;
                drop(guard);
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "{} waiting for {needle:?} after {:?} (vmm {}){}",
                    if ended { "console closed" } else { "timed out" },
                    self.started.elapsed(),
                    status.map_or("still running".to_string(), |s| format!("exited: {s}")),
                    self.transcript()
                );
            }
            guard = self
                .console
                .grew
                .wait_timeout(guard, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Types `line` and a newline on the guest's console.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Runs a shell command in the guest and returns what it printed (trimmed), as a person would
    /// read it between the prompt and the next prompt.
    pub fn run(&mut self, command: &str, timeout: Duration) -> String {
        let n = MARKERS.fetch_add(1, Ordering::Relaxed);
        // The echoed command line shows `@@B""n@@`; only the shell's output shows `@@Bn@@`.
        self.send(&format!("echo @@B\"\"{n}@@; {command}; echo @@E\"\"{n}@@"));
        self.wait_for(&format!("@@B{n}@@"), timeout);
        let out = self.wait_for(&format!("@@E{n}@@"), timeout);
        out.trim_end_matches(&format!("@@E{n}@@"))
            .replace('\r', "")
            .trim()
            .to_string()
    }

    /// The VMM's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the VMM process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to our own child process.
        let ret = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(ret, 0, "cannot signal the vmm");
    }

    /// Waits until the VMM's log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.vmm_log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the vmm log never showed {needle:?}{}",
                self.transcript()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the VMM to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid works") {
                // Let the reader threads drain the pipes.
                thread::sleep(Duration::from_millis(50));
                return status;
            }
            if Instant::now() >= deadline {
                panic!("vmm did not exit within {timeout:?}{}", self.transcript());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Runs `vmm` with `args` to completion (for the bad-input tests) and returns status, stdout, stderr.
pub fn run_vmm<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (ExitStatus, String, String) {
    let out = Command::new(vmm_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start the vmm binary");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Where the tiny guests are loaded and start: physical 1 MiB, the lowest address a kernel may use.
pub const TINY_LOAD: u64 = 0x10_0000;

/// A minimal ELF64 executable that loads `code` at physical 1 MiB and starts there: a "kernel"
/// for testing the VMM's boot path and vCPU loop without Linux. It has no PVH note, so the VMM
/// enters it through the 64-bit boot protocol (long mode, ring 0).
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    elf64(code, &[])
}

/// Like [`tiny_elf`], with the `XEN_ELFNOTE_PHYS32_ENTRY` note pointing at the code: a VMM (ours,
/// QEMU, Firecracker, Cloud Hypervisor) enters it through PVH, in 32-bit protected mode with paging
/// off, so `code` must be 32-bit code.
///
/// The note's descriptor is 8 bytes (the entry, zero-extended), as in a Linux vmlinux: QEMU reads
/// the 64-bit ELF's entry note as a 64-bit value.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // n_namesz: "Xen\0"
    note.extend_from_slice(&8u32.to_le_bytes()); // n_descsz
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&TINY_LOAD.to_le_bytes());
    elf64(code, &note)
}

/// An ELF64 x86-64 executable: one PT_LOAD of `code` at [`TINY_LOAD`], and a PT_NOTE of `note`
/// unless it is empty. The code follows the headers, the note follows the code.
fn elf64(code: &[u8], note: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum = 1 + usize::from(!note.is_empty());
    let code_offset = (EHDR + phnum * PHDR) as u64;
    let note_offset = code_offset + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&TINY_LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&(EHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR as u16).to_le_bytes());
    elf.extend_from_slice(&(phnum as u16).to_le_bytes());
    elf.extend_from_slice(&64u16.to_le_bytes()); // shentsize
    elf.extend_from_slice(&0u16.to_le_bytes()); // shnum
    elf.extend_from_slice(&0u16.to_le_bytes()); // shstrndx
    assert_eq!(elf.len(), EHDR);
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    elf.extend_from_slice(&code_offset.to_le_bytes());
    elf.extend_from_slice(&TINY_LOAD.to_le_bytes()); // vaddr
    elf.extend_from_slice(&TINY_LOAD.to_le_bytes()); // paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    if !note.is_empty() {
        elf.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        elf.extend_from_slice(&4u32.to_le_bytes()); // R
        elf.extend_from_slice(&note_offset.to_le_bytes());
        elf.extend_from_slice(&0u64.to_le_bytes()); // vaddr
        elf.extend_from_slice(&0u64.to_le_bytes()); // paddr
        elf.extend_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&4u64.to_le_bytes()); // notes are 4-byte aligned
    }
    elf.extend_from_slice(code);
    elf.extend_from_slice(note);
    elf
}

/// The port of QEMU's `isa-debug-exit` device as the bench configures it
/// (`-device isa-debug-exit,iobase=0xf4,iosize=4`). Our VMM has nothing there and ignores writes.
pub const DEBUG_EXIT_PORT: u8 = 0xf4;

/// 32-bit code for [`pvh_elf`], loaded at [`TINY_LOAD`]: writes `message` to COM1, writes 0 to
/// [`DEBUG_EXIT_PORT`] (QEMU then exits with status 1), then pulses the i8042 reset line (our VMM
/// then exits with status 0), then halts.
pub fn pvh_hello_then_exit(message: &[u8]) -> Vec<u8> {
    pvh_hello_then(
        message,
        &[
            0x31,
            0xc0, // xor eax, eax
            0xe6,
            DEBUG_EXIT_PORT, // out 0xf4, al: QEMU's isa-debug-exit
            0xb0,
            0xfe, // mov al, 0xfe
            0xe6,
            0x64, // out 0x64, al: i8042 pulse reset line
        ],
    )
}

/// [`pvh_hello_then_exit`] for Cloud Hypervisor, which restarts its guest on an i8042 reset:
/// after `message` it writes S5 to Cloud Hypervisor's ACPI sleep control register (port 0x600,
/// one byte: `SLP_TYP` 5 in bits 4:2 and `SLP_EN`, bit 5; ACPI 6.5, 4.8.3.7), which ends it with
/// status 0, then halts.
pub fn pvh_hello_then_acpi_off(message: &[u8]) -> Vec<u8> {
    pvh_hello_then(
        message,
        &[
            0x66, 0xba, 0x00, 0x06, // mov dx, 0x600
            0xb0, 0x34, // mov al, 5 << 2 | 1 << 5
            0xee, // out dx, al
        ],
    )
}

/// Writes `message` to COM1, runs `exit`, then halts; the message follows the code.
fn pvh_hello_then(message: &[u8], exit: &[u8]) -> Vec<u8> {
    // The message loop, and the halt loop after `exit`.
    const LOOP_LEN: usize = 18;
    const HALT_LEN: usize = 3;
    let message_addr = TINY_LOAD as u32 + (LOOP_LEN + exit.len() + HALT_LEN) as u32;
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.push(0xbe); // mov esi, imm32 (the message)
    code.extend_from_slice(&message_addr.to_le_bytes());
    code.push(0xb9); // mov ecx, imm32
    code.extend_from_slice(&(message.len() as u32).to_le_bytes());
    code.extend_from_slice(&[
        0xac, // lodsb
        0xee, // out dx, al
        0xe2, 0xfc, // loop back to lodsb
    ]);
    assert_eq!(code.len(), LOOP_LEN);
    code.extend_from_slice(exit);
    code.extend_from_slice(&[
        0xf4, // hlt
        0xeb, 0xfd, // jmp back to hlt
    ]);
    code.extend_from_slice(message);
    code
}

/// The line the tiny PVH guest of the tests and the bench prints.
pub const TINY_PVH_MARKER: &str = "tiny pvh guest: hello";

/// How the bench runs our VMM on a tiny guest: 128 MiB, info-level logging (for its `first
/// KVM_RUN after` line), `RUST_LOG` left out. `vmm-startup-layout` traces this same command, so
/// that the start-up layout is that of the run the bench measures.
pub fn tiny_guest_command(vmm: &Path, guest: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(vmm);
    command
        .arg("--kernel")
        .arg(guest)
        .args(["--memory", "128M", "--log-level", "info"])
        .args(extra)
        .env_remove("RUST_LOG");
    command
}

/// The tiny PVH guest the project ships: [`pvh_elf`] of [`pvh_hello_then_exit`] printing
/// [`TINY_PVH_MARKER`].
pub fn tiny_pvh_guest() -> Vec<u8> {
    pvh_elf(&pvh_hello_then_exit(
        format!("{TINY_PVH_MARKER}\n").as_bytes(),
    ))
}

/// The tiny PVH guest for Cloud Hypervisor: the same marker, then ACPI soft-off
/// ([`pvh_hello_then_acpi_off`]).
pub fn tiny_pvh_guest_acpi_off() -> Vec<u8> {
    pvh_elf(&pvh_hello_then_acpi_off(
        format!("{TINY_PVH_MARKER}\n").as_bytes(),
    ))
}

/// The tiny guest for kvmtool, which loads no PVH ELF: the same marker and i8042 reset as
/// [`tiny_pvh_guest`], as a flat binary of 16-bit real-mode code, which kvmtool loads at
/// 1000:0000 and enters there (its `load_flat_binary`). kvmtool ends with status 0 on the reset.
pub fn tiny_flat_guest() -> Vec<u8> {
    real_mode_hello_then_reset(format!("{TINY_PVH_MARKER}\n").as_bytes())
}

/// 16-bit code, loaded at offset 0 of its code segment: writes `message` to COM1, pulses the
/// i8042 reset line, then halts; the message follows the code.
fn real_mode_hello_then_reset(message: &[u8]) -> Vec<u8> {
    const CODE_LEN: u16 = 23;
    let mut code = vec![
        0x0e, // push cs
        0x1f, // pop ds: the message is addressed from the code segment
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xbe, // mov si, imm16 (the message)
    ];
    code.extend_from_slice(&CODE_LEN.to_le_bytes());
    code.push(0xb9); // mov cx, imm16
    code.extend_from_slice(
        &u16::try_from(message.len())
            .expect("a short message")
            .to_le_bytes(),
    );
    code.push(0xfc); // cld
    code.extend_from_slice(&PRINT_THEN_RESET);
    assert_eq!(code.len(), usize::from(CODE_LEN));
    code.extend_from_slice(message);
    code
}

/// 64-bit ring-0 code that makes the first 2 MiB user-accessible and drops to ring 3 with IOPL 3
/// and interrupts off; the ring-3 code follows it.
fn ring3_entry() -> Vec<u8> {
    let mut code = Vec::new();
    // User bit on PML4[0], PDPT[0] and PD[0], found through CR3.
    code.extend_from_slice(&[0x0f, 0x20, 0xd8]); // mov rax, cr3
    for _ in 0..3 {
        code.extend_from_slice(&[
            0x48, 0x25, 0x00, 0xf0, 0xff, 0xff, // and rax, ~0xfff
            0x48, 0x83, 0x08, 0x04, // or qword [rax], 4
            0x48, 0x8b, 0x00, // mov rax, [rax]
        ]);
    }
    code.extend_from_slice(&[
        0x0f, 0x20, 0xd8, // mov rax, cr3
        0x0f, 0x22, 0xd8, // mov cr3, rax: flush the TLB
        0xb9, 0x80, 0x00, 0x00, 0xc0, // mov ecx, EFER
        0x0f, 0x32, // rdmsr
        0x83, 0xc8, 0x01, // or eax, 1 (SCE)
        0x0f, 0x30, // wrmsr
        0xb9, 0x81, 0x00, 0x00, 0xc0, // mov ecx, STAR
        0x31, 0xc0, // xor eax, eax
        0xba, 0x00, 0x00, 0x10, 0x00, // mov edx, 0x100000: sysret selectors from 0x10
        0x0f, 0x30, // wrmsr
        0x48, 0x8d, 0x0d, 0x09, 0x00, 0x00, 0x00, // lea rcx, [rip + 9]: the ring-3 code
        0x41, 0xbb, 0x02, 0x30, 0x00, 0x00, // mov r11d, 0x3002: IOPL 3, interrupts off
        0x48, 0x0f, 0x07, // sysretq
    ]);
    code
}

/// The relative displacement of a short jump whose displacement byte is the next one in `code`.
fn rel8(code: &[u8], target: usize) -> u8 {
    let next = code.len() as isize + 1;
    i8::try_from(target as isize - next).expect("a short jump") as u8
}

/// The line prefix [`ring3_counter`] prints before each count.
pub const COUNTER_PREFIX: char = 'T';

/// 64-bit code for [`tiny_elf`] that counts forever in ring 3 and prints each count on COM1 as
/// `T` and 8 hex digits (`T00000001`, `T00000002`, ...), spinning `delay` iterations between
/// lines: a guest whose console shows whether it runs (pause, resume).
pub fn ring3_counter(delay: u32) -> Vec<u8> {
    let mut code = ring3_entry();
    code.extend_from_slice(&[0x31, 0xdb]); // xor ebx, ebx
    let top = code.len();
    code.extend_from_slice(&[
        0xff,
        0xc3, // inc ebx
        0x66,
        0xba,
        0xf8,
        0x03, // mov dx, 0x3f8
        0xb0,
        COUNTER_PREFIX as u8, // mov al, 'T'
        0xee,                 // out dx, al
        0xb9,
        0x08,
        0x00,
        0x00,
        0x00, // mov ecx, 8
        0x89,
        0xde, // mov esi, ebx
    ]);
    let digit = code.len();
    code.extend_from_slice(&[
        0xc1, 0xc6, 0x04, // rol esi, 4: the next nibble to the bottom
        0x89, 0xf0, // mov eax, esi
        0x83, 0xe0, 0x0f, // and eax, 15
        0x04, b'0', // add al, '0'
        0x3c, b'9', // cmp al, '9'
        0x76, 0x02, // jbe past the next add
        0x04, 0x07, // add al, 'A' - '9' - 1
        0xee, // out dx, al
        0xff, 0xc9, // dec ecx
        0x75, // jnz digit
    ]);
    code.push(rel8(&code, digit));
    code.extend_from_slice(&[
        0xb0, b'\n', // mov al, '\n'
        0xee,  // out dx, al
        0xb9,  // mov ecx, delay
    ]);
    code.extend_from_slice(&delay.max(1).to_le_bytes());
    code.extend_from_slice(&[
        0xff, 0xc9, // dec ecx
        0x75, 0xfc, // jnz back to dec
        0xeb, // jmp top
    ]);
    code.push(rel8(&code, top));
    code
}

/// 64-bit code for [`tiny_elf`] that leaves ring 0 for ring 3 and there writes `port` `count`
/// times, then writes `message` to COM1 and resets through the i8042.
///
/// Where KVM emulates ring 0 (kvm-pvm), ring 3 runs natively, so each write costs exactly one
/// exit round trip through the VMM: this measures the VMM's exit turnaround, as
/// `tests/bench/exit-loop.c` does for a bare C loop. Ring 0 only sets the user bit on the
/// page-table entries that map the first 2 MiB (the boot tables the VMM built), enables `syscall`
/// in EFER so that `sysretq` works, and drops to ring 3 with IOPL 3 so that ring 3 may do port
/// I/O: a dozen emulated instructions.
pub fn ring3_port_loop(count: u32, port: u16, message: &[u8]) -> Vec<u8> {
    let mut code = ring3_entry();
    // Ring 3.
    code.push(0xb9); // mov ecx, count
    code.extend_from_slice(&count.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba]); // mov dx, port
    code.extend_from_slice(&port.to_le_bytes());
    code.extend_from_slice(&[
        0x85, 0xc9, // test ecx, ecx
        0x74, 0x05, // jz past the loop
        0xee, // out dx, al
        0xff, 0xc9, // dec ecx
        0x75, 0xfb, // jnz back to out
    ]);
    code.extend_from_slice(&hello_then_reset(message));
    code
}

/// Writes the `cx`/`ecx` bytes at `si`/`rsi` to the port in `dx`, pulses the i8042 reset line,
/// then halts: the same bytes in 16-bit and in 64-bit code.
const PRINT_THEN_RESET: [u8; 11] = [
    0xac, // lodsb
    0xee, // out dx, al
    0xe2, 0xfc, // loop back to lodsb
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al: i8042 pulse reset line
    0xf4, // hlt
    0xeb, 0xfd, // jmp back to hlt
];

/// 64-bit code that writes `message` to COM1 and then resets the machine through the i8042.
pub fn hello_then_reset(message: &[u8]) -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x48, 0x8d, 0x35, 0x10, 0x00, 0x00, 0x00, // lea rsi, [rip + 16] (the message)
        0xb9, // mov ecx, imm32
    ];
    code.extend_from_slice(&(message.len() as u32).to_le_bytes());
    code.extend_from_slice(&PRINT_THEN_RESET);
    code.extend_from_slice(message);
    code
}

/// The names of the threads of process `pid`, sorted.
pub fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("the threads of process {pid}: {e}"))
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    names.sort();
    names
}

/// The CPU time, in seconds, that the threads of process `pid` whose names start with `prefix`
/// have used so far (user and system time, from each thread's `/proc/PID/task/TID/stat`).
pub fn threads_cpu_secs(pid: u32, prefix: &str) -> f64 {
    let ticks: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("the threads of process {pid}: {e}"))
        .filter_map(|task| {
            let task = task.ok()?.path();
            let name = std::fs::read_to_string(task.join("comm")).ok()?;
            if !name.starts_with(prefix) {
                return None;
            }
            bench::parse_proc_stat_cpu(&std::fs::read_to_string(task.join("stat")).ok()?)
        })
        .map(|cpu| cpu.total)
        .sum();
    // SAFETY: sysconf reads a constant of the system and has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
    ticks as f64 / hz as f64
}

/// Writes `bytes` to a fresh file in a temporary directory and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_elf_has_a_valid_header() {
        let elf = tiny_elf(&[0xf4]);
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf.len(), 64 + 56 + 1);
        assert_eq!(
            u64::from_le_bytes(elf[24..32].try_into().unwrap()),
            0x10_0000
        );
    }

    /// Both tiny guests point `mov esi` at their message, which follows the halt loop.
    #[test]
    fn the_tiny_guests_find_their_message() {
        for code in [
            pvh_hello_then_exit(b"hi\n"),
            pvh_hello_then_acpi_off(b"hi\n"),
        ] {
            assert_eq!(code[4], 0xbe, "mov esi, imm32");
            let at = u32::from_le_bytes(code[5..9].try_into().unwrap()) as u64 - TINY_LOAD;
            assert_eq!(&code[at as usize..], b"hi\n");
            assert_eq!(&code[at as usize - 3..at as usize], [0xf4, 0xeb, 0xfd]);
        }
        let acpi = pvh_hello_then_acpi_off(b"x");
        assert!(acpi
            .windows(7)
            .any(|w| w == [0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee]));
    }

    /// kvmtool's flat guest points `mov si` at its message, prints it to COM1 and resets.
    #[test]
    fn the_flat_guest_finds_its_message() {
        let code = tiny_flat_guest();
        assert_eq!(code[5], 0xbe, "mov si, imm16");
        let at = usize::from(u16::from_le_bytes([code[6], code[7]]));
        assert_eq!(&code[at..], format!("{TINY_PVH_MARKER}\n").as_bytes());
        assert_eq!(code[8], 0xb9, "mov cx, imm16");
        assert_eq!(
            usize::from(u16::from_le_bytes([code[9], code[10]])),
            code.len() - at
        );
        assert_eq!(
            &code[at - 7..at],
            [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd]
        );
    }

    #[test]
    fn pvh_elf_has_the_xen_entry_note() {
        let elf = pvh_elf(&[0xf4]);
        assert_eq!(u16::from_le_bytes(elf[56..58].try_into().unwrap()), 2);
        // Second program header: PT_NOTE at the end of the file.
        let ph = 64 + 56;
        assert_eq!(u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()), 4);
        let off = u64::from_le_bytes(elf[ph + 8..ph + 16].try_into().unwrap()) as usize;
        let note = &elf[off..];
        assert_eq!(note.len(), 24);
        assert_eq!(u32::from_le_bytes(note[8..12].try_into().unwrap()), 18);
        assert_eq!(&note[12..16], b"Xen\0");
        assert_eq!(
            u64::from_le_bytes(note[16..24].try_into().unwrap()),
            TINY_LOAD
        );
        assert_eq!(elf[off - 1], 0xf4, "the code precedes the note");
    }

    #[test]
    fn pvh_hello_points_at_its_message() {
        let code = pvh_hello_then_exit(b"hi");
        let addr = u32::from_le_bytes(code[5..9].try_into().unwrap()) as u64;
        assert_eq!(&code[(addr - TINY_LOAD) as usize..], b"hi");
        assert_eq!(u32::from_le_bytes(code[10..14].try_into().unwrap()), 2);
    }

    #[test]
    fn ring3_loop_jumps_land_on_instructions() {
        let code = ring3_port_loop(7, 0x80, b"ok");
        // lea rcx, [rip + 9] skips mov r11d (6 bytes) and sysretq (3): the target is the
        // `mov ecx, count` right after sysretq.
        let lea = code
            .windows(3)
            .position(|w| w == [0x48, 0x8d, 0x0d])
            .unwrap();
        let disp = u32::from_le_bytes(code[lea + 3..lea + 7].try_into().unwrap()) as usize;
        let target = lea + 7 + disp;
        assert_eq!(&code[target - 3..target], &[0x48, 0x0f, 0x07]);
        assert_eq!(code[target], 0xb9);
        assert_eq!(
            u32::from_le_bytes(code[target + 1..target + 5].try_into().unwrap()),
            7
        );
        assert!(code.ends_with(b"ok"));
    }

    #[test]
    fn hello_code_points_at_its_message() {
        let code = hello_then_reset(b"hi");
        // lea's displacement is relative to the end of the lea (offset 11); the message follows the
        // 16 bytes of code from mov ecx onwards.
        let disp = u32::from_le_bytes(code[7..11].try_into().unwrap()) as usize;
        assert_eq!(&code[11 + disp..], b"hi");
    }
}
