//! The manager's database: one schema and one set of queries for an SQLite file (the
//! default: zero setup), PostgreSQL and MySQL/MariaDB, through sqlx's `Any` driver.
//!
//! Portability rules the queries follow: `?` placeholders (rewritten to `$n` for
//! PostgreSQL), integers for booleans and times (Unix seconds), JSON documents as text,
//! no database-specific SQL outside [`Dialect`].

pub mod schema;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::time::Duration;

/// Why the store failed. Constraint violations are told apart: the API answers them 409.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {reason}")]
    Open { url: String, reason: String },
    #[error("database migration {version} failed: {reason}")]
    Migrate { version: i64, reason: String },
    #[error("{0} already exists")]
    Conflict(String),
    #[error("database error: {0}")]
    Db(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                return StoreError::Conflict(db.message().to_string());
            }
        }
        StoreError::Db(e.to_string())
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The database behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
    MySql,
}

impl Dialect {
    fn of(url: &str) -> Option<Dialect> {
        let scheme = url.split(':').next()?;
        match scheme {
            "sqlite" => Some(Dialect::Sqlite),
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            "mysql" | "mariadb" => Some(Dialect::MySql),
            _ => None,
        }
    }

    /// `?` placeholders as this database wants them.
    pub fn sql(self, query: &str) -> String {
        if self != Dialect::Postgres {
            return query.to_string();
        }
        let mut out = String::with_capacity(query.len() + 8);
        let mut n = 0;
        let mut in_string = false;
        for c in query.chars() {
            match c {
                '\'' => {
                    in_string = !in_string;
                    out.push(c);
                }
                '?' if !in_string => {
                    n += 1;
                    out.push('$');
                    out.push_str(&n.to_string());
                }
                _ => out.push(c),
            }
        }
        out
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// A value bound to a query.
#[derive(Debug, Clone)]
pub enum Value {
    Int(i64),
    Str(String),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v as i64)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v as i64)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Str(v.clone())
    }
}

/// The manager's database.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

impl Store {
    /// Opens (creating an SQLite file when needed) and migrates the database at `url`:
    /// `sqlite:///var/lib/dragonfly/manager.db`, `postgres://user@host/db`,
    /// `mysql://user:pass@host/db`.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let open_err = |reason: String| StoreError::Open {
            url: redact(url),
            reason,
        };
        let dialect = Dialect::of(url).ok_or_else(|| {
            open_err("the URL must start with sqlite:, postgres:// or mysql://".into())
        })?;
        let mut connect = url.to_string();
        if dialect == Dialect::Sqlite && !connect.contains("mode=") {
            connect.push_str(if connect.contains('?') { "&" } else { "?" });
            connect.push_str("mode=rwc");
        }
        let pool = AnyPoolOptions::new()
            // SQLite takes one writer at a time: more connections only wait on its lock.
            .max_connections(if dialect == Dialect::Sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            .connect(&connect)
            .await
            .map_err(|e| open_err(e.to_string()))?;
        if dialect == Dialect::Sqlite {
            for pragma in ["PRAGMA journal_mode=WAL", "PRAGMA busy_timeout=5000"] {
                sqlx::query(pragma)
                    .execute(&pool)
                    .await
                    .map_err(|e| open_err(e.to_string()))?;
            }
        }
        let store = Store { pool, dialect };
        store.migrate().await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Applies the migrations this database has not seen, each in a transaction.
    async fn migrate(&self) -> Result<()> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .execute(&self.pool)
            .await?;
        for (version, tables) in schema::MIGRATIONS {
            let applied: Option<i64> = self
                .fetch_optional(
                    "SELECT version FROM schema_migrations WHERE version = ?",
                    &[(*version).into()],
                )
                .await?
                .map(|row| row.try_get::<i64, _>("version"))
                .transpose()?;
            if applied.is_some() {
                continue;
            }
            let failed = |e: sqlx::Error| StoreError::Migrate {
                version: *version,
                reason: e.to_string(),
            };
            let mut tx = self.pool.begin().await.map_err(failed)?;
            for table in tables.iter() {
                for statement in table.render(self.dialect) {
                    sqlx::query(&statement)
                        .execute(&mut *tx)
                        .await
                        .map_err(failed)?;
                }
            }
            sqlx::query(
                &self
                    .dialect
                    .sql("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)"),
            )
            .bind(*version)
            .bind(now())
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
        }
        Ok(())
    }

    fn query<'q>(
        &self,
        sql: &'q str,
        values: &[Value],
    ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
        let mut query = sqlx::query(sql);
        for v in values {
            query = match v {
                Value::Int(i) => query.bind(*i),
                Value::Str(s) => query.bind(s.clone()),
            };
        }
        query
    }

    /// Runs a statement; returns the rows it touched.
    pub async fn execute(&self, sql: &str, values: &[Value]) -> Result<u64> {
        let sql = self.dialect.sql(sql);
        Ok(self
            .query(&sql, values)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    pub async fn fetch_all(&self, sql: &str, values: &[Value]) -> Result<Vec<AnyRow>> {
        let sql = self.dialect.sql(sql);
        Ok(self.query(&sql, values).fetch_all(&self.pool).await?)
    }

    pub async fn fetch_optional(&self, sql: &str, values: &[Value]) -> Result<Option<AnyRow>> {
        let sql = self.dialect.sql(sql);
        Ok(self.query(&sql, values).fetch_optional(&self.pool).await?)
    }

    /// Inserts a row; returns its new ID.
    pub async fn insert(&self, table: &str, fields: &[(&str, Value)]) -> Result<i64> {
        let names: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
        let marks = vec!["?"; fields.len()].join(", ");
        let values: Vec<Value> = fields.iter().map(|(_, v)| v.clone()).collect();
        let base = format!(
            "INSERT INTO {table} ({}) VALUES ({marks})",
            names.join(", ")
        );
        match self.dialect {
            Dialect::MySql => {
                let sql = self.dialect.sql(&base);
                let done = self.query(&sql, &values).execute(&self.pool).await?;
                done.last_insert_id()
                    .ok_or_else(|| StoreError::Db("no insert id".into()))
            }
            _ => {
                let sql = self.dialect.sql(&format!("{base} RETURNING id"));
                let row = self.query(&sql, &values).fetch_one(&self.pool).await?;
                Ok(row.try_get::<i64, _>("id")?)
            }
        }
    }

    /// Updates the given fields of row `id`; `false` when there is no such row.
    pub async fn update(&self, table: &str, id: i64, fields: &[(&str, Value)]) -> Result<bool> {
        if fields.is_empty() {
            return Ok(self
                .fetch_optional(
                    &format!("SELECT id FROM {table} WHERE id = ?"),
                    &[id.into()],
                )
                .await?
                .is_some());
        }
        let sets: Vec<String> = fields.iter().map(|(n, _)| format!("{n} = ?")).collect();
        let mut values: Vec<Value> = fields.iter().map(|(_, v)| v.clone()).collect();
        values.push(id.into());
        let touched = self
            .execute(
                &format!("UPDATE {table} SET {} WHERE id = ?", sets.join(", ")),
                &values,
            )
            .await?;
        // MySQL counts only changed rows; an update to the same values still found it.
        if touched == 0 && self.dialect == Dialect::MySql {
            return Ok(self
                .fetch_optional(
                    &format!("SELECT id FROM {table} WHERE id = ?"),
                    &[id.into()],
                )
                .await?
                .is_some());
        }
        Ok(touched > 0)
    }

    /// Deletes row `id`; `false` when there was none.
    pub async fn delete(&self, table: &str, id: i64) -> Result<bool> {
        Ok(self
            .execute(&format!("DELETE FROM {table} WHERE id = ?"), &[id.into()])
            .await?
            > 0)
    }

    /// Counts rows matching `where_sql` (e.g. `state = ?`, or `1 = 1`).
    pub async fn count(&self, table: &str, where_sql: &str, values: &[Value]) -> Result<i64> {
        let row = self
            .fetch_optional(
                &format!("SELECT COUNT(*) AS n FROM {table} WHERE {where_sql}"),
                values,
            )
            .await?
            .ok_or_else(|| StoreError::Db("COUNT returned no row".into()))?;
        Ok(row.try_get::<i64, _>("n")?)
    }

    /// A page of rows matching `where_sql`, by ascending ID.
    pub async fn page(
        &self,
        table: &str,
        where_sql: &str,
        values: &[Value],
        page: u64,
        per_page: u64,
    ) -> Result<Vec<AnyRow>> {
        let mut values = values.to_vec();
        values.push((per_page as i64).into());
        values.push(((page.saturating_sub(1) * per_page) as i64).into());
        self.fetch_all(
            &format!("SELECT * FROM {table} WHERE {where_sql} ORDER BY id LIMIT ? OFFSET ?"),
            &values,
        )
        .await
    }

    /// A setting (a named value the manager keeps, such as its JWT key).
    pub async fn setting(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .fetch_optional("SELECT value FROM settings WHERE name = ?", &[name.into()])
            .await?
            .map(|row| row.text("value")))
    }

    /// Stores a setting unless one of that name exists; returns the value that is kept.
    pub async fn setting_or_insert(&self, name: &str, value: &str) -> Result<String> {
        if let Some(v) = self.setting(name).await? {
            return Ok(v);
        }
        match self
            .insert(
                "settings",
                &[
                    ("name", name.into()),
                    ("value", value.into()),
                    ("created_at", now().into()),
                    ("updated_at", now().into()),
                ],
            )
            .await
        {
            Ok(_) => Ok(value.to_string()),
            // Another manager on the same database got there first: use its value.
            Err(StoreError::Conflict(_)) => self
                .setting(name)
                .await?
                .ok_or_else(|| StoreError::Db(format!("setting {name} vanished"))),
            Err(e) => Err(e),
        }
    }
}

/// A database URL without its password.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Reads a column that is an integer, a string, or absent.
pub trait RowExt {
    fn int(&self, col: &str) -> i64;
    fn text(&self, col: &str) -> String;
}

impl RowExt for AnyRow {
    fn int(&self, col: &str) -> i64 {
        self.try_get::<i64, _>(col).unwrap_or_default()
    }
    fn text(&self, col: &str) -> String {
        match self.try_get::<Option<String>, _>(col) {
            Ok(v) => v.unwrap_or_default(),
            // MySQL reports TEXT columns as blobs through the Any driver.
            Err(_) => self
                .try_get::<Option<Vec<u8>>, _>(col)
                .ok()
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_per_database() {
        let q = "SELECT * FROM t WHERE a = ? AND b = '?' AND c = ?";
        assert_eq!(Dialect::Sqlite.sql(q), q);
        assert_eq!(Dialect::MySql.sql(q), q);
        assert_eq!(
            Dialect::Postgres.sql(q),
            "SELECT * FROM t WHERE a = $1 AND b = '?' AND c = $2"
        );
        assert_eq!(Dialect::of("sqlite:///x.db"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of("postgres://u@h/d"), Some(Dialect::Postgres));
        assert_eq!(
            Dialect::of("mysql://root@127.0.0.1/test"),
            Some(Dialect::MySql)
        );
        assert_eq!(Dialect::of("redis://x"), None);
        assert_eq!(
            redact("mysql://root:secret@127.0.0.1:3306/test"),
            "mysql://root:***@127.0.0.1:3306/test"
        );
    }
}
