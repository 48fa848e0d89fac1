//! Process set-up shared by the long-running binaries (`dfdaemon`, `scheduler`,
//! `dragonfly`): the log subscriber, the Tokio runtime and the shutdown signal. Binaries
//! only; libraries log through `tracing` and never install a subscriber.

use std::path::{Path, PathBuf};

/// Why the process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("invalid --log-level {level:?}: {reason}")]
    LogLevel { level: String, reason: String },
    #[error("cannot open the log file {path}: {source}")]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
}

impl SetupError {
    /// The process exit code: 2 for bad input (flags, log directory), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            SetupError::LogLevel { .. } | SetupError::LogFile { .. } => 2,
            SetupError::Runtime(_) => 1,
        }
    }
}

/// Installs the log subscriber and builds the runtime, in that order.
pub fn setup(options: &LogOptions<'_>) -> Result<tokio::runtime::Runtime, SetupError> {
    init_logging(options)?;
    runtime()
}

/// Where and how much to log.
#[derive(Debug, Clone)]
pub struct LogOptions<'a> {
    /// trace, debug, info, warn or error (or a full `tracing` filter).
    pub level: &'a str,
    /// Log to `<dir>/<file_name>` instead of stderr.
    pub dir: Option<&'a Path>,
    pub file_name: &'a str,
    /// With `dir`, log to stderr anyway.
    pub console: bool,
}

/// The filter every binary uses: the chosen level, with the HTTP/2 stack kept quiet.
fn filter(level: &str) -> Result<tracing_subscriber::EnvFilter, SetupError> {
    tracing_subscriber::EnvFilter::try_new(format!("{level},h2=warn,hyper=warn,tower=warn"))
        .map_err(|e| SetupError::LogLevel {
            level: level.to_string(),
            reason: e.to_string(),
        })
}

/// Installs the process-wide log subscriber.
fn init_logging(options: &LogOptions<'_>) -> Result<(), SetupError> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(options.level)?)
        .with_target(false);
    match options.dir {
        Some(dir) if !options.console => {
            let path = dir.join(options.file_name);
            let file = std::fs::create_dir_all(dir)
                .and_then(|()| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                })
                .map_err(|source| SetupError::LogFile {
                    path: path.clone(),
                    source,
                })?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        // Colours only for a terminal: redirected logs (files, journald, test harnesses)
        // get plain text.
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

/// The multi-threaded runtime the binaries run on.
fn runtime() -> Result<tokio::runtime::Runtime, SetupError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(SetupError::Runtime)
}

/// Resolves on Ctrl-C or SIGTERM (only Ctrl-C where a SIGTERM handler cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_level_is_a_clear_error() {
        let err = filter("loud[").unwrap_err();
        assert!(
            err.to_string().contains("invalid --log-level \"loud[\""),
            "{err}"
        );
        assert!(filter("debug").is_ok());
        assert!(filter("info,d7y_scheduler=trace").is_ok());
    }

    #[test]
    fn an_unwritable_log_dir_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"").unwrap();
        let err = init_logging(&LogOptions {
            level: "info",
            dir: Some(&blocker),
            file_name: "x.log",
            console: false,
        })
        .unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
