//! `manager`: the Dragonfly manager.

use clap::Parser;
use d7y_config::manager::{Config, DEFAULT_CONFIG_PATH};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "manager",
    version,
    about = "The control plane of a Dragonfly cluster: clusters, schedulers, seed peers, users and jobs"
)]
struct Args {
    /// Path of the YAML config file; defaults (SQLite) apply when the default path does not exist.
    #[arg(short = 'c', long, default_value = DEFAULT_CONFIG_PATH, env = "MANAGER_CONFIG")]
    config: PathBuf,

    /// Log level: trace, debug, info, warn, error.
    #[arg(short = 'l', long, default_value = "info", env = "MANAGER_LOG_LEVEL")]
    log_level: String,
}

/// Exit codes: 0 stopped cleanly, 1 failed while running, 2 invalid config.
fn main() -> ExitCode {
    let args = Args::parse();
    let config = if args.config.as_os_str() == DEFAULT_CONFIG_PATH && !args.config.exists() {
        Config::default()
    } else {
        match Config::load(&args.config) {
            Ok(c) => c,
            Err(err) => {
                eprintln!("manager: {err}");
                return ExitCode::from(2);
            }
        }
    };
    let runtime = match d7y_telemetry::setup(&d7y_telemetry::LogOptions {
        level: &args.log_level,
        dir: None,
        file_name: "manager.log",
        console: true,
    }) {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("manager: {err}");
            return ExitCode::from(err.exit_code());
        }
    };
    match runtime.block_on(d7y_manager::run(
        config,
        d7y_telemetry::shutdown_signal(),
        None,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("manager: {err}");
            ExitCode::FAILURE
        }
    }
}
