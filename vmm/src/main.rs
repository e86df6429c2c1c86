//! The `vmm` binary: parses the command line, builds the VM and runs it with the console on this
//! terminal. Every failure ends as one line on stderr: status 2 for bad input, 1 for a VM failure.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use vmm::{terminal::RawTerminal, VmConfig, Vmm};

fn init_logging(level: vmm::config::LogLevel) {
    let env = env_logger::Env::default().default_filter_or(level.filter().as_str());
    env_logger::Builder::from_env(env)
        .format(|buf, record| {
            writeln!(
                buf,
                "[vmm {} {}] {}",
                buf.timestamp_micros(),
                record.level(),
                record.args()
            )
        })
        .init();
}

/// Prints one error line and gives the exit status. Source errors are already part of the message.
fn fail(error: &vmm::Error) -> ExitCode {
    vmm::terminal::restore();
    eprintln!("vmm: {error}");
    ExitCode::from(error.exit_code() as u8)
}

fn main() -> ExitCode {
    let config = match VmConfig::try_parse() {
        Ok(config) => config,
        Err(e) => {
            // --help and --version print to stdout and succeed; mistakes get one line and status 2.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's message may span lines (a list of missing options): fold it into one.
            let text = e.render().to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|line| !line.trim().is_empty() && !line.starts_with("Usage:"))
                .map(str::trim)
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("vmm: {message} (see vmm --help)");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_level);
    let vmm = match Vmm::build(&config) {
        Ok(vmm) => vmm,
        Err(e) => return fail(&e),
    };
    let terminal = match RawTerminal::new() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmm: cannot put the terminal in raw mode: {e}");
            return ExitCode::from(1);
        }
    };
    let result = vmm.run();
    drop(terminal);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
