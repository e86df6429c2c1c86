//! The `vmm` binary: parses the command line, builds the VM and runs it with the console on this
//! terminal. Every failure ends as one line on stderr: status 2 for bad input, 1 for a VM failure.

use std::io::Write;
use std::process::ExitCode;

use clap::{parser::ValueSource, CommandFactory, FromArgMatches};
use vmm::{terminal::RawTerminal, VmConfig};

/// Logs to `log_file` (appended) or else stderr. Returns a message when the file cannot be opened.
fn init_logging(
    level: vmm::config::LogLevel,
    log_file: Option<&std::path::Path>,
) -> Result<(), String> {
    let env = env_logger::Env::default().default_filter_or(level.filter().as_str());
    let mut builder = env_logger::Builder::from_env(env);
    let to_stderr = log_file.is_none();
    if let Some(path) = log_file {
        let file = vmm::metrics::open_append(path, "log file").map_err(|e| e.to_string())?;
        builder.target(env_logger::Target::Pipe(Box::new(file)));
    }
    builder
        .format(move |buf, record| {
            if to_stderr {
                // The status line shares stderr: it goes before a log line.
                vmm::status::erase();
            }
            writeln!(
                buf,
                "[vmm {} {}] {}",
                buf.timestamp_micros(),
                record.level(),
                record.args()
            )
        })
        .init();
    Ok(())
}

/// Prints one error line and gives the exit status. Source errors are already part of the message.
fn fail(error: &vmm::Error) -> ExitCode {
    vmm::terminal::restore();
    eprintln!("vmm: {error}");
    ExitCode::from(error.exit_code() as u8)
}

fn main() -> ExitCode {
    let parsed = VmConfig::command()
        .try_get_matches()
        .and_then(|matches| Ok((VmConfig::from_arg_matches(&matches)?, matches)));
    let (mut config, matches) = match parsed {
        Ok(parsed) => parsed,
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
    if let Err(message) = init_logging(config.log_level, config.log_file.as_deref()) {
        eprintln!("vmm: {message}");
        return ExitCode::from(2);
    }
    // The options the user typed, as opposed to defaults: those a configuration file also
    // decides conflict with it.
    let explicit: Vec<&str> = matches
        .ids()
        .map(|id| id.as_str())
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .collect();
    let mut resources = None;
    if let Some(path) = config.config_file.clone() {
        match vmm::api::firecracker::load_config_file(&path, &config, &explicit) {
            Ok((from_file, merged)) => {
                resources = Some(from_file);
                config = merged;
            }
            Err(message) => {
                eprintln!("vmm: {message}");
                return ExitCode::from(2);
            }
        }
    }
    // Without --api-sock, the VM is built before the terminal goes raw, as it always was.
    let vmm = match config.api_sock {
        Some(_) => None,
        None => match vmm::Vmm::build(&config) {
            Ok(vmm) => Some(vmm),
            Err(e) => return fail(&e),
        },
    };
    let stdio = config.serial == vmm::console_io::SerialMode::Stdio;
    let terminal = match RawTerminal::new(stdio) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vmm: cannot put the terminal in raw mode: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match vmm {
        Some(vmm) => vmm.run(),
        None => vmm::api::run(&config, resources, &explicit),
    };
    drop(terminal);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
