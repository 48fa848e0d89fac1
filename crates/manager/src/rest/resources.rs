//! The plain resources of `/api/v1`: what a create or update request may carry, how it
//! is checked (400 naming the field), and which row it becomes.

use crate::models::*;
use crate::store::Value;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;

/// A field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

pub fn field(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

type Fields = Vec<(&'static str, Value)>;

/// A table the API exposes with create, list, get, update and delete.
pub trait Resource: Serialize + Send + Sync + 'static {
    const TABLE: &'static str;
    /// The path segment under `/api/v1` (also the open API's scope, singular).
    const PATH: &'static str;
    type Create: DeserializeOwned + Send;
    type Update: DeserializeOwned + Send;
    fn from_row(row: &AnyRow) -> Self;
    fn create(req: Self::Create) -> Result<Fields, FieldError>;
    fn update(req: Self::Update) -> Result<Fields, FieldError>;
    /// List filters (query parameter → column) that may be used.
    const FILTERS: &'static [&'static str] = &[];
}

fn name_ok(field_name: &'static str, name: &str) -> Result<(), FieldError> {
    if name.is_empty() || name.len() > 255 {
        return Err(field(field_name, "must be 1 to 255 characters"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(field(field_name, "must not contain control characters"));
    }
    Ok(())
}

fn json(v: &impl Serialize) -> Value {
    Value::Str(serde_json::to_string(v).expect("serializable"))
}

fn scopes_ok(scopes: &Scopes) -> Result<(), FieldError> {
    for cidr in &scopes.cidrs {
        if cidr.parse::<ipnet::IpNet>().is_err() {
            return Err(field("scopes.cidrs", format!("{cidr:?} is not a CIDR")));
        }
    }
    for pattern in &scopes.hostnames {
        if regex::Regex::new(pattern).is_err() {
            return Err(field(
                "scopes.hostnames",
                format!("{pattern:?} is not a regular expression"),
            ));
        }
    }
    Ok(())
}

fn port_ok(name: &'static str, port: i64) -> Result<(), FieldError> {
    if !(1..=65535).contains(&port) {
        return Err(field(name, "must be a port between 1 and 65535"));
    }
    Ok(())
}

fn ip_ok(ip: &str) -> Result<(), FieldError> {
    ip.parse::<std::net::IpAddr>()
        .map(|_| ())
        .map_err(|_| field("ip", format!("{ip:?} is not an IP address")))
}

// ---- scheduler clusters ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedulerCluster {
    pub name: String,
    #[serde(default)]
    pub bio: String,
    #[serde(default)]
    pub config: Option<SchedulerClusterConfig>,
    #[serde(default)]
    pub client_config: Option<ClientConfig>,
    #[serde(default)]
    pub seed_client_config: Option<ClientConfig>,
    #[serde(default)]
    pub scopes: Option<Scopes>,
    #[serde(default)]
    pub is_default: bool,
    #[serde(default)]
    pub seed_peer_cluster_id: i64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateSchedulerCluster {
    pub name: Option<String>,
    pub bio: Option<String>,
    pub config: Option<SchedulerClusterConfig>,
    pub client_config: Option<ClientConfig>,
    pub seed_client_config: Option<ClientConfig>,
    pub scopes: Option<Scopes>,
    pub is_default: Option<bool>,
    pub seed_peer_cluster_id: Option<i64>,
}

fn cluster_config_ok(c: &SchedulerClusterConfig) -> Result<(), FieldError> {
    if !(1..=20).contains(&c.candidate_parent_limit) {
        return Err(field("config.candidate_parent_limit", "must be 1 to 20"));
    }
    if !(10..=1000).contains(&c.filter_parent_limit) {
        return Err(field("config.filter_parent_limit", "must be 10 to 1000"));
    }
    Ok(())
}

fn client_config_ok(name: &'static str, c: &ClientConfig) -> Result<(), FieldError> {
    if !(1..=50_000).contains(&c.load_limit) {
        return Err(field(name, "load_limit must be 1 to 50000"));
    }
    Ok(())
}

impl Resource for SchedulerCluster {
    const TABLE: &'static str = "scheduler_clusters";
    const PATH: &'static str = "scheduler-clusters";
    type Create = CreateSchedulerCluster;
    type Update = UpdateSchedulerCluster;
    fn from_row(row: &AnyRow) -> Self {
        SchedulerCluster::from_row(row)
    }
    fn create(r: CreateSchedulerCluster) -> Result<Fields, FieldError> {
        name_ok("name", &r.name)?;
        let config = r.config.unwrap_or_default();
        cluster_config_ok(&config)?;
        let client = r.client_config.unwrap_or_default();
        client_config_ok("client_config", &client)?;
        let seed_client = r.seed_client_config.unwrap_or(ClientConfig {
            load_limit: 2000,
            block_list: None,
        });
        client_config_ok("seed_client_config", &seed_client)?;
        let scopes = r.scopes.unwrap_or_default();
        scopes_ok(&scopes)?;
        let mut f: Fields = vec![
            ("name", r.name.into()),
            ("bio", r.bio.into()),
            ("config", json(&config)),
            ("client_config", json(&client)),
            ("seed_client_config", json(&seed_client)),
            ("scopes", json(&scopes)),
            ("is_default", r.is_default.into()),
            ("seed_peer_cluster_id", r.seed_peer_cluster_id.into()),
        ];
        f.extend(created());
        Ok(f)
    }
    fn update(r: UpdateSchedulerCluster) -> Result<Fields, FieldError> {
        let mut f: Fields = vec![updated()];
        if let Some(name) = r.name {
            name_ok("name", &name)?;
            f.push(("name", name.into()));
        }
        if let Some(bio) = r.bio {
            f.push(("bio", bio.into()));
        }
        if let Some(c) = r.config {
            cluster_config_ok(&c)?;
            f.push(("config", json(&c)));
        }
        if let Some(c) = r.client_config {
            client_config_ok("client_config", &c)?;
            f.push(("client_config", json(&c)));
        }
        if let Some(c) = r.seed_client_config {
            client_config_ok("seed_client_config", &c)?;
            f.push(("seed_client_config", json(&c)));
        }
        if let Some(s) = r.scopes {
            scopes_ok(&s)?;
            f.push(("scopes", json(&s)));
        }
        if let Some(d) = r.is_default {
            f.push(("is_default", d.into()));
        }
        if let Some(id) = r.seed_peer_cluster_id {
            f.push(("seed_peer_cluster_id", id.into()));
        }
        Ok(f)
    }
}

// ---- seed peer clusters ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSeedPeerCluster {
    pub name: String,
    #[serde(default)]
    pub bio: String,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    #[serde(default)]
    pub scheduler_cluster_id: i64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateSeedPeerCluster {
    pub name: Option<String>,
    pub bio: Option<String>,
    pub config: Option<serde_json::Value>,
    pub scheduler_cluster_id: Option<i64>,
}

impl Resource for SeedPeerCluster {
    const TABLE: &'static str = "seed_peer_clusters";
    const PATH: &'static str = "seed-peer-clusters";
    type Create = CreateSeedPeerCluster;
    type Update = UpdateSeedPeerCluster;
    fn from_row(row: &AnyRow) -> Self {
        SeedPeerCluster::from_row(row)
    }
    fn create(r: CreateSeedPeerCluster) -> Result<Fields, FieldError> {
        name_ok("name", &r.name)?;
        let config = r.config.unwrap_or(serde_json::json!({"load_limit": 2000}));
        if !config.is_object() {
            return Err(field("config", "must be an object"));
        }
        let mut f: Fields = vec![
            ("name", r.name.into()),
            ("bio", r.bio.into()),
            ("config", json(&config)),
            ("scheduler_cluster_id", r.scheduler_cluster_id.into()),
        ];
        f.extend(created());
        Ok(f)
    }
    fn update(r: UpdateSeedPeerCluster) -> Result<Fields, FieldError> {
        let mut f: Fields = vec![updated()];
        if let Some(name) = r.name {
            name_ok("name", &name)?;
            f.push(("name", name.into()));
        }
        if let Some(bio) = r.bio {
            f.push(("bio", bio.into()));
        }
        if let Some(c) = r.config {
            if !c.is_object() {
                return Err(field("config", "must be an object"));
            }
            f.push(("config", json(&c)));
        }
        if let Some(id) = r.scheduler_cluster_id {
            f.push(("scheduler_cluster_id", id.into()));
        }
        Ok(f)
    }
}

// ---- schedulers and seed peers (usually self-registered over gRPC) ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateScheduler {
    pub hostname: String,
    pub ip: String,
    pub port: i64,
    #[serde(default)]
    pub idc: String,
    #[serde(default)]
    pub location: String,
    pub scheduler_cluster_id: i64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateScheduler {
    pub idc: Option<String>,
    pub location: Option<String>,
    pub ip: Option<String>,
    pub port: Option<i64>,
    pub scheduler_cluster_id: Option<i64>,
}

impl Resource for Scheduler {
    const TABLE: &'static str = "schedulers";
    const PATH: &'static str = "schedulers";
    type Create = CreateScheduler;
    type Update = UpdateScheduler;
    const FILTERS: &'static [&'static str] = &["scheduler_cluster_id", "state", "hostname", "ip"];
    fn from_row(row: &AnyRow) -> Self {
        Scheduler::from_row(row)
    }
    fn create(r: CreateScheduler) -> Result<Fields, FieldError> {
        name_ok("hostname", &r.hostname)?;
        ip_ok(&r.ip)?;
        port_ok("port", r.port)?;
        let mut f: Fields = vec![
            ("hostname", r.hostname.into()),
            ("ip", r.ip.into()),
            ("port", r.port.into()),
            ("idc", r.idc.into()),
            ("location", r.location.into()),
            ("state", INACTIVE.into()),
            ("features", "[\"schedule\",\"preheat\"]".into()),
            ("scheduler_cluster_id", r.scheduler_cluster_id.into()),
        ];
        f.extend(created());
        Ok(f)
    }
    fn update(r: UpdateScheduler) -> Result<Fields, FieldError> {
        let mut f: Fields = vec![updated()];
        if let Some(v) = r.idc {
            f.push(("idc", v.into()));
        }
        if let Some(v) = r.location {
            f.push(("location", v.into()));
        }
        if let Some(v) = r.ip {
            ip_ok(&v)?;
            f.push(("ip", v.into()));
        }
        if let Some(v) = r.port {
            port_ok("port", v)?;
            f.push(("port", v.into()));
        }
        if let Some(v) = r.scheduler_cluster_id {
            f.push(("scheduler_cluster_id", v.into()));
        }
        Ok(f)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSeedPeer {
    pub hostname: String,
    #[serde(rename = "type", default = "super_kind")]
    pub kind: String,
    pub ip: String,
    pub port: i64,
    pub download_port: i64,
    #[serde(default)]
    pub object_storage_port: i64,
    #[serde(default)]
    pub idc: String,
    #[serde(default)]
    pub location: String,
    pub seed_peer_cluster_id: i64,
}

fn super_kind() -> String {
    "super".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateSeedPeer {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub idc: Option<String>,
    pub location: Option<String>,
    pub ip: Option<String>,
    pub port: Option<i64>,
    pub download_port: Option<i64>,
    pub seed_peer_cluster_id: Option<i64>,
}

fn seed_kind_ok(kind: &str) -> Result<(), FieldError> {
    if !matches!(kind, "super" | "strong" | "weak") {
        return Err(field("type", "must be super, strong or weak"));
    }
    Ok(())
}

impl Resource for SeedPeer {
    const TABLE: &'static str = "seed_peers";
    const PATH: &'static str = "seed-peers";
    type Create = CreateSeedPeer;
    type Update = UpdateSeedPeer;
    const FILTERS: &'static [&'static str] = &["seed_peer_cluster_id", "state", "hostname", "ip"];
    fn from_row(row: &AnyRow) -> Self {
        SeedPeer::from_row(row)
    }
    fn create(r: CreateSeedPeer) -> Result<Fields, FieldError> {
        name_ok("hostname", &r.hostname)?;
        seed_kind_ok(&r.kind)?;
        ip_ok(&r.ip)?;
        port_ok("port", r.port)?;
        port_ok("download_port", r.download_port)?;
        let mut f: Fields = vec![
            ("hostname", r.hostname.into()),
            ("kind", r.kind.into()),
            ("ip", r.ip.into()),
            ("port", r.port.into()),
            ("download_port", r.download_port.into()),
            ("object_storage_port", r.object_storage_port.into()),
            ("idc", r.idc.into()),
            ("location", r.location.into()),
            ("state", INACTIVE.into()),
            ("seed_peer_cluster_id", r.seed_peer_cluster_id.into()),
        ];
        f.extend(created());
        Ok(f)
    }
    fn update(r: UpdateSeedPeer) -> Result<Fields, FieldError> {
        let mut f: Fields = vec![updated()];
        if let Some(v) = r.kind {
            seed_kind_ok(&v)?;
            f.push(("kind", v.into()));
        }
        if let Some(v) = r.idc {
            f.push(("idc", v.into()));
        }
        if let Some(v) = r.location {
            f.push(("location", v.into()));
        }
        if let Some(v) = r.ip {
            ip_ok(&v)?;
            f.push(("ip", v.into()));
        }
        if let Some(v) = r.port {
            port_ok("port", v)?;
            f.push(("port", v.into()));
        }
        if let Some(v) = r.download_port {
            port_ok("download_port", v)?;
            f.push(("download_port", v.into()));
        }
        if let Some(v) = r.seed_peer_cluster_id {
            f.push(("seed_peer_cluster_id", v.into()));
        }
        Ok(f)
    }
}

// ---- peers (written by the schedulers' reports; the API reads and deletes) ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreatePeer {
    pub hostname: String,
    #[serde(rename = "type", default = "normal_kind")]
    pub kind: String,
    pub ip: String,
    pub port: i64,
    pub download_port: i64,
    #[serde(default)]
    pub idc: String,
    #[serde(default)]
    pub location: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub platform: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub git_commit: String,
    pub scheduler_cluster_id: i64,
}

fn normal_kind() -> String {
    "normal".into()
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdatePeer {
    pub state: Option<String>,
}

impl Resource for Peer {
    const TABLE: &'static str = "peers";
    const PATH: &'static str = "peers";
    type Create = CreatePeer;
    type Update = UpdatePeer;
    const FILTERS: &'static [&'static str] = &["scheduler_cluster_id", "state", "hostname", "ip"];
    fn from_row(row: &AnyRow) -> Self {
        Peer::from_row(row)
    }
    fn create(r: CreatePeer) -> Result<Fields, FieldError> {
        name_ok("hostname", &r.hostname)?;
        ip_ok(&r.ip)?;
        port_ok("port", r.port)?;
        port_ok("download_port", r.download_port)?;
        let mut f: Fields = vec![
            ("hostname", r.hostname.into()),
            ("kind", r.kind.into()),
            ("ip", r.ip.into()),
            ("port", r.port.into()),
            ("download_port", r.download_port.into()),
            ("idc", r.idc.into()),
            ("location", r.location.into()),
            ("os", r.os.into()),
            ("platform", r.platform.into()),
            ("version", r.version.into()),
            ("git_commit", r.git_commit.into()),
            ("state", ACTIVE.into()),
            ("scheduler_cluster_id", r.scheduler_cluster_id.into()),
        ];
        f.extend(created());
        Ok(f)
    }
    fn update(r: UpdatePeer) -> Result<Fields, FieldError> {
        let mut f: Fields = vec![updated()];
        if let Some(s) = r.state {
            if s != ACTIVE && s != INACTIVE {
                return Err(field("state", "must be active or inactive"));
            }
            f.push(("state", s.into()));
        }
        Ok(f)
    }
}

// ---- applications and configs ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApplication {
    pub name: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub bio: String,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub user_id: i64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateApplication {
    pub name: Option<String>,
    pub url: Option<String>,
    pub bio: Option<String>,
    pub priority: Option<Priority>,
    pub user_id: Option<i64>,
}

fn priority_ok(p: &Priority) -> Result<(), FieldError> {
    if !(0..=6).contains(&p.value) {
        return Err(field("priority.value", "must be 0 to 6"));
    }
    for u in &p.urls {
        if !(0..=6).contains(&u.value) {
            return Err(field("priority.urls[].value", "must be 0 to 6"));
        }
        if regex::Regex::new(&u.regex).is_err() {
            return Err(field(
                "priority.urls[].regex",
                format!("{:?} is not a regular expression", u.regex),
            ));
        }
    }
    Ok(())
}

impl Resource for Application {
    const TABLE: &'static str = "applications";
    const PATH: &'static str = "applications";
    type Create = CreateApplication;
    type Update = UpdateApplication;
    fn from_row(row: &AnyRow) -> Self {
        Application::from_row(row)
    }
    fn create(r: CreateApplication) -> Result<Fields, FieldError> {
        name_ok("name", &r.name)?;
        priority_ok(&r.priority)?;
        let mut f: Fields = vec![
            ("name", r.name.into()),
            ("url", r.url.into()),
            ("bio", r.bio.into()),
            ("priority", json(&r.priority)),
            ("user_id", r.user_id.into()),
        ];
        f.extend(created());
        Ok(f)
    }
    fn update(r: UpdateApplication) -> Result<Fields, FieldError> {
        let mut f: Fields = vec![updated()];
        if let Some(v) = r.name {
            name_ok("name", &v)?;
            f.push(("name", v.into()));
        }
        if let Some(v) = r.url {
            f.push(("url", v.into()));
        }
        if let Some(v) = r.bio {
            f.push(("bio", v.into()));
        }
        if let Some(p) = r.priority {
            priority_ok(&p)?;
            f.push(("priority", json(&p)));
        }
        if let Some(v) = r.user_id {
            f.push(("user_id", v.into()));
        }
        Ok(f)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateConfig {
    pub name: String,
    pub value: String,
    #[serde(default)]
    pub bio: String,
    #[serde(default)]
    pub user_id: i64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfig {
    pub name: Option<String>,
    pub value: Option<String>,
    pub bio: Option<String>,
    pub user_id: Option<i64>,
}

impl Resource for Config {
    const TABLE: &'static str = "configs";
    const PATH: &'static str = "configs";
    type Create = CreateConfig;
    type Update = UpdateConfig;
    fn from_row(row: &AnyRow) -> Self {
        Config::from_row(row)
    }
    fn create(r: CreateConfig) -> Result<Fields, FieldError> {
        name_ok("name", &r.name)?;
        let mut f: Fields = vec![
            ("name", r.name.into()),
            ("value", r.value.into()),
            ("bio", r.bio.into()),
            ("user_id", r.user_id.into()),
        ];
        f.extend(created());
        Ok(f)
    }
    fn update(r: UpdateConfig) -> Result<Fields, FieldError> {
        let mut f: Fields = vec![updated()];
        if let Some(v) = r.name {
            name_ok("name", &v)?;
            f.push(("name", v.into()));
        }
        if let Some(v) = r.value {
            f.push(("value", v.into()));
        }
        if let Some(v) = r.bio {
            f.push(("bio", v.into()));
        }
        if let Some(v) = r.user_id {
            f.push(("user_id", v.into()));
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let bad_cidr = CreateSchedulerCluster {
            name: "c".into(),
            bio: String::new(),
            config: None,
            client_config: None,
            seed_client_config: None,
            scopes: Some(Scopes {
                cidrs: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }),
            is_default: false,
            seed_peer_cluster_id: 0,
        };
        assert_eq!(
            SchedulerCluster::create(bad_cidr).unwrap_err().field,
            "scopes.cidrs"
        );
        let err = <SchedulerCluster as Resource>::update(UpdateSchedulerCluster {
            config: Some(SchedulerClusterConfig {
                candidate_parent_limit: 0,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "config.candidate_parent_limit");
        let err = <Scheduler as Resource>::create(CreateScheduler {
            hostname: "s".into(),
            ip: "not-an-ip".into(),
            port: 8002,
            idc: String::new(),
            location: String::new(),
            scheduler_cluster_id: 1,
        })
        .unwrap_err();
        assert_eq!(err.field, "ip");
        let err = <Application as Resource>::create(CreateApplication {
            name: "a".into(),
            url: String::new(),
            bio: String::new(),
            priority: Priority {
                value: 9,
                urls: vec![],
            },
            user_id: 0,
        })
        .unwrap_err();
        assert_eq!(err.field, "priority.value");
    }
}
