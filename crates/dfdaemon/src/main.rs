//! `dfdaemon`: the Dragonfly peer daemon.

use clap::Parser;
use d7y_config::dfdaemon::{Config, DEFAULT_CONFIG_PATH};
use d7y_config::dynconfig::{Dynconfig, DEFAULT_DYNCONFIG_PATH};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "dfdaemon",
    version,
    about = "A high performance P2P download daemon in Dragonfly"
)]
struct Args {
    /// Path of the YAML config file.
    #[arg(short = 'c', long, default_value = DEFAULT_CONFIG_PATH, env = "DFDAEMON_CONFIG")]
    config: PathBuf,

    /// Path of the dynconfig file listing the schedulers (`scheduler.addrs`); without it
    /// (or when the default path does not exist) dfdaemon runs standalone.
    #[arg(long, default_value = DEFAULT_DYNCONFIG_PATH, env = "DFDAEMON_DYNCONFIG")]
    dynconfig: PathBuf,

    /// Log level: trace, debug, info, warn, error.
    #[arg(short = 'l', long, default_value = "info", env = "DFDAEMON_LOG_LEVEL")]
    log_level: String,

    /// Directory for log files; logs go to stderr when unset.
    #[arg(long, env = "DFDAEMON_LOG_DIR")]
    log_dir: Option<PathBuf>,

    /// Also log to the console when logging to a directory.
    #[arg(long, env = "DFDAEMON_CONSOLE")]
    console: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("dfdaemon: {err}");
            return ExitCode::from(2);
        }
    };
    let schedulers =
        if args.dynconfig.as_os_str() == DEFAULT_DYNCONFIG_PATH && !args.dynconfig.exists() {
            Vec::new()
        } else {
            match Dynconfig::load(&args.dynconfig) {
                Ok(d) => d.scheduler_addrs(),
                Err(err) => {
                    eprintln!("dfdaemon: {err}");
                    return ExitCode::from(2);
                }
            }
        };
    let runtime = match d7y_telemetry::setup(&d7y_telemetry::LogOptions {
        level: &args.log_level,
        dir: args.log_dir.as_deref(),
        file_name: "dfdaemon.log",
        console: args.console,
    }) {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("dfdaemon: {err}");
            return ExitCode::from(err.exit_code());
        }
    };
    match runtime.block_on(d7y_dfdaemon::run_with(
        config,
        schedulers,
        d7y_telemetry::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("dfdaemon: {err}");
            ExitCode::FAILURE
        }
    }
}
