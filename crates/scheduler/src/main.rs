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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
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
    let filter = match tracing_subscriber::EnvFilter::try_new(format!(
        "{},h2=warn,hyper=warn,tower=warn",
        args.log_level
    )) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("scheduler: invalid --log-level {:?}: {e}", args.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("scheduler: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(d7y_scheduler::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("scheduler: {err}");
            ExitCode::FAILURE
        }
    }
}
