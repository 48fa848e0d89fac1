//! The manager with the rest of the cluster: a scheduler and a seed peer that register and
//! keep alive, a peer that asks it for its schedulers, and jobs run against them. A preheat
//! of an image in a real registry (CNCF distribution) fills the seed peer; Harbor's request
//! shapes are replayed byte for byte; a killed scheduler drops out; a restarted manager
//! still ends its jobs.

use d7y_testkit::rigs::{Registry, RegistryOptions, TestImage};
use d7y_testkit::{Daemon, DaemonOptions, Manager, Origin, OriginOptions, Scheduler};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// Waits until `ready()`, at most `limit`, failing with `what`.
fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Active schedulers / seed peers the manager lists.
fn active(m: &Manager, token: &str, path: &str) -> Vec<serde_json::Value> {
    let a = m.request("GET", path, Some(token), None);
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    a.json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "active")
        .cloned()
        .collect()
}

fn dfget(daemon: &Daemon, url: &str, out: &Path) -> std::process::Output {
    Command::new(d7y_testkit::bin_path("dfget"))
        .arg(url)
        .arg("-O")
        .arg(out)
        .arg("-e")
        .arg(&daemon.socket)
        .arg("--no-progress")
        .output()
        .unwrap()
}

/// A manager, a scheduler and a seed peer that registered with it, and a way to wait
/// until the scheduler knows the seed peer as one.
struct Cluster {
    manager: Manager,
    scheduler: Scheduler,
    seed: Daemon,
    token: String,
}

fn cluster(dir: &Path) -> Cluster {
    cluster_with(dir, "")
}

/// [`cluster`] with `manager_yaml` appended to the manager's config.
fn cluster_with(dir: &Path, manager_yaml: &str) -> Cluster {
    let manager = Manager::start(&dir.join("manager"), manager_yaml).unwrap();
    let scheduler =
        Scheduler::start_with_manager(&dir.join("scheduler"), &manager.grpc_addr(), "").unwrap();
    let token = manager.root_token();
    wait_until(Duration::from_secs(20), "the scheduler registered", || {
        !active(&manager, &token, "/api/v1/schedulers").is_empty()
    });
    let seed = Daemon::start_opts(
        &dir.join("seed"),
        &DaemonOptions {
            hostname: Some("seed".into()),
            seed: true,
            manager: Some(manager.grpc_addr()),
            ..Default::default()
        },
    )
    .unwrap();
    wait_until(Duration::from_secs(20), "the seed peer registered", || {
        !active(&manager, &token, "/api/v1/seed-peers").is_empty()
    });
    // The scheduler takes its seed peers from the manager within its refresh interval.
    wait_until(
        Duration::from_secs(20),
        "the scheduler trusts the seed peer",
        || {
            scheduler
                .log()
                .contains("cluster config from the manager applied")
        },
    );
    Cluster {
        manager,
        scheduler,
        seed,
        token,
    }
}

#[test]
fn a_preheated_image_is_served_to_a_fresh_peer_from_the_seed_peer_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let registry =
        Registry::start(&tmp.path().join("registry"), RegistryOptions::default()).unwrap();
    let image = TestImage::write(
        &tmp.path().join("img"),
        "v1",
        &[9 * MIB, 7 * MIB, 5 * MIB],
        7,
    );
    registry.push(&image, "127.0.0.1", "test/img", None);
    let reg = registry.host("127.0.0.1");
    let c = cluster(tmp.path());

    // Harbor's body, with its open-API token (scope job).
    let pat = c.manager.personal_access_token(&["job"]);
    let body = format!(
        r#"{{"type":"preheat","args":{{"type":"image","url":"http://{reg}/v2/test/img/manifests/v1","tag":"","filtered_query_params":"","headers":{{}},"scope":"single_seed_peer","concurrent_count":0,"timeout":0}},"scheduler_cluster_ids":null}}"#
    );
    let created = c
        .manager
        .request("POST", "/oapi/v1/jobs", Some(&pat), Some(&body));
    assert_eq!(created.status, 200, "{}", created.body);
    let id = created.json()["id"].as_i64().expect("integer id");
    let job = c.manager.wait_job(
        &format!("/oapi/v1/jobs/{id}"),
        &pat,
        Duration::from_secs(120),
    );
    assert_eq!(job["state"], "SUCCESS", "{job}\n{}", c.manager.log());
    let results = &job["result"]["job_states"][0]["results"][0];
    let done: Vec<&str> = results["success_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["url"].as_str().unwrap())
        .collect();
    // The config and every layer, each on the seed peer.
    assert_eq!(done.len(), image.blobs().len(), "{job}");
    assert!(
        results["failure_tasks"].as_array().unwrap().is_empty(),
        "{job}"
    );
    assert_eq!(results["scheduler_cluster_id"], 1);
    let before: u64 = registry.blob_egress().values().sum();
    assert!(
        before > 0,
        "the seed peer fetched the blobs from the registry"
    );

    // A fresh peer that finds its scheduler through the manager.
    let peer = Daemon::start_opts(
        &tmp.path().join("peer"),
        &DaemonOptions {
            hostname: Some("peer".into()),
            manager: Some(c.manager.grpc_addr()),
            ..Default::default()
        },
    )
    .unwrap();
    for (i, (digest, _)) in image.layers.iter().enumerate() {
        let out = tmp.path().join(format!("layer{i}"));
        let url = format!("http://{reg}/v2/test/img/blobs/{digest}");
        let got = dfget(&peer, &url, &out);
        assert!(
            got.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&got.stderr),
            peer.log()
        );
        let bytes = std::fs::read(&out).unwrap();
        let hex = sha2_hex(&bytes);
        assert_eq!(format!("sha256:{hex}"), *digest);
    }
    let after: u64 = registry.blob_egress().values().sum();
    assert_eq!(
        after,
        before,
        "the registry served nothing more:\n{}",
        registry.log()
    );

    // get_task finds the seed peer and the peer holding a layer; delete_task drops it
    // from both (the manager is their control plane).
    let layer = format!("http://{reg}/v2/test/img/blobs/{}", image.layers[0].0);
    let root = &c.token;
    let get = c.manager.request(
        "POST",
        "/api/v1/jobs",
        Some(root),
        Some(&json!({"type": "get_task", "args": {"url": layer}}).to_string()),
    );
    assert_eq!(get.status, 200, "{}", get.body);
    let job = c.manager.wait_job(
        &format!("/api/v1/jobs/{}", get.json()["id"]),
        root,
        Duration::from_secs(60),
    );
    assert_eq!(job["state"], "SUCCESS", "{job}");
    let mut holders: Vec<String> = job["result"]["job_states"][0]["results"][0]["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["hostname"].as_str().unwrap().to_string())
        .collect();
    holders.sort();
    assert_eq!(holders, ["peer", "seed"], "{job}");
    let del = c.manager.request(
        "POST",
        "/api/v1/jobs",
        Some(root),
        Some(&json!({"type": "delete_task", "args": {"url": layer}}).to_string()),
    );
    let job = c.manager.wait_job(
        &format!("/api/v1/jobs/{}", del.json()["id"]),
        root,
        Duration::from_secs(60),
    );
    assert_eq!(job["state"], "SUCCESS", "{job}");
    assert_eq!(
        job["result"]["job_states"][0]["results"][0]["success_tasks"]
            .as_array()
            .unwrap()
            .len(),
        2,
        "{job}"
    );
    let task_id = image.layers[0].0.trim_start_matches("sha256:").to_string();
    for d in [&c.seed, &peer] {
        assert!(
            !d.content_path(&task_id).exists(),
            "the layer is still on {}",
            d.dir.display()
        );
    }
    drop(c.scheduler);
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn harbors_requests_get_the_answers_harbor_expects() {
    let tmp = tempfile::tempdir().unwrap();
    // Jobs queue on the machine's Redis here (the other tests use the database).
    let redis = std::env::var("D7Y_TEST_REDIS").unwrap_or_else(|_| "127.0.0.1:6379".into());
    let c = cluster_with(
        tmp.path(),
        &format!("  redis:\n    addrs: [{redis}]\n    brokerDB: 1\n"),
    );
    let log = c.manager.log();
    assert!(
        log.contains("job queue ready queue=\"redis\""),
        "the manager did not queue on Redis:\n{log}"
    );
    let origin = Origin::start(OriginOptions::default());
    let url = origin.put("model.bin", d7y_testkit::content(6 * MIB, 3));
    let pat = c.manager.personal_access_token(&["job"]);

    // GET /healthy: any 2xx.
    let health = c.manager.request("GET", "/healthy", Some(&pat), None);
    assert!((200..300).contains(&health.status), "{health:?}");
    // A preheat of a file, as Harbor's Go client marshals it (timeout in nanoseconds).
    let body = format!(
        r#"{{"type":"preheat","args":{{"type":"file","url":"{url}","tag":"","filtered_query_params":"","headers":{{"Authorization":"Bearer registry-token"}},"scope":"all_seed_peers","concurrent_count":0,"timeout":600000000000}},"scheduler_cluster_ids":[1]}}"#
    );
    let created = c
        .manager
        .request("POST", "/oapi/v1/jobs", Some(&pat), Some(&body));
    assert!(
        (200..300).contains(&created.status) && created.status != 208,
        "{created:?}"
    );
    let job = created.json();
    assert!(job["id"].is_i64(), "an integer id: {job}");
    assert_eq!(job["state"], "PENDING");
    assert_eq!(
        job["args"]["headers"]["Authorization"], "***",
        "secrets are not shown back"
    );
    let done = c.manager.wait_job(
        &format!("/oapi/v1/jobs/{}", job["id"]),
        &pat,
        Duration::from_secs(60),
    );
    // Fields Harbor decodes, with the types it decodes them into.
    assert_eq!(done["state"], "SUCCESS", "{done}");
    assert!(done["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(done["updated_at"].as_str().unwrap().ends_with('Z'));
    let state = &done["result"]["job_states"][0];
    assert_eq!(state["error"], "");
    let r = &state["results"][0];
    assert!(r["scheduler_cluster_id"].is_u64());
    assert_eq!(r["success_tasks"][0]["url"], url.as_str());
    assert_eq!(r["success_tasks"][0]["hostname"], "seed");
    assert_eq!(r["success_tasks"][0]["ip"], "127.0.0.1");
    assert!(r["failure_tasks"].as_array().unwrap().is_empty());
    let served = origin.bytes_served();
    assert!(
        (6 * MIB as u64..=6 * MIB as u64 + 16).contains(&served),
        "one copy (and a probe): {served}"
    );

    // A URL the origin does not have ends in FAILURE with a reason Harbor can show.
    let body = format!(
        r#"{{"type":"preheat","args":{{"type":"file","url":"{}/missing","scope":"single_seed_peer","timeout":0}},"scheduler_cluster_ids":null}}"#,
        url.rsplit_once('/').unwrap().0
    );
    let created = c
        .manager
        .request("POST", "/oapi/v1/jobs", Some(&pat), Some(&body));
    let failed = c.manager.wait_job(
        &format!("/oapi/v1/jobs/{}", created.json()["id"]),
        &pat,
        Duration::from_secs(60),
    );
    assert_eq!(failed["state"], "FAILURE");
    let error = failed["result"]["job_states"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("404") || error.contains("not found"),
        "{error}"
    );
    // An unknown job is 404; a token without the job scope is 403; none is 401.
    assert_eq!(
        c.manager
            .request("GET", "/oapi/v1/jobs/999999", Some(&pat), None)
            .status,
        404
    );
    let cluster_pat = c.manager.personal_access_token(&["cluster"]);
    assert_eq!(
        c.manager
            .request("POST", "/oapi/v1/jobs", Some(&cluster_pat), Some(&body))
            .status,
        403
    );
    assert_eq!(
        c.manager
            .request("POST", "/oapi/v1/jobs", None, Some(&body))
            .status,
        401
    );
    // A body with a bad field names it.
    let bad = c.manager.request(
        "POST",
        "/oapi/v1/jobs",
        Some(&pat),
        Some(r#"{"type":"preheat","args":{"type":"image","url":"http://r/v2/x/blobs/y"}}"#),
    );
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("args.url"), "{}", bad.body);
}

#[test]
fn a_killed_scheduler_drops_out_and_peers_use_the_remaining_one() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path());
    let mut second =
        Scheduler::start_with_manager(&tmp.path().join("scheduler2"), &c.manager.grpc_addr(), "")
            .unwrap();
    wait_until(
        Duration::from_secs(20),
        "both schedulers are active",
        || active(&c.manager, &c.token, "/api/v1/schedulers").len() == 2,
    );
    let peer = Daemon::start_opts(
        &tmp.path().join("peer"),
        &DaemonOptions {
            hostname: Some("peer".into()),
            manager: Some(c.manager.grpc_addr()),
            ..Default::default()
        },
    )
    .unwrap();
    second.kill();
    let killed = Instant::now();
    // The manager's keepalive timeout is 5 s in the test config.
    wait_until(
        Duration::from_secs(15),
        "the killed scheduler is inactive",
        || active(&c.manager, &c.token, "/api/v1/schedulers").len() == 1,
    );
    assert!(
        killed.elapsed() < Duration::from_secs(12),
        "marked inactive after {:?}",
        killed.elapsed()
    );
    // ListSchedulers answers the live one only; the peer follows within its refresh.
    let live = active(&c.manager, &c.token, "/api/v1/schedulers");
    assert_eq!(live[0]["port"], c.scheduler.port);
    let live_only = format!("[\"127.0.0.1:{}\"]", c.scheduler.port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !peer
        .log()
        .lines()
        .any(|l| l.contains("schedulers changed") && l.contains(&live_only))
    {
        assert!(
            Instant::now() < deadline,
            "the peer kept the dead scheduler:\n{}",
            peer.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let origin = Origin::start(OriginOptions::default());
    let data = d7y_testkit::content(20 * MIB, 9);
    let url = origin.put("f.bin", data.clone());
    for i in 0..4 {
        let out = tmp.path().join(format!("out{i}"));
        let got = dfget(&peer, &format!("{url}?n={i}"), &out);
        assert!(
            got.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&got.stderr),
            peer.log()
        );
        assert_eq!(std::fs::read(&out).unwrap(), data);
    }
    // Every download went through the live scheduler and its seed peer.
    let served = c.scheduler.metrics();
    assert!(served.lines().any(|l| l.starts_with("dragonfly_scheduler_register_peer_total") && !l.ends_with(" 0")), "{served}");
    let served = origin.bytes_served();
    assert!(
        served <= 4 * (20 * MIB as u64 + 16),
        "each URL once, by the seed peer: {served}"
    );
}

#[test]
fn a_job_survives_a_manager_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path());
    // An origin slow enough that the job is still running when the manager dies.
    let origin = Origin::start(OriginOptions {
        rate: Some(512 * 1024),
        ..Default::default()
    });
    let url = origin.put("slow.bin", d7y_testkit::content(24 * MIB, 5));
    let pat = c.manager.personal_access_token(&["job"]);
    let body = json!({"type": "preheat", "args": {"type": "file", "url": url, "scope": "single_seed_peer"}}).to_string();
    let created = c
        .manager
        .request("POST", "/oapi/v1/jobs", Some(&pat), Some(&body));
    assert_eq!(created.status, 200, "{}", created.body);
    let id = created.json()["id"].as_i64().unwrap();
    wait_until(Duration::from_secs(20), "the job started", || {
        c.manager.log().contains("job started")
    });
    c.manager.kill();
    c.manager.restart().unwrap();
    // A new manager takes the job over once the dead one's lease runs out.
    let job = c.manager.wait_job(
        &format!("/oapi/v1/jobs/{id}"),
        &pat,
        Duration::from_secs(120),
    );
    assert_eq!(job["state"], "SUCCESS", "{job}\n{}", c.manager.log());
    assert!(c.seed.log().contains("slow.bin") || origin.bytes_served() >= 24 * MIB as u64);
}
