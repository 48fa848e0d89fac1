//! End-to-end: the real dfdaemon and dfget binaries against an instrumented origin.

use d7y_testkit::{content, Daemon, Origin, OriginOptions};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &std::process::Output, daemon: &Daemon) {
    assert!(
        out.status.success(),
        "dfget failed ({}): {}\n--- daemon log ---\n{}",
        out.status,
        stderr(out),
        daemon.log()
    );
}

fn assert_same(path: &Path, expected: &[u8]) {
    let actual = std::fs::read(path).unwrap();
    assert_eq!(actual.len(), expected.len(), "{}: length", path.display());
    assert!(actual == expected, "{}: content differs", path.display());
}

#[test]
fn sizes_are_byte_identical_with_and_without_range_support() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let sizes = [0, 1, 4 * MIB - 1, 4 * MIB + 1, 100 * MIB];
    for range in [true, false] {
        let origin = Origin::start(OriginOptions {
            range,
            ..Default::default()
        });
        for (i, &size) in sizes.iter().enumerate() {
            let data = content(size, i as u64 + 100 * range as u64);
            let url = origin.put(&format!("f{size}"), data.clone());
            let output = out_dir.join(format!("range-{range}-{size}"));
            let out = daemon.dfget_output(&url, &output, &[]);
            assert_ok(&out, &daemon);
            assert_same(&output, &data);
        }
        // A finished task is served from the cache: the origin sees no more bytes.
        origin.reset_counters();
        let url = origin.url(&format!("/files/f{}", 4 * MIB + 1));
        let again = out_dir.join(format!("again-{range}"));
        assert_ok(&daemon.dfget_output(&url, &again, &[]), &daemon);
        assert_eq!(
            origin.bytes_served(),
            0,
            "cached task went back to the origin"
        );
        assert_same(&again, &content(4 * MIB + 1, 3 + 100 * range as u64));
    }

    let metrics = Daemon::http_get(daemon.metrics_port, "/metrics").unwrap();
    assert!(
        metrics.contains(
            "dragonfly_dfdaemon_download_traffic{task_type=\"STANDARD\",type=\"BACK_TO_SOURCE\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("dragonfly_dfdaemon_download_task_total"),
        "{metrics}"
    );
    let health = Daemon::http_get(daemon.health_port, "/healthy").unwrap();
    assert!(
        health.starts_with("HTTP/1.0 200") || health.starts_with("HTTP/1.1 200"),
        "{health}"
    );
}

#[test]
fn killed_daemon_resumes_and_fetches_only_missing_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    // Two ranged GETs at a time, 16 pieces of 4 MiB at 24 MiB/s per connection: the
    // download takes over a second and pieces finish one after another.
    let mut daemon = Daemon::start_with(
        &tmp.path().join("peer"),
        "  backToSourceConcurrentPieceCount: 2\n",
        "",
    )
    .unwrap();
    let origin = Origin::start(OriginOptions {
        range: true,
        rate: Some(24 * MIB as u64),
        ..Default::default()
    });
    let size = 64 * MIB;
    let data = content(size, 7);
    let url = origin.put("big", data.clone());
    let output = tmp.path().join("big");
    let mut dfget = daemon
        .dfget(&url, &output)
        .arg("--piece-length")
        .arg("4mib")
        .spawn()
        .unwrap();

    // Kill the daemon once some, but not all, bytes came from the origin.
    let deadline = Instant::now() + Duration::from_secs(60);
    while origin.bytes_served() < (size / 3) as u64 {
        assert!(
            Instant::now() < deadline,
            "download made no progress:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.kill();
    let status = dfget.wait().unwrap();
    assert!(!status.success(), "dfget must fail when its daemon dies");
    assert!(!output.exists(), "nothing may be left at the output path");

    // What the killed daemon recorded as finished.
    let (task_id, finished) = {
        let storage = d7y_storage::Storage::open(&daemon.data_dir(), true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tasks = storage.list_tasks().await.unwrap();
            assert_eq!(tasks.len(), 1);
            let pieces = storage.pieces(&tasks[0].id).await.unwrap();
            (tasks[0].id.clone(), pieces.len())
        })
    };
    assert!(
        finished > 0 && finished < 16,
        "expected a partial task, found {finished} of 16 pieces"
    );

    daemon.restart().unwrap();
    origin.reset_counters();
    let out = daemon
        .dfget(&url, &output)
        .arg("--piece-length")
        .arg("4mib")
        .output()
        .unwrap();
    assert_ok(&out, &daemon);
    assert_same(&output, &data);
    let missing = ((16 - finished) * 4 * MIB) as u64;
    let served = origin.bytes_served();
    // The missing pieces plus the one-byte probe, nothing more.
    assert!(
        served >= missing && served <= missing + 1,
        "origin served {served} bytes after restart, the {} missing pieces are {missing} (task {task_id})",
        16 - finished
    );
}

#[test]
fn vortex_client_fetches_pieces_with_matching_crc() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let origin = Origin::start(OriginOptions::default());
    let size = 9 * MIB;
    let data = content(size, 11);
    let url = origin.put("v", data.clone());
    let output = tmp.path().join("v");
    assert_ok(
        &daemon.dfget_output(&url, &output, &["--piece-length", "4mib"]),
        &daemon,
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Find the task ID the daemon used (upstream's derivation, default filtered params).
        let filtered = d7y_types::id::default_filtered_query_params();
        let task_id = d7y_types::id::task_id(&d7y_types::TaskIdParams {
            url: &url,
            piece_length: Some(4 * MIB as u64),
            tag: Some(""),
            application: Some(""),
            filtered_query_params: &filtered,
            ..Default::default()
        })
        .unwrap();
        let addr = format!("127.0.0.1:{}", daemon.piece_port).parse().unwrap();
        let mut client = d7y_vortex::Client::connect(addr, Duration::from_secs(5))
            .await
            .unwrap();
        for number in 0..3u32 {
            let (meta, bytes) = client.fetch_piece(&task_id, number).await.unwrap();
            let offset = number as usize * 4 * MIB;
            let end = (offset + 4 * MIB).min(size);
            assert_eq!(meta.offset as usize, offset);
            assert_eq!(bytes, &data[offset..end]);
            let crc = crc32fast::hash(&bytes);
            assert_eq!(meta.digest, format!("crc32:{crc}"));
        }
        // Unknown piece and unknown task: an error packet, promptly, and the connection lives on.
        let err = tokio::time::timeout(Duration::from_secs(5), client.fetch_piece(&task_id, 99))
            .await
            .expect("no hang")
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            client.fetch_piece(&"f".repeat(64), 0),
        )
        .await
        .expect("no hang")
        .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        let (meta, _) = client.fetch_piece(&task_id, 2).await.unwrap();
        assert_eq!(meta.length as usize, size - 8 * MIB);
    });
}

#[test]
fn bad_inputs_fail_clearly_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let origin = Origin::start(OriginOptions::default());
    let data = content(MIB, 5);
    let url = origin.put("ok", data.clone());
    let dead = format!("http://127.0.0.1:{}/x", d7y_testkit::free_port());
    let wrong_digest = format!("sha256:{}", "0".repeat(64));
    let output = tmp.path().join("out");
    let cases: Vec<(&str, String, Vec<&str>, i32, &str)> = vec![
        (
            "malformed URL",
            "http//nope".into(),
            vec![],
            2,
            "invalid URL",
        ),
        (
            "unsupported scheme",
            "ftp://127.0.0.1/x".into(),
            vec![],
            2,
            "unsupported URL scheme",
        ),
        ("unreachable origin", dead, vec![], 4, "cannot reach origin"),
        (
            "HTTP 404",
            origin.url("/files/missing"),
            vec![],
            4,
            "HTTP 404 Not Found",
        ),
        (
            "HTTP 500",
            origin.url("/status/500"),
            vec![],
            4,
            "HTTP 500 Internal Server Error",
        ),
        (
            "HTTP 403",
            origin.url("/status/403"),
            vec![],
            4,
            "HTTP 403 Forbidden",
        ),
        (
            "digest mismatch",
            url.clone(),
            vec!["--digest", &wrong_digest],
            5,
            "digest mismatch",
        ),
        (
            "bad digest",
            url.clone(),
            vec!["--digest", "md5:abc"],
            2,
            "unsupported digest algorithm",
        ),
        (
            "bad piece length",
            url.clone(),
            vec!["--piece-length", "1mib"],
            2,
            "piece length",
        ),
        (
            "bad header",
            url.clone(),
            vec!["-H", "nocolon"],
            2,
            "invalid header",
        ),
    ];
    for (what, url, extra, code, message) in cases {
        let out = daemon.dfget_output(&url, &output, &extra);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{what}: {err}");
        assert!(err.contains(message), "{what}: {err:?} lacks {message:?}");
        assert_eq!(err.lines().count(), 1, "{what}: one line: {err:?}");
        assert!(!output.exists(), "{what}: left a file");
    }
    // Nothing but the daemon's directory in the output dir (no temp files).
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("peer")]);

    // No daemon at the endpoint.
    let out = std::process::Command::new(d7y_testkit::bin_path("dfget"))
        .args([url.as_str(), "-O"])
        .arg(&output)
        .args(["-e", "/nonexistent/dfdaemon.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("start one with 'dfdaemon"),
        "{}",
        stderr(&out)
    );

    // Output directory missing or not writable.
    for bad in [tmp.path().join("no/such/dir/out"), "/proc/dfget-out".into()] {
        let out = daemon.dfget_output(&url, &bad, &[]);
        assert_eq!(
            out.status.code(),
            Some(6),
            "{}: {}",
            bad.display(),
            stderr(&out)
        );
        assert!(!bad.exists());
    }
    // Existing output without --overwrite, then with it.
    std::fs::write(&output, b"old").unwrap();
    let out = daemon.dfget_output(&url, &output, &[]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert_eq!(std::fs::read(&output).unwrap(), b"old");
    assert_ok(
        &daemon.dfget_output(&url, &output, &["--overwrite"]),
        &daemon,
    );
    assert_same(&output, &data);
}

#[test]
fn concurrent_requests_for_one_task_share_one_download() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let origin = Origin::start(OriginOptions {
        range: true,
        rate: Some(64 * MIB as u64),
        ..Default::default()
    });
    let size = 32 * MIB;
    let data = content(size, 21);
    let url = origin.put("shared", data.clone());
    let children: Vec<_> = (0..3)
        .map(|i| {
            daemon
                .dfget(&url, &tmp.path().join(format!("o{i}")))
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "{}", daemon.log());
    }
    for i in 0..3 {
        assert_same(&tmp.path().join(format!("o{i}")), &data);
    }
    let served = origin.bytes_served();
    assert!(
        served <= size as u64 + 1,
        "origin served {served} bytes for one {size}-byte task"
    );
}

#[test]
fn redirects_are_followed_and_headers_passed_through() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let origin = Origin::start(OriginOptions::default());
    let data = content(5 * MIB + 3, 31);
    origin.put("r", data.clone());

    let output = tmp.path().join("redirected");
    assert_ok(
        &daemon.dfget_output(&origin.url("/redirect/r"), &output, &[]),
        &daemon,
    );
    assert_same(&output, &data);

    let output = tmp.path().join("auth");
    let out = daemon.dfget_output(&origin.url("/auth/r"), &output, &[]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("HTTP 401"), "{}", stderr(&out));
    assert!(!output.exists());
    assert_ok(
        &daemon.dfget_output(&origin.url("/auth/r"), &output, &["-H", "X-Token: secret"]),
        &daemon,
    );
    assert_same(&output, &data);
}
