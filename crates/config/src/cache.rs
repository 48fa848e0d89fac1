//! What a component keeps of its manager's last answer (`server.cacheDir`), so that a
//! restart while the manager is away starts on it: YAML, replaced atomically.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// The kept value, if the file is there and readable.
pub fn load<T: DeserializeOwned>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_yaml_ng::from_str(&text).ok()
}

/// Keeps `value` at `path` (written beside it, then renamed over it).
pub fn save<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_yaml_ng::to_string(value).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// `host:port` of a manager address as upstream writes it (`http://host:port`, or bare).
pub fn manager_target(addr: &str) -> String {
    let trimmed = addr.trim();
    let rest = trimmed.split_once("://").map(|(_, r)| r).unwrap_or(trimmed);
    rest.trim_end_matches('/').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manager_addresses_as_upstream_writes_them() {
        for (addr, want) in [
            ("http://127.0.0.1:65003", "127.0.0.1:65003"),
            ("127.0.0.1:65003", "127.0.0.1:65003"),
            ("https://manager.example:65003/", "manager.example:65003"),
            (" manager:65003 ", "manager:65003"),
        ] {
            assert_eq!(manager_target(addr), want, "{addr}");
        }
    }

    #[test]
    fn kept_values_come_back_and_a_broken_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/cache.yaml");
        save(&path, &vec!["x".to_string(), "y".to_string()]).unwrap();
        assert_eq!(load::<Vec<String>>(&path).unwrap(), ["x", "y"]);
        std::fs::write(&path, "{not yaml").unwrap();
        assert!(load::<Vec<String>>(&path).is_none());
        assert!(load::<Vec<String>>(&dir.path().join("missing")).is_none());
    }
}
