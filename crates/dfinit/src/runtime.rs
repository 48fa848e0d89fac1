//! What each container runtime's config becomes. Pure: each function takes the files'
//! current text and returns the changes; running it on its own output changes nothing.

use crate::change::FileChange;
use crate::config::{Containerd, Docker, Registries};
use std::path::{Path, PathBuf};
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value};

/// Why a runtime's config cannot be changed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid {format}: {reason}")]
    Parse {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// The runtime's config holds something that conflicts with what dfinit would write.
    #[error("{path}: {reason}")]
    Conflict { path: PathBuf, reason: String },
}

/// Reads a file by path (`None`: absent); the real file system or a test's map.
pub type Reader<'a> = dyn Fn(&Path) -> std::io::Result<Option<String>> + 'a;

fn read(reader: &Reader<'_>, path: &Path) -> Result<Option<String>, InitError> {
    reader(path).map_err(|source| InitError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// containerd's default hosts directory, set when its config has none.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// A TOML string literal.
fn quoted(s: &str) -> String {
    Value::from(s).decorated("", "").to_string()
}

/// The CRI registry table of a containerd config, by its version.
fn registry_table_path(version: i64) -> [&'static str; 3] {
    match version {
        3 => ["plugins", "io.containerd.cri.v1.images", "registry"],
        2 => ["plugins", "io.containerd.grpc.v1.cri", "registry"],
        _ => ["plugins", "cri", "registry"],
    }
}

/// containerd: the hosts directory from `config.toml` (set when absent), and one
/// `hosts.toml` per registry (or `_default`) that sends pulls to the proxy first.
pub fn containerd(
    cfg: &Containerd,
    proxy_addr: &str,
    reader: &Reader<'_>,
) -> Result<Vec<FileChange>, InitError> {
    let path = &cfg.config_path;
    let before = read(reader, path)?;
    let mut doc: DocumentMut = before
        .as_deref()
        .unwrap_or("version = 2\n")
        .parse()
        .map_err(|e: toml_edit::TomlError| InitError::Parse {
            path: path.clone(),
            format: "TOML",
            reason: e.to_string(),
        })?;
    let version = doc.get("version").and_then(Item::as_integer).unwrap_or(1);
    let keys = registry_table_path(version);
    let dotted = format!("[plugins.{:?}.registry]", keys[1]);
    let existing = doc
        .get(keys[0])
        .and_then(|p| p.get(keys[1]))
        .and_then(|p| p.get(keys[2]));
    for legacy in ["mirrors", "configs"] {
        if existing
            .and_then(|r| r.get(legacy))
            .and_then(Item::as_table_like)
            .is_some_and(|t| !t.is_empty())
        {
            return Err(InitError::Conflict {
                path: path.clone(),
                reason: format!(
                    "{dotted} has a legacy `{legacy}` section; containerd refuses it together with \
                     config_path, which dfinit needs. Move those settings to hosts.toml files \
                     (https://github.com/containerd/containerd/blob/main/docs/hosts.md), remove \
                     `{legacy}`, and run dfinit again."
                ),
            });
        }
    }
    let configured = existing
        .and_then(|r| r.get("config_path"))
        .and_then(Item::as_str)
        .and_then(|p| p.split(':').find(|s| !s.is_empty()))
        .map(PathBuf::from);
    let mut changes = Vec::new();
    let hosts_dir = match configured {
        Some(dir) => dir,
        None => {
            let plugins = table_at(&mut doc, &keys);
            plugins.insert("config_path", toml_edit::value(DEFAULT_HOSTS_DIR));
            changes.push(FileChange {
                path: path.clone(),
                before: before.clone(),
                after: doc.to_string(),
            });
            PathBuf::from(DEFAULT_HOSTS_DIR)
        }
    };
    let proxy = quoted(proxy_addr);
    let mut files: Vec<(String, String)> = Vec::new();
    for r in &cfg.registries {
        let mut text = format!(
            "# Written by dfinit: pulls from {ns} go through the Dragonfly proxy first, and\n\
             # to the registry itself when the proxy cannot answer.\n\
             server = {server}\n",
            ns = r.host_namespace,
            server = quoted(&r.server_addr),
        );
        if let Some(skip) = r.skip_verify {
            text.push_str(&format!("skip_verify = {skip}\n"));
        }
        if !r.ca.is_empty() {
            let list: Vec<String> = r.ca.iter().map(|c| quoted(c)).collect();
            text.push_str(&format!("ca = [{}]\n", list.join(", ")));
        }
        let caps: Vec<String> = r.capabilities.iter().map(|c| quoted(c)).collect();
        text.push_str(&format!(
            "\n[host.{proxy}]\n  capabilities = [{caps}]\n\n  [host.{proxy}.header]\n    X-Dragonfly-Registry = {server}\n",
            caps = caps.join(", "),
            server = quoted(&r.server_addr),
        ));
        files.push((r.host_namespace.clone(), text));
    }
    if cfg.proxy_all_registries {
        files.push((
            "_default".into(),
            format!(
                "# Written by dfinit: pulls from every registry go through the Dragonfly proxy\n\
                 # first (it learns the registry from containerd's ns parameter).\n\
                 \n[host.{proxy}]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        ));
    }
    for (namespace, after) in files {
        let file = hosts_dir.join(&namespace).join("hosts.toml");
        let before = read(reader, &file)?;
        changes.push(FileChange {
            path: file,
            before,
            after,
        });
    }
    Ok(changes)
}

/// The table at `keys`, created (as implicit parents and a real leaf) when absent.
fn table_at<'d>(doc: &'d mut DocumentMut, keys: &[&str]) -> &'d mut Table {
    let mut table = doc.as_table_mut();
    for (i, key) in keys.iter().enumerate() {
        let entry = table.entry(key).or_insert_with(|| {
            let mut t = Table::new();
            t.set_implicit(i + 1 < keys.len());
            Item::Table(t)
        });
        table = entry.as_table_mut().expect("a table");
    }
    table
}

/// The mirror location of the proxy in `registries.conf` terms (`host:port`) and whether
/// it is plain HTTP.
fn mirror_location(proxy_addr: &str) -> (String, bool) {
    match url::Url::parse(proxy_addr) {
        Ok(url) => {
            let host = url.host_str().unwrap_or("127.0.0.1");
            let location = match url.port_or_known_default() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_string(),
            };
            (location, url.scheme() == "http")
        }
        Err(_) => (proxy_addr.to_string(), true),
    }
}

/// CRI-O and Podman: `registries.conf` (v2) gets the unqualified search registries and,
/// per registry, the proxy as a mirror. Other registries and settings stay as they are.
pub fn registries_conf(
    cfg: &Registries,
    proxy_addr: &str,
    reader: &Reader<'_>,
) -> Result<Vec<FileChange>, InitError> {
    let path = &cfg.config_path;
    let before = read(reader, path)?;
    let mut doc: DocumentMut =
        before
            .as_deref()
            .unwrap_or("")
            .parse()
            .map_err(|e: toml_edit::TomlError| InitError::Parse {
                path: path.clone(),
                format: "TOML",
                reason: e.to_string(),
            })?;
    if doc.contains_key("registries") {
        return Err(InitError::Conflict {
            path: path.clone(),
            reason: "uses the v1 format ([registries.search] ...); convert it to the v2 format \
                     (containers-registries.conf(5)) and run dfinit again"
                .into(),
        });
    }
    let search: toml_edit::Array = cfg
        .unqualified_search_registries
        .iter()
        .map(String::as_str)
        .collect();
    let current_search: Option<Vec<String>> = doc
        .get("unqualified-search-registries")
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        });
    if current_search.as_deref() != Some(&cfg.unqualified_search_registries[..]) {
        doc.insert("unqualified-search-registries", toml_edit::value(search));
    }
    let (mirror, insecure) = mirror_location(proxy_addr);
    if !doc.contains_key("registry") {
        doc.insert("registry", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    let registries = doc
        .get_mut("registry")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| InitError::Conflict {
            path: path.clone(),
            reason: "`registry` is not an array of tables ([[registry]])".into(),
        })?;
    for wanted in &cfg.registries {
        let mut table = Table::new();
        table.insert("prefix", toml_edit::value(wanted.prefix.as_str()));
        table.insert("location", toml_edit::value(wanted.location.as_str()));
        let mut mirror_table = Table::new();
        mirror_table.insert("location", toml_edit::value(mirror.as_str()));
        mirror_table.insert("insecure", toml_edit::value(insecure));
        let mut mirrors = ArrayOfTables::new();
        mirrors.push(mirror_table);
        table.insert("mirror", Item::ArrayOfTables(mirrors));
        let existing = registries
            .iter()
            .position(|t| t.get("prefix").and_then(Item::as_str) == Some(wanted.prefix.as_str()));
        match existing {
            Some(i) => {
                let current = registries.get_mut(i).expect("found");
                if !same_registry(current, &table) {
                    *current = table;
                }
            }
            None => registries.push(table),
        }
    }
    let after = doc.to_string();
    Ok(vec![FileChange {
        path: path.clone(),
        before,
        after,
    }])
}

/// Whether two `[[registry]]` entries say the same (formatting aside).
fn same_registry(a: &Table, b: &Table) -> bool {
    let fields = |t: &Table| {
        let mirrors: Vec<(Option<String>, Option<bool>)> = t
            .get("mirror")
            .and_then(Item::as_array_of_tables)
            .map(|m| {
                m.iter()
                    .map(|m| {
                        (
                            m.get("location").and_then(Item::as_str).map(str::to_string),
                            m.get("insecure").and_then(Item::as_bool),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let keys: Vec<String> = t.iter().map(|(k, _)| k.to_string()).collect();
        (
            t.get("prefix").and_then(Item::as_str).map(str::to_string),
            t.get("location").and_then(Item::as_str).map(str::to_string),
            mirrors,
            keys,
        )
    };
    fields(a) == fields(b)
}

/// Docker: `daemon.json` gets `proxies.http-proxy`/`https-proxy`; other keys stay.
pub fn docker(
    cfg: &Docker,
    proxy_addr: &str,
    reader: &Reader<'_>,
) -> Result<Vec<FileChange>, InitError> {
    let path = &cfg.config_path;
    let before = read(reader, path)?;
    let mut json: serde_json::Value = match before.as_deref().map(str::trim) {
        None | Some("") => serde_json::json!({}),
        Some(text) => serde_json::from_str(text).map_err(|e| InitError::Parse {
            path: path.clone(),
            format: "JSON",
            reason: e.to_string(),
        })?,
    };
    let object = json.as_object_mut().ok_or_else(|| InitError::Conflict {
        path: path.clone(),
        reason: "is not a JSON object".into(),
    })?;
    let proxies = object
        .entry("proxies")
        .or_insert_with(|| serde_json::json!({}));
    let proxies = proxies.as_object_mut().ok_or_else(|| InitError::Conflict {
        path: path.clone(),
        reason: "`proxies` is not an object".into(),
    })?;
    let mut changed = false;
    for key in ["http-proxy", "https-proxy"] {
        if proxies.get(key).and_then(|v| v.as_str()) != Some(proxy_addr) {
            proxies.insert(key.into(), proxy_addr.into());
            changed = true;
        }
    }
    let after = if changed || before.is_none() {
        let mut text = serde_json::to_string_pretty(&json).expect("json");
        text.push('\n');
        text
    } else {
        before.clone().unwrap_or_default()
    };
    Ok(vec![FileChange {
        path: path.clone(),
        before,
        after,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ContainerdRegistry, MirroredRegistry};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An in-memory file system the writers read from and the test applies changes to.
    struct Files(Mutex<HashMap<PathBuf, String>>);

    impl Files {
        fn new(files: &[(&str, &str)]) -> Files {
            Files(Mutex::new(
                files
                    .iter()
                    .map(|(p, t)| (PathBuf::from(p), t.to_string()))
                    .collect(),
            ))
        }
        fn reader(&self) -> impl Fn(&Path) -> std::io::Result<Option<String>> + '_ {
            |p| Ok(self.0.lock().unwrap().get(p).cloned())
        }
        fn apply(&self, changes: &[FileChange]) {
            for c in changes {
                self.0
                    .lock()
                    .unwrap()
                    .insert(c.path.clone(), c.after.clone());
            }
        }
        fn get(&self, p: &str) -> String {
            self.0.lock().unwrap()[Path::new(p)].clone()
        }
    }

    fn containerd_cfg(registries: Vec<ContainerdRegistry>, all: bool) -> Containerd {
        Containerd {
            config_path: "/etc/containerd/config.toml".into(),
            registries,
            proxy_all_registries: all,
        }
    }

    fn registry(ns: &str, server: &str) -> ContainerdRegistry {
        ContainerdRegistry {
            host_namespace: ns.into(),
            server_addr: server.into(),
            ..Default::default()
        }
    }

    const PROXY: &str = "http://127.0.0.1:4001";

    #[test]
    fn containerd_uses_its_config_path_and_is_idempotent() {
        let files = Files::new(&[(
            "/etc/containerd/config.toml",
            "version = 2\n# keep me\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d:/other\"\n",
        )]);
        let cfg = containerd_cfg(
            vec![registry("origin.test:5000", "http://origin.test:5000")],
            true,
        );
        let changes = containerd(&cfg, PROXY, &files.reader()).unwrap();
        let paths: Vec<_> = changes
            .iter()
            .map(|c| c.path.display().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                "/etc/containerd/certs.d/origin.test:5000/hosts.toml",
                "/etc/containerd/certs.d/_default/hosts.toml"
            ],
            "config.toml already names the hosts directory: untouched"
        );
        let hosts = &changes[0].after;
        let parsed: DocumentMut = hosts.parse().unwrap();
        assert_eq!(parsed["server"].as_str(), Some("http://origin.test:5000"));
        let host = &parsed["host"][PROXY];
        assert_eq!(host["capabilities"].as_array().unwrap().len(), 2);
        assert_eq!(
            host["header"]["X-Dragonfly-Registry"].as_str(),
            Some("http://origin.test:5000")
        );
        files.apply(&changes);
        let again = containerd(&cfg, PROXY, &files.reader()).unwrap();
        assert!(
            again.iter().all(FileChange::is_noop),
            "second run changes nothing"
        );
    }

    #[test]
    fn containerd_without_config_path_gets_one_and_keeps_the_rest() {
        for version in [2, 3] {
            let original = format!(
                "version = {version}\nroot = \"/var/lib/containerd\"\n\n[grpc]\n  address = \"/run/containerd/containerd.sock\"\n"
            );
            let files = Files::new(&[("/etc/containerd/config.toml", &original)]);
            let cfg = containerd_cfg(
                vec![registry("docker.io", "https://index.docker.io")],
                false,
            );
            let changes = containerd(&cfg, PROXY, &files.reader()).unwrap();
            assert_eq!(changes.len(), 2);
            let config = &changes[0].after;
            assert!(
                config.starts_with(&original),
                "the rest kept as it was:\n{config}"
            );
            let parsed: DocumentMut = config.parse().unwrap();
            let mut item = parsed.as_item();
            for key in registry_table_path(version) {
                item = &item[key];
            }
            assert_eq!(
                item["config_path"].as_str(),
                Some(DEFAULT_HOSTS_DIR),
                "{config}"
            );
            assert_eq!(
                changes[1].path,
                Path::new("/etc/containerd/certs.d/docker.io/hosts.toml")
            );
            files.apply(&changes);
            assert!(containerd(&cfg, PROXY, &files.reader())
                .unwrap()
                .iter()
                .all(FileChange::is_noop));
        }
    }

    #[test]
    fn a_missing_containerd_config_is_created() {
        let files = Files::new(&[]);
        let cfg = containerd_cfg(
            vec![registry("docker.io", "https://index.docker.io")],
            false,
        );
        let changes = containerd(&cfg, PROXY, &files.reader()).unwrap();
        let parsed: DocumentMut = changes[0].after.parse().unwrap();
        assert_eq!(
            parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"].as_str(),
            Some(DEFAULT_HOSTS_DIR),
            "a missing config.toml is created as version 2"
        );
    }

    #[test]
    fn containerd_legacy_mirrors_stop_dfinit() {
        let files = Files::new(&[(
            "/etc/containerd/config.toml",
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n",
        )]);
        let cfg = containerd_cfg(
            vec![registry("docker.io", "https://index.docker.io")],
            false,
        );
        let err = containerd(&cfg, PROXY, &files.reader())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("legacy `mirrors`") && err.contains("hosts.toml"),
            "{err}"
        );
        let bad = Files::new(&[("/etc/containerd/config.toml", "version = = 2")]);
        let err = containerd(&cfg, PROXY, &bad.reader())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not valid TOML"), "{err}");
    }

    #[test]
    fn registries_conf_mirrors_and_idempotence() {
        let original = "# site settings\nshort-name-mode = \"enforcing\"\n\n[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\nblocked = false\n";
        let files = Files::new(&[("/etc/containers/registries.conf", original)]);
        let cfg = Registries {
            registries: vec![
                MirroredRegistry {
                    prefix: "docker.io".into(),
                    location: "docker.io".into(),
                },
                MirroredRegistry {
                    prefix: "origin.test:5000".into(),
                    location: "origin.test:5000".into(),
                },
            ],
            ..Default::default()
        };
        let changes = registries_conf(&cfg, PROXY, &files.reader()).unwrap();
        let after = &changes[0].after;
        let parsed: DocumentMut = after.parse().unwrap();
        assert_eq!(parsed["short-name-mode"].as_str(), Some("enforcing"));
        let regs = parsed["registry"].as_array_of_tables().unwrap();
        assert_eq!(regs.len(), 3);
        assert_eq!(regs.get(0).unwrap()["prefix"].as_str(), Some("quay.io"));
        let docker = regs.get(1).unwrap();
        assert_eq!(docker["prefix"].as_str(), Some("docker.io"));
        let mirror = docker["mirror"]
            .as_array_of_tables()
            .unwrap()
            .get(0)
            .unwrap();
        assert_eq!(mirror["location"].as_str(), Some("127.0.0.1:4001"));
        assert_eq!(mirror["insecure"].as_bool(), Some(true));
        assert_eq!(
            parsed["unqualified-search-registries"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        files.apply(&changes);
        let again = registries_conf(&cfg, PROXY, &files.reader()).unwrap();
        assert!(again[0].is_noop(), "{}", again[0].diff());
        let v1 = Files::new(&[(
            "/etc/containers/registries.conf",
            "[registries.search]\nregistries = ['docker.io']\n",
        )]);
        assert!(registries_conf(&cfg, PROXY, &v1.reader())
            .unwrap_err()
            .to_string()
            .contains("v1 format"));
    }

    #[test]
    fn docker_daemon_json() {
        let files = Files::new(&[(
            "/etc/docker/daemon.json",
            "{\n  \"log-driver\": \"json-file\",\n  \"proxies\": {\"no-proxy\": \"localhost\"}\n}\n",
        )]);
        let cfg = Docker::default();
        let changes = docker(&cfg, PROXY, &files.reader()).unwrap();
        let json: serde_json::Value = serde_json::from_str(&changes[0].after).unwrap();
        assert_eq!(json["log-driver"], "json-file");
        assert_eq!(json["proxies"]["no-proxy"], "localhost");
        assert_eq!(json["proxies"]["http-proxy"], PROXY);
        assert_eq!(json["proxies"]["https-proxy"], PROXY);
        assert!(changes[0].after.find("log-driver") < changes[0].after.find("proxies"));
        files.apply(&changes);
        assert!(docker(&cfg, PROXY, &files.reader()).unwrap()[0].is_noop());
        let _ = files.get("/etc/docker/daemon.json");
        let bad = Files::new(&[("/etc/docker/daemon.json", "[1]")]);
        assert!(docker(&cfg, PROXY, &bad.reader()).is_err());
    }
}
