//! `vmm-startup-layout`: writes the linker script that gathers the code and read-only data `vmm`
//! touches at start.
//!
//! Run through `scripts/startup-layout`, which builds the release `vmm` with a linker map first.
//! Usage: `vmm-startup-layout --vmm PATH --map PATH --out PATH`
//!
//! It runs `vmm` on the bench's tiny guest as the bench does (start, one line on COM1, reset,
//! exit), three times, with every thread single-stepped under ptrace; records each instruction
//! address inside the binary and each address the instructions read or write there (their memory
//! operands, decoded with iced-x86, and a system call's arguments, for the strings the kernel
//! reads); finds the input section of each in the map and writes the script
//! (`integration_tests::startup_layout`). Single-stepping makes a run some 10,000 times slower
//! (seconds on a tiny guest); the code it runs is the same.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use integration_tests::startup_layout::{linker_script, parse_lld_map};
use integration_tests::{tiny_guest_command, tiny_pvh_guest, trace_from_exec};

/// Traced runs whose touches are merged: a few paths depend on timing (whether the console thread
/// sees its input before the guest ends).
const RUNS: usize = 3;

struct Options {
    vmm: PathBuf,
    map: PathBuf,
    out: PathBuf,
}

fn parse_options() -> Result<Options, String> {
    let mut vmm = None;
    let mut map = None;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.as_str() {
            "--vmm" => &mut vmm,
            "--map" => &mut map,
            "--out" => &mut out,
            _ => return Err(format!("vmm-startup-layout: unknown argument {arg:?}")),
        };
        *slot =
            Some(PathBuf::from(args.next().ok_or_else(|| {
                format!("vmm-startup-layout: {arg} needs a path")
            })?));
    }
    let usage = "usage: vmm-startup-layout --vmm PATH --map PATH --out PATH";
    Ok(Options {
        vmm: vmm.ok_or(usage)?,
        map: map.ok_or(usage)?,
        out: out.ok_or(usage)?,
    })
}

/// What a traced run touched inside the binary, as addresses of its linker map (relative to where
/// the binary is loaded), each once, in the order first touched: the instructions it ran and the
/// data its instructions read or wrote.
struct Trace {
    code: Vec<u64>,
    data: Vec<u64>,
    steps: u64,
    exit_status: i32,
}

/// Where the binary is loaded: the address of its file offset 0, its executable mapping, and the
/// end of its last mapping.
fn image_mappings(pid: libc::pid_t, binary: &Path) -> Result<Image, String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| format!("reading /proc/{pid}/maps: {e}"))?;
    let binary = binary.to_string_lossy();
    let mut base = None;
    let mut text = None;
    let mut end_of_image = 0;
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[5] != binary {
            continue;
        }
        let (start, end) = fields[0].split_once('-').ok_or("a malformed maps line")?;
        let parse = |s: &str| u64::from_str_radix(s, 16).map_err(|e| e.to_string());
        let (start, end, offset) = (parse(start)?, parse(end)?, parse(fields[2])?);
        base.get_or_insert(start - offset);
        end_of_image = end_of_image.max(end);
        if fields[1].contains('x') {
            text = Some((start, end));
        }
    }
    match (base, text) {
        (Some(base), Some(text)) => Ok(Image {
            base,
            text: text.0..text.1,
            all: base..end_of_image,
        }),
        _ => Err(format!("{binary} has no executable mapping in its process")),
    }
}

struct Image {
    base: u64,
    text: std::ops::Range<u64>,
    all: std::ops::Range<u64>,
}

fn ptrace(request: libc::c_uint, pid: libc::pid_t, addr: usize, data: usize) -> libc::c_long {
    // SAFETY: every request made through here (SETOPTIONS, SINGLESTEP) changes the state of a
    // traced child only; none writes to this process's memory.
    unsafe { libc::ptrace(request, pid, addr, data) }
}

fn trace(vmm: &Path, guest: &Path) -> Result<Trace, String> {
    let mut command = tiny_guest_command(vmm, guest, &[]);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    trace_from_exec(&mut command);
    let child = command
        .spawn()
        .map_err(|e| format!("starting {}: {e}", vmm.display()))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid || !libc::WIFSTOPPED(status) {
        return Err(format!("{} did not stop at its exec", vmm.display()));
    }
    let options = libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_EXITKILL;
    ptrace(libc::PTRACE_SETOPTIONS, pid, 0, options as usize);
    let canonical = vmm
        .canonicalize()
        .map_err(|e| format!("{}: {e}", vmm.display()))?;
    let image = image_mappings(pid, &canonical)?;
    // The child's memory, to read the instruction each thread is about to run.
    let memory = std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("opening /proc/{pid}/mem: {e}"))?;

    let mut decoded: HashMap<u64, Option<Instruction>> = HashMap::new();
    let (mut code_seen, mut data_seen) = (HashSet::new(), HashSet::new());
    let mut trace = Trace {
        code: Vec::new(),
        data: Vec::new(),
        steps: 0,
        exit_status: -1,
    };
    ptrace(libc::PTRACE_SINGLESTEP, pid, 0, 0);
    loop {
        let mut status = 0;
        // SAFETY: waits for any traced thread of our child (`__WALL`); `status` is valid.
        let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if tid == -1 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => break,
                _ => return Err(format!("waitpid: {}", std::io::Error::last_os_error())),
            }
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            if tid == pid {
                trace.exit_status = status;
            }
            continue;
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let signal = libc::WSTOPSIG(status);
        let event = status >> 16;
        let deliver = if signal == libc::SIGTRAP && event == 0 {
            // A single step: the instruction the thread runs next, and what it reads or writes.
            trace.steps += 1;
            if let Some(regs) = registers(tid) {
                let rip = regs.rip;
                if image.text.contains(&rip) && code_seen.insert(rip) {
                    trace.code.push(rip - image.base);
                }
                let instruction = decoded.entry(rip).or_insert_with(|| decode(&memory, rip));
                if let Some(instruction) = instruction {
                    for address in memory_operands(instruction, &regs) {
                        if image.all.contains(&address)
                            && !image.text.contains(&address)
                            && data_seen.insert(address)
                        {
                            trace.data.push(address - image.base);
                        }
                    }
                }
            }
            0
        } else if signal == libc::SIGTRAP || signal == libc::SIGSTOP {
            // A clone event, or a new thread's first stop.
            0
        } else {
            // The VMM's own signals (a vCPU kick) go on to the thread.
            signal
        };
        ptrace(libc::PTRACE_SINGLESTEP, tid, 0, deliver as usize);
    }
    Ok(trace)
}

/// A stopped thread's registers.
fn registers(tid: libc::pid_t) -> Option<libc::user_regs_struct> {
    let mut regs = std::mem::MaybeUninit::<libc::user_regs_struct>::uninit();
    // SAFETY: PTRACE_GETREGS fills the whole `user_regs_struct` it is given, or fails and
    // leaves it alone, in which case it is not read.
    unsafe {
        (libc::ptrace(libc::PTRACE_GETREGS, tid, 0usize, regs.as_mut_ptr()) == 0)
            .then(|| regs.assume_init())
    }
}

/// The instruction at `rip` in the traced process, if it has a memory operand (`lea` computes an
/// address without touching it, so it has none here) or is a system call (whose arguments may
/// point at memory the kernel reads: a path, a buffer to write).
fn decode(memory: &std::fs::File, rip: u64) -> Option<Instruction> {
    let mut bytes = [0u8; 15];
    let n = memory.read_at(&mut bytes, rip).ok()?;
    let mut decoder = Decoder::with_ip(64, &bytes[..n], rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.mnemonic() == Mnemonic::Syscall {
        return Some(instruction);
    }
    let touches_memory = !instruction.is_invalid()
        && instruction.mnemonic() != Mnemonic::Lea
        && instruction.mnemonic() != Mnemonic::Nop
        && (0..instruction.op_count()).any(|op| is_memory(instruction.op_kind(op)));
    touches_memory.then_some(instruction)
}

fn is_memory(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Memory
            | OpKind::MemorySegRSI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESRDI
            | OpKind::MemorySegESI
            | OpKind::MemorySegEDI
            | OpKind::MemoryESEDI
    )
}

/// The addresses `instruction`'s memory operands name, given the thread's registers; for a system
/// call, its six arguments (those that are not addresses fall outside the binary).
fn memory_operands<'a>(
    instruction: &'a Instruction,
    regs: &libc::user_regs_struct,
) -> impl Iterator<Item = u64> + 'a {
    let regs = *regs;
    let arguments = (instruction.mnemonic() == Mnemonic::Syscall)
        .then_some([regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9])
        .into_iter()
        .flatten();
    arguments.chain(
        (0..instruction.op_count())
            .filter(move |&op| is_memory(instruction.op_kind(op)))
            .filter_map(move |op| {
                instruction
                    .try_virtual_address(op, 0, |register, _, _| register_value(&regs, register))
            }),
    )
}

/// A general-purpose register's value, or a segment's base (FS and GS hold thread pointers).
fn register_value(regs: &libc::user_regs_struct, register: Register) -> Option<u64> {
    let full = register.full_register();
    let value = match full {
        Register::RAX => regs.rax,
        Register::RBX => regs.rbx,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::RBP => regs.rbp,
        Register::RSP => regs.rsp,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => regs.rip,
        Register::FS => regs.fs_base,
        Register::GS => regs.gs_base,
        Register::ES | Register::CS | Register::SS | Register::DS => 0,
        _ => return None,
    };
    let mask = match register.size() {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    };
    Some(value & mask)
}

fn run(options: &Options) -> Result<(), String> {
    let map = std::fs::read_to_string(&options.map)
        .map_err(|e| format!("reading {}: {e}", options.map.display()))?;
    let sections = parse_lld_map(&map);
    if sections.is_empty() {
        return Err(format!(
            "{} has no input sections: is it an LLD map (-Map)?",
            options.map.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("vmm-startup-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let guest = dir.join("tiny-pvh.elf");
    let traced = std::fs::write(&guest, tiny_pvh_guest())
        .map_err(|e| format!("{}: {e}", guest.display()))
        .and_then(|()| {
            (0..RUNS)
                .map(|_| trace(&options.vmm, &guest))
                .collect::<Result<Vec<_>, _>>()
        });
    let _ = std::fs::remove_dir_all(&dir);
    let traces = traced?;
    if let Some(bad) = traces
        .iter()
        .find(|t| !libc::WIFEXITED(t.exit_status) || libc::WEXITSTATUS(t.exit_status) != 0)
    {
        return Err(format!(
            "the traced vmm did not exit cleanly (wait status {:#x})",
            bad.exit_status
        ));
    }
    // What any run touched, in the order the first run that touched it did.
    let merge = |part: fn(&Trace) -> &[u64]| {
        let mut seen = HashSet::new();
        traces
            .iter()
            .flat_map(part)
            .copied()
            .filter(|a| seen.insert(*a))
            .collect::<Vec<u64>>()
    };
    let (code, data) = (merge(|t| &t.code), merge(|t| &t.data));
    let script = linker_script(&sections, &code, &data);
    let patterns = script
        .lines()
        .filter(|l| l.trim_start().starts_with('*'))
        .count();
    std::fs::write(&options.out, &script)
        .map_err(|e| format!("writing {}: {e}", options.out.display()))?;
    eprintln!(
        "vmm-startup-layout: {RUNS} runs of {} steps, {} distinct instructions, {patterns} sections -> {}",
        traces.iter().map(|t| t.steps.to_string()).collect::<Vec<_>>().join(", "),
        code.len(),
        options.out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmm-startup-layout: {e}");
            ExitCode::FAILURE
        }
    }
}
