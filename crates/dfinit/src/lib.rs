//! dfinit: points a node's container runtime at the dfdaemon proxy, as upstream's dfinit
//! does: containerd's `hosts.toml` per registry (finding `config_path` in its
//! `config.toml`, or setting it), CRI-O's and Podman's `registries.conf` mirrors, Docker's
//! `daemon.json` proxies.
//!
//! [`runtime`] decides the new contents without I/O (and is idempotent: run on its own
//! output it changes nothing); [`change`] shows them as a diff or writes them atomically.

pub mod change;
pub mod config;
pub mod runtime;

use change::FileChange;
use config::{Config, Runtime};

/// The changes the configuration asks for, against the files as they are now.
pub fn plan(config: &Config) -> Result<Vec<FileChange>, runtime::InitError> {
    let reader = |p: &std::path::Path| change::read_optional(p);
    let proxy = &config.proxy.addr;
    let runtime = config
        .runtime()
        .expect("validated when the config was loaded");
    match runtime {
        Runtime::Containerd(c) => runtime::containerd(&c, proxy, &reader),
        Runtime::Crio(r) | Runtime::Podman(r) => runtime::registries_conf(&r, proxy, &reader),
        Runtime::Docker(d) => runtime::docker(&d, proxy, &reader),
    }
}
