//! Probes what this host's KVM can run and prints what a Linux guest would be told to hide.
//!
//! `cargo run -p vmmkit-pvm --example probe` (needs `/dev/kvm`). It runs one instruction per class
//! in a throw-away VM, prints what KVM did with each, then the features the `auto` policy hides
//! (and why), the kernel command-line switches that hide them, and the failing instructions that
//! cannot be hidden and are left to the VMM's instruction fallback. On a host with VMX/SVM every
//! instruction runs and nothing is hidden; on kvm-pvm the emulator's gaps show.

use pvm::probe::ProbeOutcome;
use pvm::CpuFeaturePolicy;

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let report = pvm::probe_host(&kvm)?;
    for result in &report.results {
        let outcome = match &result.outcome {
            ProbeOutcome::Ran => "runs".to_string(),
            ProbeOutcome::EmulationFailed(bytes) => {
                format!("KVM's emulator gives up (bytes {bytes:02x?})")
            }
            ProbeOutcome::OtherExit(exit) => format!("other exit: {exit}"),
        };
        println!("{:<8} {:<28} {outcome}", result.class, result.insn);
    }
    println!("{report}");
    match report.tsc_khz {
        Some(khz) => println!("vCPU TSC: {khz} kHz"),
        None => println!("vCPU TSC: unknown"),
    }

    let hidden = pvm::hide::hidden(CpuFeaturePolicy::Auto, Some(&report));
    if hidden.is_empty() {
        println!("hidden: nothing");
    }
    for feature in &hidden {
        println!("hidden: {}", feature.reason);
    }
    let switches = pvm::guest_cmdline_switches(CpuFeaturePolicy::Auto, Some(&report));
    println!("kernel command line: {}", switches.join(" "));
    let fallback: Vec<String> = report
        .failing()
        .into_iter()
        .filter(|class| !class.hideable())
        .map(|class| class.to_string())
        .collect();
    if !fallback.is_empty() {
        println!("left to the instruction fallback: {}", fallback.join(", "));
    }
    Ok(())
}
