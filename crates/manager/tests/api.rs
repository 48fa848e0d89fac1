//! The manager in process on an SQLite file: the REST API's auth matrix and statuses, the
//! open API's personal access tokens, and the gRPC registration and keepalive.

use d7y_config::manager::Config;
use d7y_manager::models;
use dragonfly_api::manager::v2::manager_client::ManagerClient;
use dragonfly_api::manager::v2::*;
use serde_json::{json, Value};
use std::time::Duration;

const ROOT_PASSWORD: &str = "test-root-password";

struct Manager {
    rest: String,
    grpc: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(keep_alive_timeout: Duration) -> Manager {
    // Every test of this binary uses the same value, so setting it is not a race.
    std::env::set_var(d7y_manager::auth::ROOT_PASSWORD_ENV, ROOT_PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.database.url = Some(format!("sqlite://{}", dir.path().join("m.db").display()));
    config.server.rest.addr = "127.0.0.1:0".into();
    config.server.grpc.listen_ip = Some("127.0.0.1".parse().unwrap());
    config.server.grpc.port.start = 0;
    config.keep_alive_timeout = keep_alive_timeout;
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        d7y_manager::run(
            config,
            async {
                let _ = stop_rx.await;
            },
            Some(bound_tx),
        )
        .await
        .unwrap();
    });
    let bound = bound_rx.await.unwrap();
    Manager {
        rest: format!("http://{}", bound.rest),
        grpc: format!("http://{}", bound.grpc),
        _dir: dir,
        _stop: stop_tx,
    }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn call(method: &str, url: &str, token: Option<&str>, body: Option<Value>) -> Answer {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
    }
}

async fn signin(m: &Manager, name: &str, password: &str) -> String {
    let a = call(
        "POST",
        &format!("{}/api/v1/users/signin", m.rest),
        None,
        Some(json!({"name": name, "password": password})),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.body["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn rest_statuses_and_the_auth_matrix() {
    let m = start(Duration::from_secs(30)).await;
    let api = |path: &str| format!("{}{path}", m.rest);
    assert_eq!(call("GET", &api("/healthy"), None, None).await.status, 200);

    let root = signin(&m, "root", ROOT_PASSWORD).await;
    let wrong = call(
        "POST",
        &api("/api/v1/users/signin"),
        None,
        Some(json!({"name": "root", "password": "nope"})),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let signup = call(
        "POST",
        &api("/api/v1/users/signup"),
        None,
        Some(json!({"name": "guest1", "password": "guest-password", "email": "g@example.org"})),
    )
    .await;
    assert_eq!(signup.status, 200, "{:?}", signup.body);
    assert!(
        signup.body.get("password_hash").is_none(),
        "hashes never leave"
    );
    let guest = signin(&m, "guest1", "guest-password").await;

    // Who may write: no token, a bad token, a guest, root.
    let app = json!({"name": "app1", "url": "https://example.org", "priority": {"value": 3}});
    let url = api("/api/v1/applications");
    assert_eq!(
        call("POST", &url, None, Some(app.clone())).await.status,
        401
    );
    assert_eq!(
        call("POST", &url, Some("not.a.jwt"), Some(app.clone()))
            .await
            .status,
        401
    );
    assert_eq!(
        call("POST", &url, Some(&guest), Some(app.clone()))
            .await
            .status,
        403
    );
    let created = call("POST", &url, Some(&root), Some(app.clone())).await;
    assert_eq!(created.status, 200, "{:?}", created.body);
    let id = created.body["id"].as_i64().unwrap();
    // Everyone signed in may read.
    let listed = call("GET", &url, Some(&guest), None).await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    assert!(listed.headers["link"]
        .to_str()
        .unwrap()
        .contains("rel=\"last\""));
    assert_eq!(listed.headers["total-page"], "1");
    // 409 for a taken name, 404 for an unknown ID, 400 naming the field.
    assert_eq!(call("POST", &url, Some(&root), Some(app)).await.status, 409);
    assert_eq!(
        call("GET", &format!("{url}/{}", id + 99), Some(&root), None)
            .await
            .status,
        404
    );
    let bad = call(
        "POST",
        &api("/api/v1/scheduler-clusters"),
        Some(&root),
        Some(json!({"name": "c", "scopes": {"cidrs": ["10.0.0.0/33"]}})),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["message"]
            .as_str()
            .unwrap()
            .contains("scopes.cidrs"),
        "{:?}",
        bad.body
    );
    let bad_type = call("POST", &url, Some(&root), Some(json!({"name": 5}))).await;
    assert_eq!(bad_type.status, 400);
    assert_eq!(
        call(
            "GET",
            &api("/api/v1/applications?per_page=0"),
            Some(&root),
            None
        )
        .await
        .status,
        400
    );
    let patched = call(
        "PATCH",
        &format!("{url}/{id}"),
        Some(&root),
        Some(json!({"bio": "changed"})),
    )
    .await;
    assert_eq!(
        (patched.status, patched.body["bio"].as_str()),
        (200, Some("changed"))
    );
    assert_eq!(
        call("DELETE", &format!("{url}/{id}"), Some(&guest), None)
            .await
            .status,
        403
    );
    assert_eq!(
        call("DELETE", &format!("{url}/{id}"), Some(&root), None)
            .await
            .status,
        200
    );
    assert_eq!(
        call("DELETE", &format!("{url}/{id}"), Some(&root), None)
            .await
            .status,
        404
    );

    // Users: only root lists; a guest cannot make itself root.
    assert_eq!(
        call("GET", &api("/api/v1/users"), Some(&guest), None)
            .await
            .status,
        403
    );
    assert_eq!(
        call("GET", &api("/api/v1/users"), Some(&root), None)
            .await
            .status,
        200
    );
    let guest_id = signup.body["id"].as_i64().unwrap();
    assert_eq!(
        call(
            "PUT",
            &api(&format!("/api/v1/users/{guest_id}/roles/root")),
            Some(&guest),
            None
        )
        .await
        .status,
        403
    );
    // A password change needs the old one.
    let reset = api(&format!("/api/v1/users/{guest_id}/reset_password"));
    let refused = call(
        "POST",
        &reset,
        Some(&guest),
        Some(json!({"old_password": "wrong-password", "new_password": "new-password"})),
    )
    .await;
    assert_eq!(refused.status, 400);
    let changed = call(
        "POST",
        &reset,
        Some(&guest),
        Some(json!({"old_password": "guest-password", "new_password": "new-password"})),
    )
    .await;
    assert_eq!(changed.status, 200);
    signin(&m, "guest1", "new-password").await;
}

#[tokio::test]
async fn open_api_takes_personal_access_tokens_with_scopes() {
    let m = start(Duration::from_secs(30)).await;
    let api = |path: &str| format!("{}{path}", m.rest);
    let root = signin(&m, "root", ROOT_PASSWORD).await;
    let make = |scopes: Value| {
        let root = root.clone();
        let url = api("/api/v1/personal-access-tokens");
        async move {
            let a = call(
                "POST",
                &url,
                Some(&root),
                Some(json!({"name": "t", "scopes": scopes})),
            )
            .await;
            assert_eq!(a.status, 200, "{:?}", a.body);
            (
                a.body["id"].as_i64().unwrap(),
                a.body["token"].as_str().unwrap().to_string(),
            )
        }
    };
    let (cluster_id, cluster_token) = make(json!(["cluster"])).await;
    let (_, job_token) = make(json!(["job"])).await;
    let clusters = api("/oapi/v1/clusters");
    let listed = call("GET", &clusters, Some(&cluster_token), None).await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    assert_eq!(
        listed.body[0]["name"], "cluster-1",
        "the default cluster exists"
    );
    let by_query = call(
        "GET",
        &format!("{clusters}?access_token={cluster_token}"),
        None,
        None,
    )
    .await;
    assert_eq!(by_query.status, 200);
    assert_eq!(
        call("GET", &clusters, None, None).await.status,
        401,
        "no token"
    );
    assert_eq!(
        call("GET", &clusters, Some("0123"), None).await.status,
        401,
        "unknown token"
    );
    assert_eq!(
        call("GET", &clusters, Some(&job_token), None).await.status,
        403,
        "no cluster scope"
    );
    assert_eq!(
        call("GET", &clusters, Some(&root), None).await.status,
        401,
        "a sign-in token is not a PAT"
    );
    let token_url = api(&format!("/api/v1/personal-access-tokens/{cluster_id}"));
    let shown = call("GET", &token_url, Some(&root), None).await;
    assert!(
        shown.body.get("token").is_none(),
        "a token is shown only when created"
    );
    call(
        "PATCH",
        &token_url,
        Some(&root),
        Some(json!({"expired_at": "2001-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(
        call("GET", &clusters, Some(&cluster_token), None)
            .await
            .status,
        403,
        "expired"
    );
    call(
        "PATCH",
        &token_url,
        Some(&root),
        Some(json!({"expired_at": "2099-01-01T00:00:00Z", "state": "inactive"})),
    )
    .await;
    assert_eq!(
        call("GET", &clusters, Some(&cluster_token), None)
            .await
            .status,
        403,
        "inactive"
    );
    call(
        "PATCH",
        &token_url,
        Some(&root),
        Some(json!({"state": "active"})),
    )
    .await;
    assert_eq!(
        call("GET", &clusters, Some(&cluster_token), None)
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn schedulers_register_keep_alive_and_drop_out_when_silent() {
    let m = start(Duration::from_secs(2)).await;
    let mut client = ManagerClient::connect(m.grpc.clone()).await.unwrap();
    for (hostname, ip) in [("sched-a", "10.0.0.1"), ("sched-b", "10.0.0.2")] {
        let s = client
            .update_scheduler(UpdateSchedulerRequest {
                source_type: SourceType::SchedulerSource as i32,
                hostname: hostname.into(),
                ip: ip.into(),
                port: 8002,
                scheduler_cluster_id: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.state, "active");
    }
    // Scheduler a keeps alive; b never does.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let keepalive = {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    let beat = KeepAliveRequest {
        source_type: SourceType::SchedulerSource as i32,
        hostname: "sched-a".into(),
        cluster_id: 1,
        ip: "10.0.0.1".into(),
    };
    let ask = ListSchedulersRequest {
        source_type: SourceType::PeerSource as i32,
        hostname: "peer-1".into(),
        ip: "10.0.0.9".into(),
        ..Default::default()
    };
    let mut seen_only_a = false;
    for _ in 0..40 {
        tx.send(beat.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let names: Vec<String> = client
            .list_schedulers(ask.clone())
            .await
            .unwrap()
            .into_inner()
            .schedulers
            .into_iter()
            .map(|s| s.hostname)
            .collect();
        if names == ["sched-a"] {
            seen_only_a = true;
            break;
        }
    }
    assert!(
        seen_only_a,
        "the silent scheduler was not dropped from the answer"
    );
    // The stream ends: a is marked inactive, and nothing is left to offer.
    drop(tx);
    keepalive.await.unwrap().unwrap();
    let left = client
        .list_schedulers(ask)
        .await
        .unwrap()
        .into_inner()
        .schedulers;
    assert!(left.is_empty(), "{left:?}");
    // Bad input is refused with a reason.
    let err = client
        .update_scheduler(UpdateSchedulerRequest {
            hostname: "x".into(),
            ip: "not-an-ip".into(),
            port: 8002,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let got = client
        .get_scheduler(GetSchedulerRequest {
            source_type: SourceType::SchedulerSource as i32,
            hostname: "sched-a".into(),
            scheduler_cluster_id: 1,
            ip: "10.0.0.1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cluster = got.scheduler_cluster.expect("the cluster's config");
    let config: Value = serde_json::from_slice(&cluster.config).unwrap();
    assert_eq!(config["candidate_parent_limit"], 8);
}

#[tokio::test]
async fn every_documented_operation_is_served_and_swagger_shows_the_document() {
    use d7y_manager::rest::openapi;
    use d7y_manager::rest::resources::Resource;
    let m = start(Duration::from_secs(30)).await;
    let doc = openapi::document();
    let ops = openapi::operations(&doc);
    for (method, path) in &ops {
        let concrete = path
            .replace("{id}", "1")
            .replace("{member}", "1")
            .replace("{role}", "guest");
        let a = call(method, &format!("{}{concrete}", m.rest), None, None).await;
        let unrouted = a.status == 404
            && a.body["message"]
                .as_str()
                .is_some_and(|s| s.starts_with("no route"));
        assert!(
            !unrouted && a.status != 405,
            "{method} {path} is documented but not served ({})",
            a.status
        );
    }
    // The CRUD part of the document is the router's resource list.
    let mounted = [
        models::SchedulerCluster::PATH,
        models::SeedPeerCluster::PATH,
        models::Scheduler::PATH,
        models::SeedPeer::PATH,
        models::Peer::PATH,
        models::Application::PATH,
        models::Config::PATH,
    ];
    let documented: Vec<&str> = openapi::RESOURCES.iter().map(|r| r.0).collect();
    assert_eq!(documented, mounted);
    // The document is served where upstream's is, and the UI (vendored) shows it.
    let served = call("GET", &format!("{}/swagger/doc.json", m.rest), None, None).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.body, doc);
    let ui = reqwest::get(format!("{}/swagger/", m.rest)).await.unwrap();
    assert_eq!(ui.status(), 200);
    let page = ui.text().await.unwrap();
    assert!(page.contains("swagger-ui"), "{page}");
    let init = reqwest::get(format!("{}/swagger/swagger-initializer.js", m.rest))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(init.contains("/swagger/doc.json"), "{init}");
}
