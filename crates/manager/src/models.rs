//! The control plane's entities as the API shows them (upstream's JSON field names), and
//! how each maps to its table row.

use crate::store::{now, RowExt, Value};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

/// Unix seconds as RFC 3339 (what upstream's API and Harbor expect).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn json_or<T: serde::de::DeserializeOwned + Default>(text: &str) -> T {
    if text.is_empty() {
        return T::default();
    }
    serde_json::from_str(text).unwrap_or_default()
}

/// The timestamps every entity carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Stamps {
    pub created_at: String,
    pub updated_at: String,
}

impl Stamps {
    fn from_row(row: &AnyRow) -> Stamps {
        Stamps {
            created_at: rfc3339(row.int("created_at")),
            updated_at: rfc3339(row.int("updated_at")),
        }
    }
}

/// Fields stamped on insert.
pub fn created() -> Vec<(&'static str, Value)> {
    vec![("created_at", now().into()), ("updated_at", now().into())]
}

/// Field stamped on update.
pub fn updated() -> (&'static str, Value) {
    ("updated_at", now().into())
}

/// Roles: `root` may do everything, `guest` may read and manage its own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Root,
    Guest,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "root" => Some(Role::Root),
            "guest" => Some(Role::Guest),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Guest => "guest",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub avatar: String,
    pub phone: String,
    pub bio: String,
    pub location: String,
    pub state: String,
    pub role: String,
    #[serde(flatten)]
    pub stamps: Stamps,
    #[serde(skip)]
    pub password_hash: String,
}

impl User {
    pub fn from_row(row: &AnyRow) -> User {
        User {
            id: row.int("id"),
            name: row.text("name"),
            email: row.text("email"),
            avatar: row.text("avatar"),
            phone: row.text("phone"),
            bio: row.text("bio"),
            location: row.text("location"),
            state: row.text("state"),
            role: row.text("role"),
            stamps: Stamps::from_row(row),
            password_hash: row.text("password_hash"),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PersonalAccessToken {
    pub id: i64,
    pub name: String,
    pub bio: String,
    pub scopes: Vec<String>,
    pub state: String,
    pub expired_at: String,
    pub user_id: i64,
    /// Shown once, in the answer that created it; only its hash is stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(flatten)]
    pub stamps: Stamps,
    #[serde(skip)]
    pub expired_at_secs: i64,
}

impl PersonalAccessToken {
    pub fn from_row(row: &AnyRow) -> PersonalAccessToken {
        PersonalAccessToken {
            id: row.int("id"),
            name: row.text("name"),
            bio: row.text("bio"),
            scopes: json_or(&row.text("scopes")),
            state: row.text("state"),
            expired_at: rfc3339(row.int("expired_at")),
            user_id: row.int("user_id"),
            token: None,
            stamps: Stamps::from_row(row),
            expired_at_secs: row.int("expired_at"),
        }
    }
}

/// A scheduler cluster's scheduling settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SchedulerClusterConfig {
    pub candidate_parent_limit: u32,
    pub filter_parent_limit: u32,
    pub job_rate_limit: u32,
}

impl Default for SchedulerClusterConfig {
    /// This project's scheduler defaults (upstream's manager says 4 and 15): a scheduler
    /// that takes its config from the manager schedules as one that does not
    /// (BENCHMARKS.md measured these).
    fn default() -> Self {
        SchedulerClusterConfig {
            candidate_parent_limit: 8,
            filter_parent_limit: 40,
            job_rate_limit: 10,
        }
    }
}

/// The settings peers of a cluster receive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ClientConfig {
    pub load_limit: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_list: Option<serde_json::Value>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            load_limit: 200,
            block_list: None,
        }
    }
}

/// Which peers a cluster serves (the searcher matches peers against them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct Scopes {
    pub idc: String,
    pub location: String,
    pub cidrs: Vec<String>,
    pub hostnames: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SchedulerCluster {
    pub id: i64,
    pub name: String,
    pub bio: String,
    pub config: SchedulerClusterConfig,
    pub client_config: ClientConfig,
    pub seed_client_config: ClientConfig,
    pub scopes: Scopes,
    pub is_default: bool,
    pub seed_peer_cluster_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
}

impl SchedulerCluster {
    pub fn from_row(row: &AnyRow) -> SchedulerCluster {
        SchedulerCluster {
            id: row.int("id"),
            name: row.text("name"),
            bio: row.text("bio"),
            config: json_or(&row.text("config")),
            client_config: json_or(&row.text("client_config")),
            seed_client_config: json_or(&row.text("seed_client_config")),
            scopes: json_or(&row.text("scopes")),
            is_default: row.int("is_default") != 0,
            seed_peer_cluster_id: row.int("seed_peer_cluster_id"),
            stamps: Stamps::from_row(row),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SeedPeerCluster {
    pub id: i64,
    pub name: String,
    pub bio: String,
    pub config: serde_json::Value,
    pub scheduler_cluster_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
}

impl SeedPeerCluster {
    pub fn from_row(row: &AnyRow) -> SeedPeerCluster {
        let config = row.text("config");
        SeedPeerCluster {
            id: row.int("id"),
            name: row.text("name"),
            bio: row.text("bio"),
            config: if config.is_empty() {
                serde_json::json!({"load_limit": 2000})
            } else {
                serde_json::from_str(&config).unwrap_or(serde_json::Value::Null)
            },
            scheduler_cluster_id: row.int("scheduler_cluster_id"),
            stamps: Stamps::from_row(row),
        }
    }
}

/// Component states.
pub const ACTIVE: &str = "active";
pub const INACTIVE: &str = "inactive";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Scheduler {
    pub id: i64,
    pub hostname: String,
    pub idc: String,
    pub location: String,
    pub ip: String,
    pub port: i64,
    pub state: String,
    pub features: Vec<String>,
    pub scheduler_cluster_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
    #[serde(skip)]
    pub keepalive_at: i64,
}

impl Scheduler {
    pub fn from_row(row: &AnyRow) -> Scheduler {
        Scheduler {
            id: row.int("id"),
            hostname: row.text("hostname"),
            idc: row.text("idc"),
            location: row.text("location"),
            ip: row.text("ip"),
            port: row.int("port"),
            state: row.text("state"),
            features: json_or(&row.text("features")),
            scheduler_cluster_id: row.int("scheduler_cluster_id"),
            stamps: Stamps::from_row(row),
            keepalive_at: row.int("keepalive_at"),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SeedPeer {
    pub id: i64,
    pub hostname: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub idc: String,
    pub location: String,
    pub ip: String,
    pub port: i64,
    pub download_port: i64,
    pub object_storage_port: i64,
    pub state: String,
    pub seed_peer_cluster_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
    #[serde(skip)]
    pub keepalive_at: i64,
}

impl SeedPeer {
    pub fn from_row(row: &AnyRow) -> SeedPeer {
        SeedPeer {
            id: row.int("id"),
            hostname: row.text("hostname"),
            kind: row.text("kind"),
            idc: row.text("idc"),
            location: row.text("location"),
            ip: row.text("ip"),
            port: row.int("port"),
            download_port: row.int("download_port"),
            object_storage_port: row.int("object_storage_port"),
            state: row.text("state"),
            seed_peer_cluster_id: row.int("seed_peer_cluster_id"),
            stamps: Stamps::from_row(row),
            keepalive_at: row.int("keepalive_at"),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Peer {
    pub id: i64,
    pub hostname: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub idc: String,
    pub location: String,
    pub ip: String,
    pub port: i64,
    pub download_port: i64,
    pub state: String,
    pub os: String,
    pub platform: String,
    pub version: String,
    pub git_commit: String,
    pub scheduler_cluster_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
}

impl Peer {
    pub fn from_row(row: &AnyRow) -> Peer {
        Peer {
            id: row.int("id"),
            hostname: row.text("hostname"),
            kind: row.text("kind"),
            idc: row.text("idc"),
            location: row.text("location"),
            ip: row.text("ip"),
            port: row.int("port"),
            download_port: row.int("download_port"),
            state: row.text("state"),
            os: row.text("os"),
            platform: row.text("platform"),
            version: row.text("version"),
            git_commit: row.text("git_commit"),
            scheduler_cluster_id: row.int("scheduler_cluster_id"),
            stamps: Stamps::from_row(row),
        }
    }
}

/// An application's priority: a default level and per-URL-regex levels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct Priority {
    pub value: i32,
    pub urls: Vec<UrlPriority>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct UrlPriority {
    pub regex: String,
    pub value: i32,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Application {
    pub id: i64,
    pub name: String,
    pub url: String,
    pub bio: String,
    pub priority: Priority,
    pub user_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
}

impl Application {
    pub fn from_row(row: &AnyRow) -> Application {
        Application {
            id: row.int("id"),
            name: row.text("name"),
            url: row.text("url"),
            bio: row.text("bio"),
            priority: json_or(&row.text("priority")),
            user_id: row.int("user_id"),
            stamps: Stamps::from_row(row),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Config {
    pub id: i64,
    pub name: String,
    pub value: String,
    pub bio: String,
    pub user_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
}

impl Config {
    pub fn from_row(row: &AnyRow) -> Config {
        Config {
            id: row.int("id"),
            name: row.text("name"),
            value: row.text("value"),
            bio: row.text("bio"),
            user_id: row.int("user_id"),
            stamps: Stamps::from_row(row),
        }
    }
}

/// Job states as upstream's API shows them.
pub const PENDING: &str = "PENDING";
pub const SUCCESS: &str = "SUCCESS";
pub const FAILURE: &str = "FAILURE";

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Job {
    pub id: i64,
    pub task_id: String,
    pub bio: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: String,
    pub args: serde_json::Value,
    pub result: serde_json::Value,
    pub scheduler_cluster_ids: Vec<i64>,
    pub user_id: i64,
    #[serde(flatten)]
    pub stamps: Stamps,
}

impl Job {
    pub fn from_row(row: &AnyRow) -> Job {
        let parse = |text: String| {
            if text.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::from_str(&text).unwrap_or(serde_json::json!({}))
            }
        };
        Job {
            id: row.int("id"),
            task_id: row.text("task_id"),
            bio: row.text("bio"),
            kind: row.text("kind"),
            state: row.text("state"),
            args: parse(row.text("args")),
            result: parse(row.text("result")),
            scheduler_cluster_ids: json_or(&row.text("scheduler_cluster_ids")),
            user_id: row.int("user_id"),
            stamps: Stamps::from_row(row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_table() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_207_400), "2026-12-02T10:30:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
