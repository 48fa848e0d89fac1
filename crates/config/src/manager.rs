//! `manager.yaml`.
//!
//! Keys follow upstream's manager config (`server.rest.addr`, `server.grpc.port.start`,
//! `auth.jwt`, `database.type`/`mysql`/`postgres`/`redis`). Extensions: `database.type:
//! sqlite` with `database.sqlite.path` (the default: a file, nothing to set up), and
//! `database.url` (any sqlx URL, winning over the per-type sections). Sections upstream
//! has but this manager does not use (cache, network, security, ...) are accepted and
//! ignored so an upstream file still loads.

use crate::{load_yaml, parse_inline, ConfigError};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/dragonfly/manager.yaml";
pub const DEFAULT_REST_PORT: u16 = 8080;
pub const DEFAULT_GRPC_PORT: u16 = 65003;

type Ignored = Option<serde_yaml_ng::Value>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub auth: Auth,
    pub database: Database,
    pub metrics: Metrics,
    pub job: Job,
    /// Extension: how long a component may stay silent on its KeepAlive stream before it
    /// is marked inactive and left out of answers.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Ignored,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Ignored,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security: Ignored,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Ignored,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Ignored,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verbose: Ignored,
    #[serde(skip_serializing_if = "Option::is_none", rename = "pprofPort")]
    pub pprof_port: Ignored,
    /// The root password a new database starts with, given by the embedding program
    /// (`dragonfly up`); never read from a file. Otherwise `DRAGONFLY_INITIAL_ROOT_PASSWORD`
    /// or a generated one.
    #[serde(skip)]
    pub initial_root_password: Option<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = load_yaml(path)?;
        config.fill_defaults();
        config.validate()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let mut config: Config = parse_inline(text)?;
        config.fill_defaults();
        config.validate()?;
        Ok(config)
    }

    fn fill_defaults(&mut self) {
        if self.keep_alive_timeout.is_zero() {
            self.keep_alive_timeout = Duration::from_secs(30);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if self.server.grpc.port.start == 0
            || self.server.grpc.port.end < self.server.grpc.port.start
        {
            return invalid("server.grpc.port", "start must be > 0 and end >= start");
        }
        if let Some(tls) = &self.server.grpc.tls {
            if tls.cert.is_none() || tls.key.is_none() || tls.ca_cert.is_none() {
                return invalid(
                    "server.grpc.tls",
                    "set caCert, cert and key (mutual TLS) or leave tls out",
                );
            }
        }
        if self.auth.jwt.timeout.is_zero() {
            return invalid("auth.jwt.timeout", "must be greater than 0");
        }
        match self.database.kind.as_str() {
            "sqlite" | "mysql" | "postgres" => {}
            _ => return invalid("database.type", "must be sqlite, mysql or postgres"),
        }
        if let Some(url) = &self.database.url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("mysql://"))
            {
                return invalid(
                    "database.url",
                    "must start with sqlite:, postgres:// or mysql://",
                );
            }
        }
        Ok(())
    }

    /// The sqlx URL of the configured database.
    pub fn database_url(&self) -> String {
        if let Some(url) = &self.database.url {
            return url.clone();
        }
        let d = &self.database;
        match d.kind.as_str() {
            "mysql" => format!(
                "mysql://{}:{}@{}:{}/{}",
                enc(&d.mysql.user),
                enc(&d.mysql.password),
                d.mysql.host,
                d.mysql.port,
                d.mysql.dbname
            ),
            "postgres" => format!(
                "postgres://{}:{}@{}:{}/{}?sslmode={}",
                enc(&d.postgres.user),
                enc(&d.postgres.password),
                d.postgres.host,
                d.postgres.port,
                d.postgres.dbname,
                d.postgres.ssl_mode
            ),
            _ => format!("sqlite://{}", d.sqlite.path.display()),
        }
    }
}

/// Percent-encodes a URL user or password.
fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub name: String,
    pub rest: Rest,
    pub grpc: Grpc,
    pub cache_dir: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
    pub plugin_dir: Option<PathBuf>,
    pub work_home: Option<PathBuf>,
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_max_size: Ignored,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_max_age: Ignored,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_max_backups: Ignored,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            name: "d7y/manager".into(),
            rest: Rest::default(),
            grpc: Grpc::default(),
            cache_dir: None,
            log_dir: None,
            plugin_dir: None,
            work_home: None,
            log_level: None,
            log_max_size: None,
            log_max_age: None,
            log_max_backups: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Rest {
    /// `host:port` or `:port` (all addresses).
    pub addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Ignored,
}

impl Default for Rest {
    fn default() -> Self {
        Rest {
            addr: format!(":{DEFAULT_REST_PORT}"),
            tls: None,
        }
    }
}

impl Rest {
    /// The address to bind.
    pub fn socket_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        let addr = if self.addr.starts_with(':') {
            format!("0.0.0.0{}", self.addr)
        } else {
            self.addr.clone()
        };
        addr.parse().map_err(|_| ConfigError::Invalid {
            key: "server.rest.addr",
            message: format!("{:?} is not host:port or :port", self.addr),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Grpc {
    #[serde(rename = "advertiseIP")]
    pub advertise_ip: Option<IpAddr>,
    #[serde(rename = "listenIP")]
    pub listen_ip: Option<IpAddr>,
    pub port: PortRange,
    /// Mutual TLS (upstream's `server.grpc.tls`): with it, only clients with a certificate
    /// signed by `caCert` may register, keep alive or ask for schedulers.
    pub tls: Option<GrpcTls>,
}

/// TLS files of the gRPC server.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcTls {
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for Grpc {
    fn default() -> Self {
        Grpc {
            advertise_ip: None,
            listen_ip: None,
            port: PortRange {
                start: DEFAULT_GRPC_PORT,
                end: DEFAULT_GRPC_PORT,
            },
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Auth {
    pub jwt: Jwt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Jwt {
    pub realm: String,
    /// The signing key; generated once and kept in the database when empty (upstream
    /// ships a fixed default key; this manager never does).
    pub key: String,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_refresh: Duration,
}

impl Default for Jwt {
    fn default() -> Self {
        Jwt {
            realm: "Dragonfly".into(),
            key: String::new(),
            timeout: Duration::from_secs(14 * 24 * 3600),
            max_refresh: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Database {
    /// `sqlite` (default), `mysql` or `postgres`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Extension: an sqlx URL, winning over the sections below.
    pub url: Option<String>,
    pub sqlite: Sqlite,
    pub mysql: Mysql,
    pub postgres: Postgres,
    pub redis: Redis,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            kind: "sqlite".into(),
            url: None,
            sqlite: Sqlite::default(),
            mysql: Mysql::default(),
            postgres: Postgres::default(),
            redis: Redis::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Sqlite {
    pub path: PathBuf,
}

impl Default for Sqlite {
    fn default() -> Self {
        Sqlite {
            path: "/var/lib/dragonfly/manager/manager.db".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Mysql {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub migrate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Ignored,
    #[serde(skip_serializing_if = "Option::is_none", rename = "tlsConfig")]
    pub tls_config: Ignored,
}

impl Default for Mysql {
    fn default() -> Self {
        Mysql {
            user: "dragonfly".into(),
            password: String::new(),
            host: "127.0.0.1".into(),
            port: 3306,
            dbname: "manager".into(),
            migrate: true,
            tls: None,
            tls_config: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Postgres {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub ssl_mode: String,
    pub timezone: String,
    pub migrate: bool,
}

impl Default for Postgres {
    fn default() -> Self {
        Postgres {
            user: "dragonfly".into(),
            password: String::new(),
            host: "127.0.0.1".into(),
            port: 5432,
            dbname: "manager".into(),
            ssl_mode: "disable".into(),
            timezone: "UTC".into(),
            migrate: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Redis {
    /// `host:port` of each node; empty: no Redis (jobs queue in the database).
    pub addrs: Vec<String>,
    pub master_name: String,
    pub username: String,
    pub password: String,
    pub db: u32,
    #[serde(rename = "brokerDB")]
    pub broker_db: u32,
    #[serde(rename = "backendDB")]
    pub backend_db: u32,
}

impl Default for Redis {
    fn default() -> Self {
        Redis {
            addrs: Vec::new(),
            master_name: String::new(),
            username: String::new(),
            password: String::new(),
            db: 0,
            broker_db: 1,
            backend_db: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    pub enable: bool,
    pub addr: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enable: true,
            addr: ":8000".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Job {
    pub preheat: Preheat,
    #[serde(skip_serializing_if = "Option::is_none", rename = "rateLimit")]
    pub rate_limit: Ignored,
    #[serde(skip_serializing_if = "Option::is_none", rename = "syncPeers")]
    pub sync_peers: Ignored,
    /// How long a job may run before it ends in FAILURE.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Job {
    fn default() -> Self {
        Job {
            preheat: Preheat::default(),
            rate_limit: None,
            sync_peers: None,
            timeout: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Preheat {
    #[serde(with = "humantime_serde")]
    pub registry_timeout: Duration,
    pub tls: PreheatTls,
}

impl Default for Preheat {
    fn default() -> Self {
        Preheat {
            registry_timeout: Duration::from_secs(60),
            tls: PreheatTls::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct PreheatTls {
    pub insecure_skip_verify: bool,
    pub ca_cert: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_upstream_file() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.server.grpc.port.start, 65003);
        assert_eq!(c.server.rest.socket_addr().unwrap().port(), 8080);
        assert_eq!(
            c.database_url(),
            "sqlite:///var/lib/dragonfly/manager/manager.db"
        );
        assert!(c.auth.jwt.key.is_empty(), "no fixed default key");
        let c = Config::from_yaml(
            r#"
server:
  name: d7y/manager
  rest:
    addr: 127.0.0.1:18080
  grpc:
    advertiseIP: 127.0.0.1
    port: {start: 65003, end: 65003}
auth:
  jwt: {realm: Dragonfly, timeout: 48h, maxRefresh: 48h}
database:
  type: postgres
  postgres: {user: postgres, password: "p@ss", host: 127.0.0.1, port: 5432, dbname: test, sslMode: disable}
  redis: {addrs: ["127.0.0.1:6379"], brokerDB: 1, backendDB: 2}
cache:
  redis: {ttl: 5m}
security:
  autoIssueCert: false
"#,
        )
        .unwrap();
        assert_eq!(
            c.database_url(),
            "postgres://postgres:p%40ss@127.0.0.1:5432/test?sslmode=disable"
        );
        assert_eq!(c.database.redis.addrs, ["127.0.0.1:6379"]);
        assert_eq!(c.auth.jwt.timeout, Duration::from_secs(48 * 3600));
        for (yaml, needle) in [
            ("database: {type: oracle}", "database.type"),
            ("database: {url: 'ftp://x'}", "database.url"),
            (
                "server: {grpc: {port: {start: 0, end: 0}}}",
                "server.grpc.port",
            ),
            ("servre: {}", "unknown field `servre`"),
        ] {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml}: {err}");
        }
    }
}
