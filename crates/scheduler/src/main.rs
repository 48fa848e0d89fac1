//! `scheduler`: the Dragonfly scheduler.

use clap::Parser;
use d7y_config::scheduler::{Config, DEFAULT_CONFIG_PATH};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "scheduler",
    version,
    about = "Schedules peers of a Dragonfly P2P swarm"
)]
struct Args {
    /// Path of the YAML config file; defaults apply when the default path does not exist.
    #[arg(short = 'c', long, default_value = DEFAULT_CONFIG_PATH, env = "SCHEDULER_CONFIG")]
    config: PathBuf,

    /// Log level: trace, debug, info, warn, error.
    #[arg(short = 'l', long, default_value = "info", env = "SCHEDULER_LOG_LEVEL")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = if args.config.as_os_str() == DEFAULT_CONFIG_PATH && !args.config.exists() {
        Config::default()
    } else {
        match Config::load(&args.config) {
            Ok(c) => c,
            Err(err) => {
                eprintln!("scheduler: {err}");
                return ExitCode::from(2);
            }
        }
    };
    let runtime = match d7y_telemetry::setup(&d7y_telemetry::LogOptions {
        level: &args.log_level,
        dir: None,
        file_name: "scheduler.log",
        console: true,
    }) {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("scheduler: {err}");
            return ExitCode::from(err.exit_code());
        }
    };
    match runtime.block_on(d7y_scheduler::run(config, d7y_telemetry::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("scheduler: {err}");
            ExitCode::FAILURE
        }
    }
}
