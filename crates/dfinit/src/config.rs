//! `dfinit.yaml`, upstream's keys: the proxy address and one container runtime.

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/dragonfly/dfinit.yaml";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub proxy: Proxy,
    pub container_runtime: ContainerRuntime,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Proxy {
    /// The dfdaemon proxy, as the runtime reaches it.
    pub addr: String,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            addr: "http://127.0.0.1:4001".into(),
        }
    }
}

/// Exactly one runtime is configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerRuntime {
    pub containerd: Option<Containerd>,
    pub crio: Option<Registries>,
    pub podman: Option<Registries>,
    pub docker: Option<Docker>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Containerd {
    /// containerd's own config file, where `config_path` (the hosts directory) is found.
    pub config_path: PathBuf,
    pub registries: Vec<ContainerdRegistry>,
    /// One `_default/hosts.toml` for every registry (the proxy reads the registry from the
    /// `ns` parameter containerd adds).
    pub proxy_all_registries: bool,
}

impl Default for Containerd {
    fn default() -> Self {
        Containerd {
            config_path: "/etc/containerd/config.toml".into(),
            registries: Vec::new(),
            proxy_all_registries: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerdRegistry {
    /// `docker.io`, `ghcr.io`, `registry.example:5000`, ...
    pub host_namespace: String,
    /// The registry itself (`https://index.docker.io`).
    pub server_addr: String,
    pub capabilities: Vec<String>,
    pub skip_verify: Option<bool>,
    pub ca: Vec<String>,
}

impl Default for ContainerdRegistry {
    fn default() -> Self {
        ContainerdRegistry {
            host_namespace: String::new(),
            server_addr: String::new(),
            capabilities: vec!["pull".into(), "resolve".into()],
            skip_verify: None,
            ca: Vec::new(),
        }
    }
}

/// CRI-O's and Podman's `registries.conf`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Registries {
    pub enable: Option<bool>,
    pub config_path: PathBuf,
    pub unqualified_search_registries: Vec<String>,
    pub registries: Vec<MirroredRegistry>,
}

impl Default for Registries {
    fn default() -> Self {
        Registries {
            enable: None,
            config_path: "/etc/containers/registries.conf".into(),
            unqualified_search_registries: vec![
                "registry.fedoraproject.org".into(),
                "registry.access.redhat.com".into(),
                "docker.io".into(),
            ],
            registries: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct MirroredRegistry {
    pub prefix: String,
    pub location: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Docker {
    pub config_path: PathBuf,
}

impl Default for Docker {
    fn default() -> Self {
        Docker {
            config_path: "/etc/docker/daemon.json".into(),
        }
    }
}

/// The runtime to configure.
#[derive(Debug, Clone)]
pub enum Runtime {
    Containerd(Containerd),
    Crio(Registries),
    Podman(Registries),
    Docker(Docker),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {key}: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text).map_err(|(key, reason)| match key {
            Some(key) => ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                reason,
            },
            None => ConfigError::Parse {
                path: path.to_path_buf(),
                reason,
            },
        })
    }

    /// Parses and validates; an error names the key when it is about one.
    pub fn parse(text: &str) -> Result<Config, (Option<&'static str>, String)> {
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| (None, e.to_string()))?
        };
        let proxy = url::Url::parse(&config.proxy.addr)
            .map_err(|e| (Some("proxy.addr"), format!("{:?}: {e}", config.proxy.addr)))?;
        if !matches!(proxy.scheme(), "http" | "https") || proxy.host_str().is_none() {
            return Err((
                Some("proxy.addr"),
                format!(
                    "{:?} must be an http(s) URL such as http://127.0.0.1:4001",
                    config.proxy.addr
                ),
            ));
        }
        config.runtime()?;
        if let Some(c) = &config.container_runtime.containerd {
            for r in &c.registries {
                if r.host_namespace.is_empty()
                    || r.host_namespace.contains('/')
                    || r.host_namespace.contains("..")
                {
                    return Err((
                        Some("containerRuntime.containerd.registries[].hostNamespace"),
                        format!("{:?} must be a registry host[:port]", r.host_namespace),
                    ));
                }
                let server = url::Url::parse(&r.server_addr).map_err(|e| {
                    (
                        Some("containerRuntime.containerd.registries[].serverAddr"),
                        format!("{:?}: {e}", r.server_addr),
                    )
                })?;
                if !matches!(server.scheme(), "http" | "https") {
                    return Err((
                        Some("containerRuntime.containerd.registries[].serverAddr"),
                        format!("{:?} must be an http(s) URL", r.server_addr),
                    ));
                }
            }
            if c.registries.is_empty() && !c.proxy_all_registries {
                return Err((
                    Some("containerRuntime.containerd.registries"),
                    "name at least one registry, or set proxyAllRegistries: true".into(),
                ));
            }
        }
        for (key, r) in [
            (
                "containerRuntime.crio.registries[]",
                &config.container_runtime.crio,
            ),
            (
                "containerRuntime.podman.registries[]",
                &config.container_runtime.podman,
            ),
        ] {
            if let Some(r) = r {
                if r.registries
                    .iter()
                    .any(|m| m.prefix.is_empty() || m.location.is_empty())
                {
                    return Err((Some(key), "prefix and location must be set".into()));
                }
            }
        }
        Ok(config)
    }

    /// The one runtime configured.
    pub fn runtime(&self) -> Result<Runtime, (Option<&'static str>, String)> {
        let c = &self.container_runtime;
        let mut found = Vec::new();
        if let Some(x) = &c.containerd {
            found.push(Runtime::Containerd(x.clone()));
        }
        if let Some(x) = &c.crio {
            if x.enable != Some(false) {
                found.push(Runtime::Crio(x.clone()));
            }
        }
        if let Some(x) = &c.podman {
            if x.enable != Some(false) {
                found.push(Runtime::Podman(x.clone()));
            }
        }
        if let Some(x) = &c.docker {
            found.push(Runtime::Docker(x.clone()));
        }
        match found.len() {
            1 => Ok(found.pop().expect("one")),
            0 => Err((
                Some("containerRuntime"),
                "configure one of containerd, crio, podman, docker".into(),
            )),
            _ => Err((
                Some("containerRuntime"),
                "configure only one of containerd, crio, podman, docker".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_style_files() {
        let c = Config::parse(
            r#"
proxy:
  addr: http://127.0.0.1:4001
containerRuntime:
  containerd:
    configPath: /etc/containerd/config.toml
    registries:
      - hostNamespace: docker.io
        serverAddr: https://index.docker.io
        capabilities: ['pull', 'resolve']
      - hostNamespace: registry.example:5000
        serverAddr: http://registry.example:5000
        skipVerify: true
"#,
        )
        .unwrap();
        let Runtime::Containerd(ctd) = c.runtime().unwrap() else {
            panic!("containerd")
        };
        assert_eq!(ctd.registries.len(), 2);
        assert_eq!(ctd.registries[1].capabilities, ["pull", "resolve"]);
        assert_eq!(ctd.registries[1].skip_verify, Some(true));

        let c = Config::parse("containerRuntime:\n  docker: {}\n").unwrap();
        assert!(
            matches!(c.runtime().unwrap(), Runtime::Docker(d) if d.config_path == Path::new("/etc/docker/daemon.json"))
        );
        let c = Config::parse(
            "containerRuntime:\n  crio:\n    registries:\n      - prefix: docker.io\n        location: docker.io\n",
        )
        .unwrap();
        assert!(matches!(c.runtime().unwrap(), Runtime::Crio(_)));
    }

    #[test]
    fn bad_files_name_the_key() {
        let cases = [
            ("", "containerRuntime"),
            ("containerRuntime:\n  docker: {}\n  podman: {}\n", "only one"),
            ("proxy:\n  addr: 127.0.0.1:4001\ncontainerRuntime:\n  docker: {}\n", "proxy.addr"),
            ("containerRuntime:\n  containerd: {}\n", "proxyAllRegistries"),
            (
                "containerRuntime:\n  containerd:\n    registries:\n      - hostNamespace: ../x\n        serverAddr: https://x\n",
                "hostNamespace",
            ),
            (
                "containerRuntime:\n  containerd:\n    registries:\n      - hostNamespace: x\n        serverAddr: x\n",
                "serverAddr",
            ),
            ("containerRuntime:\n  dokcer: {}\n", "unknown field `dokcer`"),
        ];
        for (yaml, needle) in cases {
            let (key, reason) = Config::parse(yaml).unwrap_err();
            let text = format!("{key:?} {reason}");
            assert!(text.contains(needle), "{yaml:?}: {text}");
        }
    }
}
