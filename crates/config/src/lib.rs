//! Configuration of the Dragonfly binaries, read from YAML with upstream's camelCase keys.
//!
//! Every section denies unknown keys, so a typo stops start-up with a message naming the key
//! and where it is, instead of silently running on defaults. Defaults and key names follow
//! upstream's `dfdaemon.yaml`; keys that upstream does not have are marked as extensions.

pub mod cache;
pub mod dfdaemon;
pub mod dynconfig;
pub mod manager;
pub mod scheduler;

use std::path::{Path, PathBuf};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config value {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Reads and parses a YAML file into `T`, naming the file in errors.
pub(crate) fn load_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_yaml(&text).map_err(|message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    })
}

/// Parses YAML text; an empty document gives the defaults.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    if text.trim().is_empty() {
        return serde_yaml_ng::from_str("{}").map_err(|e| e.to_string());
    }
    serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
}

/// Parses YAML text given inline (tests, generated configs), naming it `<inline>` in errors.
pub(crate) fn parse_inline<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    parse_yaml(text).map_err(|message| ConfigError::Parse {
        path: PathBuf::from("<inline>"),
        message,
    })
}
