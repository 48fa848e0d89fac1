//! The dfdaemon proxy and registry mirror driven by curl: blobs through the task engine
//! (streamed, verified, shared, cached, ranged), everything else passed through untouched.

use d7y_testkit::{content, Daemon, DaemonOptions, Origin, OriginOptions};
use sha2::Digest as _;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// What curl saw: exit code, status, response headers (lowercase names), body.
struct Got {
    exit: i32,
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn curl(args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "60", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .output()
        .expect("curl runs");
    let head = std::fs::read_to_string(&head).unwrap_or_default();
    // With a CONNECT tunnel curl prints the proxy's answer first: keep the last head.
    let last = head
        .split("\r\n\r\n")
        .filter(|h| h.starts_with("HTTP/"))
        .last()
        .unwrap_or("");
    let mut lines = last.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Got {
        exit: out.status.code().unwrap_or(-1),
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// A blob at `/v2/test/img/blobs/sha256:<its digest>`; returns (digest hex, path).
fn put_blob(origin: &Origin, data: Vec<u8>) -> (String, String) {
    let hex = sha256_hex(&data);
    let path = format!("/v2/test/img/blobs/sha256:{hex}");
    origin.put_at(&path, data);
    (hex, path)
}

fn daemon(dir: &Path, proxy_yaml: &str) -> Daemon {
    Daemon::start_opts(
        dir,
        &DaemonOptions {
            proxy_yaml: proxy_yaml.to_string(),
            ..Default::default()
        },
    )
    .unwrap()
}

fn daemon_with_server(dir: &Path, proxy_server_yaml: &str) -> Daemon {
    Daemon::start_opts(
        dir,
        &DaemonOptions {
            proxy_server_yaml: proxy_server_yaml.to_string(),
            ..Default::default()
        },
    )
    .unwrap()
}

fn proxy(daemon: &Daemon) -> String {
    format!("http://127.0.0.1:{}", daemon.proxy_port)
}

fn metric(daemon: &Daemon, name: &str) -> f64 {
    let text = Command::new("curl")
        .args([
            "-s",
            &format!("http://127.0.0.1:{}/metrics", daemon.metrics_port),
        ])
        .output()
        .unwrap()
        .stdout;
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_mirrored_blob_is_served_through_a_task_and_then_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    let data = content(9 * 1024 * 1024 + 7, 1);
    let (hex, path) = put_blob(&origin, data.clone());
    let registry = format!("http://{}", origin.addr());
    let daemon = daemon(
        &tmp.path().join("d"),
        &format!("  registryMirror:\n    addr: {registry}\n"),
    );
    // containerd's form: the registry in the ns parameter (here the configured mirror's
    // host, so its scheme is used).
    let ns = format!("{}{path}?ns={}", proxy(&daemon), origin.addr());
    let got = curl(&[&ns]);
    assert_eq!((got.exit, got.status), (0, 200));
    assert!(got.body == data, "body differs");
    assert_eq!(
        got.headers["x-dragonfly-task-id"], hex,
        "the blob digest is the task"
    );
    assert_eq!(got.headers["content-length"], data.len().to_string());
    assert_eq!(got.headers["content-type"], "application/octet-stream");
    assert!(
        got.headers["etag"].ends_with(&format!("-{}\"", data.len())),
        "origin's ETag kept"
    );
    let served = origin.bytes_served();
    assert!(
        served <= data.len() as u64 + 1,
        "origin served {served} bytes for one copy"
    );

    // The X-Dragonfly-Registry form, answered from the cache: no body bytes from the origin.
    let header = format!("X-Dragonfly-Registry: {registry}");
    let got = curl(&["-H", &header, &format!("{}{path}", proxy(&daemon))]);
    assert_eq!((got.exit, got.status), (0, 200));
    assert!(got.body == data);
    assert_eq!(
        origin.bytes_served(),
        served,
        "second pull came from the cache"
    );
    assert_eq!(
        metric(
            &daemon,
            "dragonfly_dfdaemon_proxy_request_via_dfdaemon_total"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &daemon,
            "dragonfly_dfdaemon_proxy_request_via_dfdaemon_and_cache_hits_total"
        ),
        1.0
    );
    assert!(
        metric(&daemon, "dragonfly_dfdaemon_proxy_traffic{type=\"p2p\"}")
            >= 2.0 * data.len() as f64
    );
}

#[test]
fn concurrent_pulls_of_one_blob_share_one_task() {
    let tmp = tempfile::tempdir().unwrap();
    // Slow enough that the three requests overlap.
    let origin = Origin::start(OriginOptions {
        rate: Some(2 * 1024 * 1024),
        ..Default::default()
    });
    let data = content(24 * 1024 * 1024, 2);
    let (_, path) = put_blob(&origin, data.clone());
    let daemon = daemon(&tmp.path().join("d"), "");
    let url = origin.url(&path);
    let proxy = proxy(&daemon);
    let pulls: Vec<_> = (0..3)
        .map(|_| {
            let (proxy, url) = (proxy.clone(), url.clone());
            std::thread::spawn(move || curl(&["-x", &proxy, &url]))
        })
        .collect();
    for pull in pulls {
        let got = pull.join().unwrap();
        assert_eq!((got.exit, got.status), (0, 200));
        assert!(got.body == data);
    }
    assert_eq!(
        metric(
            &daemon,
            "dragonfly_dfdaemon_proxy_request_via_dfdaemon_and_cache_hits_total"
        ),
        0.0,
        "the pulls overlapped: none was answered from a finished task"
    );
    let served = origin.bytes_served();
    assert!(
        served <= data.len() as u64 + 3,
        "three pulls made the origin serve {served} bytes (one copy is {})",
        data.len()
    );
}

#[test]
fn ranges_are_answered_with_exact_bytes_and_206() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    let piece = 4 * 1024 * 1024u64;
    let data = content(10 * 1024 * 1024 + 123, 3);
    let len = data.len() as u64;
    let (_, path) = put_blob(&origin, data.clone());
    let daemon = daemon(&tmp.path().join("d"), "");
    let url = origin.url(&path);
    let proxy = proxy(&daemon);
    let cases: [(String, u64, u64); 6] = [
        ("100-200".into(), 100, 201), // inside a piece
        (
            format!("{}-{}", piece - 10, piece + 10),
            piece - 10,
            piece + 11,
        ), // across pieces
        (format!("{}-", len - 5), len - 5, len), // at the end
        (format!("{}-{}", len - 1, len + 100), len - 1, len), // past the end
        ("-77".into(), len - 77, len), // suffix
        (
            format!("{}-{}", 2 * piece, 2 * piece),
            2 * piece,
            2 * piece + 1,
        ), // first byte of a piece
    ];
    for (range, start, end) in cases {
        let got = curl(&["-x", &proxy, "-r", &range, &url]);
        assert_eq!((got.exit, got.status), (0, 206), "range {range}");
        assert!(
            got.body == data[start as usize..end as usize],
            "range {range}: wrong bytes"
        );
        assert_eq!(
            got.headers["content-range"],
            format!("bytes {start}-{}/{len}", end - 1)
        );
        assert_eq!(got.headers["content-length"], (end - start).to_string());
    }
    let got = curl(&["-x", &proxy, "-r", &format!("{len}-"), &url]);
    assert_eq!(got.status, 416);
    assert_eq!(got.headers["content-range"], format!("bytes */{len}"));
    // Several ranges are the origin's to answer (this one ignores them: 200, whole body).
    let got = curl(&["-x", &proxy, "-r", "0-1,5-6", &url]);
    assert_eq!(got.status, 200);
    assert!(!got.headers.contains_key("x-dragonfly-task-id"));
}

#[test]
fn a_blob_whose_bytes_do_not_match_its_digest_is_cut_short_and_not_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    let data = content(6 * 1024 * 1024, 4);
    let wrong = "0".repeat(63) + "7";
    let path = format!("/v2/test/img/blobs/sha256:{wrong}");
    origin.put_at(&path, data.clone());
    let daemon = daemon(&tmp.path().join("d"), "");
    let url = origin.url(&path);
    for attempt in 0..2 {
        let got = curl(&["-x", &proxy(&daemon), &url]);
        assert_ne!(got.exit, 0, "attempt {attempt}: curl saw a clean end");
        assert!(
            got.body.len() < data.len(),
            "attempt {attempt}: the whole wrong body was delivered"
        );
    }
    assert!(
        files_under(&daemon.tasks_dir()).is_empty(),
        "bytes kept: {:?}",
        files_under(&daemon.tasks_dir())
    );
}

#[test]
fn the_origin_decides_who_gets_content_even_when_it_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    let data = content(5 * 1024 * 1024, 5);
    origin.put("secret", data.clone());
    let daemon = daemon(&tmp.path().join("d"), "");
    let url = origin.url("/auth/secret");
    let proxy = proxy(&daemon);
    let p2p = "X-Dragonfly-Use-P2P: true";
    let refused = curl(&["-x", &proxy, "-H", p2p, &url]);
    assert_eq!(
        refused.status, 401,
        "the origin's refusal reaches the client"
    );
    let allowed = curl(&["-x", &proxy, "-H", p2p, "-H", "X-Token: secret", &url]);
    assert_eq!((allowed.exit, allowed.status), (0, 200));
    assert!(allowed.body == data);
    assert!(allowed.headers.contains_key("x-dragonfly-task-id"));
    let refused = curl(&["-x", &proxy, "-H", p2p, &url]);
    assert_eq!(
        refused.status, 401,
        "a cached task is not handed to a refused client"
    );
    assert!(refused.body.is_empty());
}

#[test]
fn everything_else_passes_through_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    let manifest = b"{\"schemaVersion\":2}".to_vec();
    origin.put_at("/v2/test/img/manifests/v1", manifest.clone());
    let data = content(5 * 1024 * 1024, 6);
    let (_, blob) = put_blob(&origin, data.clone());
    origin.put("f", data.clone());
    let daemon = daemon(&tmp.path().join("d"), "");
    let proxy = proxy(&daemon);

    let got = curl(&["-x", &proxy, &origin.url("/v2/test/img/manifests/v1")]);
    assert_eq!((got.status, got.body.clone()), (200, manifest));
    assert!(
        !got.headers.contains_key("x-dragonfly-task-id"),
        "manifests are not tasks"
    );
    assert_eq!(
        curl(&["-x", &proxy, &origin.url("/status/503")]).status,
        503
    );
    let redirect = curl(&["-x", &proxy, &origin.url("/redirect/f")]);
    assert_eq!(redirect.status, 302, "redirects reach the client");
    assert_eq!(redirect.headers["location"], "/files/f");
    let head = curl(&["-x", &proxy, "-I", &origin.url(&blob)]);
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-length"], data.len().to_string());
    let direct = curl(&[
        "-x",
        &proxy,
        "-H",
        "X-Dragonfly-Use-P2P: false",
        &origin.url(&blob),
    ]);
    assert_eq!(direct.status, 200);
    assert!(direct.body == data);
    assert!(!direct.headers.contains_key("x-dragonfly-task-id"));
    let tunnel = curl(&["-p", "-x", &proxy, &origin.url("/files/f")]);
    assert_eq!((tunnel.exit, tunnel.status), (0, 200), "CONNECT tunnel");
    assert!(tunnel.body == data);
    let bad = curl(&[
        "-x",
        &proxy,
        "-H",
        "X-Dragonfly-Priority: 9",
        &origin.url(&blob),
    ]);
    assert_eq!(bad.status, 400);
    assert!(String::from_utf8_lossy(&bad.body).contains("x-dragonfly-priority"));
    assert!(
        files_under(&daemon.tasks_dir()).is_empty(),
        "nothing went through a task"
    );
}

#[test]
fn proxy_basic_auth_when_configured() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    origin.put("f", b"hello".to_vec());
    let daemon = daemon_with_server(
        &tmp.path().join("d"),
        "    basicAuth:\n      username: user\n      password: pass\n",
    );
    let proxy = proxy(&daemon);
    let url = origin.url("/files/f");
    let got = curl(&["-x", &proxy, &url]);
    assert_eq!(got.status, 407);
    assert!(got.headers["proxy-authenticate"].starts_with("Basic"));
    let got = curl(&["-x", &proxy, "-U", "user:wrong", &url]);
    assert_eq!(got.status, 407);
    let got = curl(&["-x", &proxy, "-U", "user:pass", &url]);
    assert_eq!((got.status, got.body), (200, b"hello".to_vec()));
}

#[test]
fn content_encoding_is_the_origins_and_bytes_are_never_decoded() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    // Stored bytes an origin serves with Content-Encoding: gzip (not real gzip: the proxy
    // must pass them on as they are, not decode, re-encode or drop the header).
    let data = content(5 * 1024 * 1024, 7);
    origin.put("z", data.clone());
    let daemon = daemon(&tmp.path().join("d"), "");
    let url = origin.url("/encoded/z");
    for accept in ["gzip", "identity"] {
        let got = curl(&[
            "-x",
            &proxy(&daemon),
            "-H",
            "X-Dragonfly-Use-P2P: true",
            "-H",
            &format!("Accept-Encoding: {accept}"),
            &url,
        ]);
        assert_eq!((got.exit, got.status), (0, 200), "accept {accept}");
        assert_eq!(got.headers["content-encoding"], "gzip", "accept {accept}");
        assert!(got.headers.contains_key("x-dragonfly-task-id"));
        assert!(got.body == data, "accept {accept}: the bytes were changed");
    }
}

#[test]
fn a_blob_behind_a_signed_redirect_keeps_its_task_and_leaves_the_store_once() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    let data = content(9 * 1024 * 1024, 8);
    let hex = sha256_hex(&data);
    origin.put("object", data.clone());
    let url = origin.redirect_at(&format!("/v2/test/img/blobs/sha256:{hex}"), "object");
    let daemon = daemon(&tmp.path().join("d"), "");
    for round in 0..2 {
        let got = curl(&["-x", &proxy(&daemon), &url]);
        assert_eq!((got.exit, got.status), (0, 200), "round {round}");
        assert!(got.body == data, "round {round}: wrong body");
        assert_eq!(
            got.headers["x-dragonfly-task-id"], hex,
            "the blob's task, not the URL's"
        );
    }
    assert!(
        origin.bytes_served() <= data.len() as u64 + 1,
        "the object store served {} bytes for one copy",
        origin.bytes_served()
    );
}
