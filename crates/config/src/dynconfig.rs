//! `dynconfig.yaml`: how a dfdaemon without a manager finds its schedulers (upstream's
//! `dfdaemon --dynconfig FILE`). `scheduler.addrs` (a static `ip:port` list) wins over
//! `scheduler.addr` (one `host:port`, resolved through DNS to every scheduler).

use crate::{load_yaml, parse_inline, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The default dynconfig path.
pub const DEFAULT_DYNCONFIG_PATH: &str = "/etc/dragonfly/dynconfig.yaml";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Dynconfig {
    pub scheduler: SchedulerAddrs,
    // Block lists a manager would send; accepted, not used yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_config: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_client_config: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct SchedulerAddrs {
    pub addr: Option<String>,
    pub addrs: Vec<String>,
}

impl Dynconfig {
    pub fn load(path: &Path) -> Result<Dynconfig, ConfigError> {
        load_yaml(path)
    }

    pub fn from_yaml(text: &str) -> Result<Dynconfig, ConfigError> {
        parse_inline(text)
    }

    /// The scheduler addresses as written (not resolved): `addrs` if any, else `addr`.
    pub fn scheduler_addrs(&self) -> Vec<String> {
        if !self.scheduler.addrs.is_empty() {
            return self.scheduler.addrs.clone();
        }
        self.scheduler.addr.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addrs_win_over_addr() {
        let d = Dynconfig::from_yaml(
            "scheduler:\n  addr: dragonfly-scheduler:8002\n  addrs: [127.0.0.1:8002, 127.0.0.2:8002]\n",
        )
        .unwrap();
        assert_eq!(d.scheduler_addrs(), ["127.0.0.1:8002", "127.0.0.2:8002"]);
        let d = Dynconfig::from_yaml("scheduler:\n  addr: s:8002\n").unwrap();
        assert_eq!(d.scheduler_addrs(), ["s:8002"]);
        assert!(Dynconfig::from_yaml("")
            .unwrap()
            .scheduler_addrs()
            .is_empty());
        assert!(Dynconfig::from_yaml("schedulers: {}\n").is_err());
    }
}
