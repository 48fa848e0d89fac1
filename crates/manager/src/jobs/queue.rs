//! Where jobs wait to be run: in the database (the default), or on Redis when one is
//! configured (`database.redis.addrs`).
//!
//! The database row is the truth either way: a job is run by whoever holds its lease
//! (`lease_owner`, `lease_until`), taken by a conditional update, renewed while the job
//! runs, and expired when its holder dies, so another manager (or this one, restarted)
//! takes the job over. Redis only carries the IDs of jobs to run, so managers block on it
//! instead of polling the database; IDs it loses (a Redis restart keeps nothing) are found
//! again by a periodic scan of the database for unleased pending jobs.

use crate::store::{now, RowExt, Store, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The Redis list of job IDs to run, under the target's prefix.
const PENDING_KEY: &str = "jobs:pending";
/// The longest a database-only queue waits before it looks again (other managers may have
/// created jobs).
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("redis at {addr}: {reason}")]
    Redis { addr: String, reason: String },
}

/// Redis connection settings.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub addr: String,
    pub username: String,
    pub password: String,
    pub db: u32,
    /// Keys start with this (`d7y:manager`), so managers of different clusters can share a
    /// Redis database.
    pub prefix: String,
}

impl RedisTarget {
    fn url(&self) -> String {
        let enc = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let auth = match (self.username.is_empty(), self.password.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!(":{}@", enc(&self.password)),
            (false, _) => format!("{}:{}@", enc(&self.username), enc(&self.password)),
        };
        format!("redis://{auth}{}/{}", self.addr, self.db)
    }
}

struct Redis {
    addr: String,
    key: String,
    /// For pushes and scans.
    conn: redis::aio::MultiplexedConnection,
    client: redis::Client,
    /// For blocking pops: a connection of their own (a pop holds it), without the
    /// client's response timeout (a pop waits longer than that on purpose).
    blocking: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

/// The job queue.
pub struct Queue {
    wake: Notify,
    redis: Option<Redis>,
}

impl Queue {
    /// A queue in the database.
    pub fn database() -> Arc<Queue> {
        Arc::new(Queue {
            wake: Notify::new(),
            redis: None,
        })
    }

    /// A queue on Redis (connects now, so a wrong address fails at start-up).
    pub async fn redis(target: &RedisTarget) -> Result<Arc<Queue>, QueueError> {
        let err = |e: redis::RedisError| QueueError::Redis {
            addr: target.addr.clone(),
            reason: e.to_string(),
        };
        let client = redis::Client::open(target.url()).map_err(err)?;
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| QueueError::Redis {
            addr: target.addr.clone(),
            reason: "no answer within 10 s".into(),
        })?
        .map_err(err)?;
        Ok(Arc::new(Queue {
            wake: Notify::new(),
            redis: Some(Redis {
                addr: target.addr.clone(),
                key: format!("{}:{PENDING_KEY}", target.prefix),
                conn,
                client,
                blocking: tokio::sync::Mutex::new(None),
            }),
        }))
    }

    pub fn kind(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "database"
        }
    }

    fn redis_err(&self, e: redis::RedisError) -> QueueError {
        QueueError::Redis {
            addr: self
                .redis
                .as_ref()
                .map(|r| r.addr.clone())
                .unwrap_or_default(),
            reason: e.to_string(),
        }
    }

    /// Announces a new job.
    pub async fn push(&self, id: i64) -> Result<(), QueueError> {
        if let Some(r) = &self.redis {
            let mut conn = r.conn.clone();
            redis::cmd("LPUSH")
                .arg(&r.key)
                .arg(id)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| self.redis_err(e))?;
        }
        self.wake.notify_waiters();
        Ok(())
    }

    /// Jobs that may be free to run: from Redis (blocking up to `wait`), or from the
    /// database (after a push here or `POLL`).
    pub async fn candidates(&self, store: &Store, wait: Duration) -> Result<Vec<i64>, QueueError> {
        if let Some(r) = &self.redis {
            let mut slot = r.blocking.lock().await;
            if slot.is_none() {
                let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
                *slot = Some(
                    r.client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                        .map_err(|e| self.redis_err(e))?,
                );
            }
            let conn = slot.as_mut().expect("connected above");
            let popped: Result<Option<(String, i64)>, _> = redis::cmd("BRPOP")
                .arg(&r.key)
                .arg(wait.as_secs_f64().max(0.1))
                .query_async(conn)
                .await;
            return match popped {
                Ok(p) => Ok(p.map(|(_, id)| vec![id]).unwrap_or_default()),
                Err(e) => {
                    // Reconnect next time.
                    *slot = None;
                    Err(self.redis_err(e))
                }
            };
        }
        let _ = tokio::time::timeout(wait.min(POLL), self.wake.notified()).await;
        unleased(store, 16).await.map_err(QueueError::from)
    }

    /// With Redis: puts back the IDs of pending, unleased jobs it does not hold (lost in a
    /// Redis restart, or whose runner died). Returns how many.
    pub async fn recover(&self, store: &Store) -> Result<usize, QueueError> {
        let Some(r) = &self.redis else {
            return Ok(0);
        };
        let mut conn = r.conn.clone();
        let queued: Vec<i64> = redis::cmd("LRANGE")
            .arg(&r.key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.redis_err(e))?;
        let mut pushed = 0;
        for id in unleased(store, 1000).await? {
            if !queued.contains(&id) {
                redis::cmd("LPUSH")
                    .arg(&r.key)
                    .arg(id)
                    .query_async::<i64>(&mut conn)
                    .await
                    .map_err(|e| self.redis_err(e))?;
                pushed += 1;
            }
        }
        Ok(pushed)
    }
}

/// Pending jobs whose lease is free, oldest first.
async fn unleased(store: &Store, limit: i64) -> Result<Vec<i64>, StoreError> {
    Ok(store
        .fetch_all(
            "SELECT id FROM jobs WHERE state = ? AND lease_until < ? ORDER BY id LIMIT ?",
            &[crate::models::PENDING.into(), now().into(), limit.into()],
        )
        .await?
        .iter()
        .map(|r| r.int("id"))
        .collect())
}

/// Takes job `id` for `owner` until `lease` from now, if it is pending and its lease is
/// free. Exactly one of several managers (or of one manager's duplicate wake-ups) wins.
pub async fn claim(
    store: &Store,
    id: i64,
    owner: &str,
    lease: Duration,
) -> Result<bool, StoreError> {
    let t = now();
    let touched = store
        .execute(
            "UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id = ? AND state = ? AND lease_until < ?",
            &[
                owner.into(),
                (t + lease.as_secs() as i64).into(),
                id.into(),
                crate::models::PENDING.into(),
                t.into(),
            ],
        )
        .await?;
    Ok(touched == 1)
}

/// MySQL counts only rows it changed: an update to the values a row already has (the same
/// owner, within the same second) touches nothing but still holds.
async fn holds(store: &Store, id: i64, owner: &str, until: i64) -> Result<bool, StoreError> {
    if store.dialect() != crate::store::Dialect::MySql {
        return Ok(false);
    }
    Ok(store
        .fetch_optional(
            "SELECT id FROM jobs WHERE id = ? AND lease_owner = ? AND state = ? AND lease_until = ?",
            &[id.into(), owner.into(), crate::models::PENDING.into(), until.into()],
        )
        .await?
        .is_some())
}

/// Extends `owner`'s lease on `id`; `false` when the lease was lost (the job was taken
/// over or ended).
pub async fn renew(
    store: &Store,
    id: i64,
    owner: &str,
    lease: Duration,
) -> Result<bool, StoreError> {
    let until = now() + lease.as_secs() as i64;
    let touched = store
        .execute(
            "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ? AND state = ?",
            &[
                until.into(),
                id.into(),
                owner.into(),
                crate::models::PENDING.into(),
            ],
        )
        .await?;
    if touched == 0 {
        return holds(store, id, owner, until).await;
    }
    Ok(touched == 1)
}
