//! `dfinit --config /etc/dragonfly/dfinit.yaml [--dry-run]`.

use clap::Parser;
use d7y_dfinit::config::{Config, DEFAULT_CONFIG_PATH};
use d7y_dfinit::runtime::InitError;
use std::path::PathBuf;
use std::process::ExitCode;

/// Points the container runtime at the dfdaemon proxy.
#[derive(Parser)]
#[command(name = "dfinit", version)]
struct Args {
    /// dfinit's config file.
    #[arg(short = 'c', long, env = "DFINIT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Print the changes as a diff and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Accepted for compatibility with upstream's flags (dfinit prints what it does).
    #[arg(short = 'l', long, default_value = "info")]
    log_level: String,
}

/// Exit codes: 0 done (or nothing to do), 1 a file could not be read or written,
/// 2 invalid config, 3 the runtime's config conflicts with what dfinit must write.
fn main() -> ExitCode {
    let args = Args::parse();
    let _ = &args.log_level;
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dfinit: {e}");
            return ExitCode::from(2);
        }
    };
    let changes = match d7y_dfinit::plan(&config) {
        Ok(c) => c,
        Err(e @ InitError::Conflict { .. }) => {
            eprintln!("dfinit: {e}");
            return ExitCode::from(3);
        }
        Err(e @ InitError::Parse { .. }) => {
            eprintln!("dfinit: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("dfinit: {e}");
            return ExitCode::from(1);
        }
    };
    let mut restart_hint = false;
    for change in &changes {
        if change.is_noop() {
            println!("unchanged {}", change.path.display());
            continue;
        }
        if args.dry_run {
            print!("{}", change.diff());
            continue;
        }
        if let Err(e) = change.apply() {
            eprintln!("dfinit: cannot write {}: {e}", change.path.display());
            return ExitCode::from(1);
        }
        println!("wrote {}", change.path.display());
        restart_hint |= change
            .path
            .extension()
            .is_some_and(|e| e == "toml" || e == "json" || e == "conf")
            && !change.path.ends_with("hosts.toml");
    }
    if restart_hint && !args.dry_run {
        println!("restart the container runtime to apply the changed config");
    }
    ExitCode::SUCCESS
}
