//! The manager's schema, one description rendered for each database. Migrations are
//! numbered; a database records the ones it has applied in `schema_migrations`, and
//! start-up applies the rest in order.

use super::Dialect;

/// A column's portable type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// The table's auto-incrementing 64-bit key.
    Id,
    /// A 64-bit integer (also booleans as 0/1 and times as Unix seconds).
    Int,
    /// A short string that may be indexed (at most 255 characters).
    Str,
    /// Text of any length (JSON documents).
    Text,
}

impl Type {
    fn render(self, dialect: Dialect) -> &'static str {
        match (self, dialect) {
            (Type::Id, Dialect::Sqlite) => "INTEGER PRIMARY KEY AUTOINCREMENT",
            (Type::Id, Dialect::Postgres) => "BIGSERIAL PRIMARY KEY",
            (Type::Id, Dialect::MySql) => "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
            (Type::Int, _) => "BIGINT NOT NULL DEFAULT 0",
            (Type::Str, Dialect::MySql) => "VARCHAR(255) NOT NULL DEFAULT ''",
            (Type::Str, _) => "VARCHAR(255) NOT NULL DEFAULT ''",
            // MySQL 5.7 takes no default for TEXT: NULL, read back as empty.
            (Type::Text, Dialect::MySql) => "MEDIUMTEXT NULL",
            (Type::Text, _) => "TEXT NOT NULL DEFAULT ''",
        }
    }
}

/// A table: its columns and its unique and plain indexes.
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, Type)],
    pub unique: &'static [&'static [&'static str]],
    pub indexes: &'static [&'static [&'static str]],
}

impl Table {
    /// `CREATE TABLE` and its indexes, for `dialect`.
    pub fn render(&self, dialect: Dialect) -> Vec<String> {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|(name, ty)| format!("{name} {}", ty.render(dialect)))
            .collect();
        let mut out = vec![format!(
            "CREATE TABLE {} ({})",
            self.name,
            columns.join(", ")
        )];
        for (i, cols) in self.unique.iter().enumerate() {
            out.push(format!(
                "CREATE UNIQUE INDEX uk_{}_{i} ON {} ({})",
                self.name,
                self.name,
                cols.join(", ")
            ));
        }
        for (i, cols) in self.indexes.iter().enumerate() {
            out.push(format!(
                "CREATE INDEX idx_{}_{i} ON {} ({})",
                self.name,
                self.name,
                cols.join(", ")
            ));
        }
        out
    }
}

use Type::*;

/// Columns every entity has.
macro_rules! table {
    ($name:literal, [$($col:literal : $ty:ident),* $(,)?], unique: [$($u:expr),*], indexes: [$($i:expr),*]) => {
        Table {
            name: $name,
            columns: &[("id", Id), $(($col, $ty),)* ("created_at", Int), ("updated_at", Int)],
            unique: &[$($u),*],
            indexes: &[$($i),*],
        }
    };
}

/// Version 1: every table the control plane needs.
pub const V1: &[Table] = &[
    table!("settings", ["name": Str, "value": Text], unique: [&["name"]], indexes: []),
    table!(
        "users",
        ["name": Str, "email": Str, "avatar": Str, "phone": Str, "bio": Text, "location": Str,
         "password_hash": Str, "state": Str, "role": Str],
        unique: [&["name"]],
        indexes: []
    ),
    table!(
        "personal_access_tokens",
        ["name": Str, "bio": Text, "token_hash": Str, "scopes": Text, "state": Str,
         "expired_at": Int, "user_id": Int],
        unique: [&["token_hash"]],
        indexes: [&["user_id"]]
    ),
    table!(
        "scheduler_clusters",
        ["name": Str, "bio": Text, "config": Text, "client_config": Text,
         "seed_client_config": Text, "scopes": Text, "is_default": Int,
         "seed_peer_cluster_id": Int],
        unique: [&["name"]],
        indexes: []
    ),
    table!(
        "seed_peer_clusters",
        ["name": Str, "bio": Text, "config": Text, "scheduler_cluster_id": Int],
        unique: [&["name"]],
        indexes: []
    ),
    table!(
        "schedulers",
        ["hostname": Str, "idc": Str, "location": Str, "ip": Str, "port": Int, "state": Str,
         "features": Text, "keepalive_at": Int, "scheduler_cluster_id": Int],
        unique: [&["hostname", "ip", "scheduler_cluster_id"]],
        indexes: [&["scheduler_cluster_id"]]
    ),
    table!(
        "seed_peers",
        ["hostname": Str, "kind": Str, "idc": Str, "location": Str, "ip": Str, "port": Int,
         "download_port": Int, "object_storage_port": Int, "state": Str, "keepalive_at": Int,
         "seed_peer_cluster_id": Int],
        unique: [&["hostname", "ip", "seed_peer_cluster_id"]],
        indexes: [&["seed_peer_cluster_id"]]
    ),
    table!(
        "peers",
        ["hostname": Str, "kind": Str, "idc": Str, "location": Str, "ip": Str, "port": Int,
         "download_port": Int, "state": Str, "os": Str, "platform": Str, "version": Str,
         "git_commit": Str, "keepalive_at": Int, "scheduler_cluster_id": Int],
        unique: [&["hostname", "ip", "scheduler_cluster_id"]],
        indexes: [&["scheduler_cluster_id"]]
    ),
    table!(
        "applications",
        ["name": Str, "url": Str, "bio": Text, "priority": Text, "user_id": Int],
        unique: [&["name"]],
        indexes: []
    ),
    table!(
        "configs",
        ["name": Str, "value": Text, "bio": Text, "user_id": Int],
        unique: [&["name"]],
        indexes: []
    ),
    table!(
        "jobs",
        ["task_id": Str, "bio": Text, "kind": Str, "state": Str, "args": Text, "result": Text,
         "scheduler_cluster_ids": Text, "user_id": Int, "lease_owner": Str, "lease_until": Int],
        unique: [],
        indexes: [&["state"]]
    ),
];

/// The migrations in order: (version, tables).
pub const MIGRATIONS: &[(i64, &[Table])] = &[(1, V1)];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_for_each_database() {
        let users = &V1[1];
        let sqlite = users.render(Dialect::Sqlite);
        assert!(sqlite[0].starts_with(
            "CREATE TABLE users (id INTEGER PRIMARY KEY AUTOINCREMENT, name VARCHAR(255)"
        ));
        assert_eq!(sqlite[1], "CREATE UNIQUE INDEX uk_users_0 ON users (name)");
        assert!(users.render(Dialect::Postgres)[0].contains("id BIGSERIAL PRIMARY KEY"));
        let mysql = users.render(Dialect::MySql);
        assert!(mysql[0].contains("AUTO_INCREMENT") && mysql[0].contains("bio MEDIUMTEXT NULL"));
        assert!(mysql[0].ends_with(
            "created_at BIGINT NOT NULL DEFAULT 0, updated_at BIGINT NOT NULL DEFAULT 0)"
        ));
    }
}
