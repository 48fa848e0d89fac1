//! The store suite, run against an SQLite file, the machine's PostgreSQL and its MariaDB
//! (each test in a database of its own, dropped afterwards). Set D7Y_TEST_POSTGRES /
//! D7Y_TEST_MYSQL to another server's admin URL; the defaults are 127.0.0.1's.

use d7y_manager::auth;
use d7y_manager::grpc::ensure_default_clusters;
use d7y_manager::models::{self, SchedulerCluster};
use d7y_manager::store::{RowExt, Store, StoreError};

const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";
const MYSQL: &str = "mysql://root@127.0.0.1:3306/test";

/// A fresh database on a server: created from its admin URL, dropped on drop.
struct TempDb {
    admin: String,
    name: String,
    url: String,
}

impl TempDb {
    async fn new(admin: &str) -> TempDb {
        sqlx::any::install_default_drivers();
        let name = format!("d7y_{}", hex::encode(rand::random::<[u8; 6]>()));
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin)
            .await
            .unwrap_or_else(|e| {
                panic!("the test database server at {admin} is not reachable: {e}")
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        TempDb {
            admin: admin.to_string(),
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) =
                    <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await
                {
                    let force = if admin.starts_with("postgres") {
                        " WITH (FORCE)"
                    } else {
                        ""
                    };
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}{force}"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}

async fn suite(url: &str) {
    let store = Store::open(url).await.unwrap();
    // Migrations are applied once: opening again changes nothing.
    let again = Store::open(url).await.unwrap();
    ensure_default_clusters(&again).await.unwrap();
    ensure_default_clusters(&store).await.unwrap();
    assert_eq!(
        store
            .count("scheduler_clusters", "1 = 1", &[])
            .await
            .unwrap(),
        1
    );
    let default = store
        .fetch_optional(
            "SELECT * FROM scheduler_clusters WHERE name = ?",
            &["cluster-1".into()],
        )
        .await
        .unwrap()
        .map(|r| SchedulerCluster::from_row(&r))
        .unwrap();
    assert!(default.is_default);
    assert_eq!(default.config.candidate_parent_limit, 8);

    // Insert, read back with every type, update, conflict, delete.
    let mut fields = vec![
        ("name", "c2".into()),
        ("bio", "ünïcödé ✓".into()),
        (
            "config",
            "{\"candidate_parent_limit\":3,\"filter_parent_limit\":40}".into(),
        ),
        (
            "scopes",
            "{\"idc\":\"a|b\",\"cidrs\":[\"10.0.0.0/8\"]}".into(),
        ),
        ("is_default", false.into()),
        ("seed_peer_cluster_id", 7i64.into()),
    ];
    fields.extend(models::created());
    let id = store.insert("scheduler_clusters", &fields).await.unwrap();
    assert!(id > default.id);
    let row = store
        .fetch_optional(
            "SELECT * FROM scheduler_clusters WHERE id = ?",
            &[id.into()],
        )
        .await
        .unwrap()
        .unwrap();
    let c = SchedulerCluster::from_row(&row);
    assert_eq!(c.bio, "ünïcödé ✓");
    assert_eq!(c.config.candidate_parent_limit, 3);
    assert_eq!(c.scopes.cidrs, ["10.0.0.0/8"]);
    assert_eq!(c.seed_peer_cluster_id, 7);
    assert!(store
        .update("scheduler_clusters", id, &[("bio", "x".into())])
        .await
        .unwrap());
    assert!(
        store
            .update("scheduler_clusters", id, &[("bio", "x".into())])
            .await
            .unwrap(),
        "an update to the same value still finds the row"
    );
    assert!(!store
        .update("scheduler_clusters", id + 1000, &[("bio", "x".into())])
        .await
        .unwrap());
    match store.insert("scheduler_clusters", &fields).await {
        Err(StoreError::Conflict(_)) => {}
        other => panic!("a second c2 was not a conflict: {other:?}"),
    }

    // Pages by ID.
    for i in 0..25 {
        let mut f = vec![("name", format!("app-{i:02}").into())];
        f.extend(models::created());
        store.insert("applications", &f).await.unwrap();
    }
    assert_eq!(store.count("applications", "1 = 1", &[]).await.unwrap(), 25);
    let page = store
        .page("applications", "1 = 1", &[], 3, 10)
        .await
        .unwrap();
    assert_eq!(page.len(), 5);
    assert_eq!(page[0].text("name"), "app-20");
    let filtered = store
        .page("applications", "name = ?", &["app-07".into()], 1, 10)
        .await
        .unwrap();
    assert_eq!(filtered.len(), 1);
    assert!(store
        .delete("applications", filtered[0].int("id"))
        .await
        .unwrap());
    assert!(!store
        .delete("applications", filtered[0].int("id"))
        .await
        .unwrap());

    // Settings keep the first value.
    let key = store.setting_or_insert("k", "first").await.unwrap();
    assert_eq!(key, "first");
    assert_eq!(
        store.setting_or_insert("k", "second").await.unwrap(),
        "first"
    );

    // The root account, once.
    let password = auth::ensure_root(&store, None)
        .await
        .unwrap()
        .expect("generated");
    assert!(auth::ensure_root(&store, None).await.unwrap().is_none());
    let root = auth::user_by_name(&store, "root").await.unwrap().unwrap();
    assert!(auth::verify_password(&password, &root.password_hash));
    assert_eq!(root.role, "root");
    let jwt = auth::Jwt::load(
        &store,
        None,
        "Dragonfly",
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap();
    let again = auth::Jwt::load(
        &again,
        None,
        "Dragonfly",
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap();
    let (token, _) = jwt.issue(&root);
    assert_eq!(
        again.check(&token).unwrap().sub,
        root.id,
        "the key is kept in the store"
    );
}

#[tokio::test]
async fn store_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    suite(&format!(
        "sqlite://{}",
        dir.path().join("manager.db").display()
    ))
    .await;
}

#[tokio::test]
async fn store_on_postgres() {
    let admin = std::env::var("D7Y_TEST_POSTGRES").unwrap_or_else(|_| POSTGRES.into());
    let db = TempDb::new(&admin).await;
    suite(&db.url).await;
}

#[tokio::test]
async fn store_on_mysql() {
    let admin = std::env::var("D7Y_TEST_MYSQL").unwrap_or_else(|_| MYSQL.into());
    let db = TempDb::new(&admin).await;
    suite(&db.url).await;
}

/// The job queue's database half on one store: exactly one owner wins a claim, a lease is
/// renewed only by its holder, an expired lease is taken over, a finished job is nobody's.
async fn queue_suite(url: &str) {
    use d7y_manager::jobs::queue::{self, Queue};
    use std::time::Duration;
    let store = Store::open(url).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut f = vec![
            ("task_id", format!("group_{i}").into()),
            ("kind", "preheat".into()),
            ("state", models::PENDING.into()),
            ("args", "{}".into()),
            ("lease_owner", "".into()),
            ("lease_until", 0i64.into()),
        ];
        f.extend(models::created());
        ids.push(store.insert("jobs", &f).await.unwrap());
    }
    let q = Queue::database();
    let lease = Duration::from_secs(30);
    assert_eq!(
        q.candidates(&store, Duration::from_millis(10))
            .await
            .unwrap(),
        ids
    );
    assert!(queue::claim(&store, ids[0], "a", lease).await.unwrap());
    assert!(
        !queue::claim(&store, ids[0], "b", lease).await.unwrap(),
        "held by a"
    );
    assert!(
        !queue::claim(&store, ids[0], "a", lease).await.unwrap(),
        "no second run by a"
    );
    assert!(queue::renew(&store, ids[0], "a", lease).await.unwrap());
    assert!(
        queue::renew(&store, ids[0], "a", lease).await.unwrap(),
        "twice in a second"
    );
    assert!(!queue::renew(&store, ids[0], "b", lease).await.unwrap());
    assert_eq!(
        q.candidates(&store, Duration::from_millis(10))
            .await
            .unwrap(),
        ids[1..],
        "a leased job is no candidate"
    );
    // a dies: its lease runs out, and b takes the job.
    store
        .execute(
            "UPDATE jobs SET lease_until = ? WHERE id = ?",
            &[1i64.into(), ids[0].into()],
        )
        .await
        .unwrap();
    assert!(queue::claim(&store, ids[0], "b", lease).await.unwrap());
    assert!(
        !queue::renew(&store, ids[0], "a", lease).await.unwrap(),
        "a lost it"
    );
    // Concurrent claims of one job: one winner.
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            let id = ids[1];
            tokio::spawn(async move {
                queue::claim(&store, id, &format!("r{i}"), lease)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for r in racers {
        winners += r.await.unwrap() as usize;
    }
    assert_eq!(winners, 1);
    store
        .execute(
            "UPDATE jobs SET state = ? WHERE id = ?",
            &[models::SUCCESS.into(), ids[2].into()],
        )
        .await
        .unwrap();
    assert!(
        !queue::claim(&store, ids[2], "a", lease).await.unwrap(),
        "a finished job"
    );
}

#[tokio::test]
async fn job_queue_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    queue_suite(&format!("sqlite://{}", dir.path().join("q.db").display())).await;
}

#[tokio::test]
async fn job_queue_on_postgres() {
    let admin = std::env::var("D7Y_TEST_POSTGRES").unwrap_or_else(|_| POSTGRES.into());
    let db = TempDb::new(&admin).await;
    queue_suite(&db.url).await;
}

#[tokio::test]
async fn job_queue_on_mysql() {
    let admin = std::env::var("D7Y_TEST_MYSQL").unwrap_or_else(|_| MYSQL.into());
    let db = TempDb::new(&admin).await;
    queue_suite(&db.url).await;
}

/// The queue on the machine's Redis (D7Y_TEST_REDIS, default 127.0.0.1:6379): pushed IDs
/// are popped once; IDs Redis lost (or never had) are found again in the database.
#[tokio::test]
async fn job_queue_on_redis() {
    use d7y_manager::jobs::queue::{Queue, RedisTarget};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&format!("sqlite://{}", dir.path().join("r.db").display()))
        .await
        .unwrap();
    let addr = std::env::var("D7Y_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let target = RedisTarget {
        addr: addr.clone(),
        username: String::new(),
        password: String::new(),
        db: 1,
        prefix: format!("d7y-test-{}", hex::encode(rand::random::<[u8; 6]>())),
    };
    let q = Queue::redis(&target)
        .await
        .unwrap_or_else(|e| panic!("the test Redis at {addr} is not reachable: {e}"));
    assert_eq!(q.kind(), "redis");
    assert!(q
        .candidates(&store, Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());
    q.push(41).await.unwrap();
    q.push(42).await.unwrap();
    assert_eq!(
        q.candidates(&store, Duration::from_secs(1)).await.unwrap(),
        [41]
    );
    assert_eq!(
        q.candidates(&store, Duration::from_secs(1)).await.unwrap(),
        [42]
    );
    // A pending, unleased job Redis does not hold is put back once.
    let mut f = vec![
        ("task_id", "group_r".into()),
        ("kind", "preheat".into()),
        ("state", models::PENDING.into()),
        ("args", "{}".into()),
        ("lease_owner", "".into()),
        ("lease_until", 0i64.into()),
    ];
    f.extend(models::created());
    let id = store.insert("jobs", &f).await.unwrap();
    assert_eq!(q.recover(&store).await.unwrap(), 1);
    assert_eq!(q.recover(&store).await.unwrap(), 0, "already queued");
    assert_eq!(
        q.candidates(&store, Duration::from_secs(1)).await.unwrap(),
        [id]
    );
}
