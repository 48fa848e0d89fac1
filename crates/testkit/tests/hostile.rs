//! A stranger on the network against a real dfdaemon: what its TCP ports refuse, and what
//! its origin policy keeps it from fetching.

use d7y_testkit::{content, Daemon, DaemonOptions, Origin, OriginOptions};
use dragonfly_api::common::v2::Download;
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::{DeleteTaskRequest, DownloadTaskRequest};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
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
fn remote_download_task_cannot_use_local_powers() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let origin = Origin::start(OriginOptions::default());
    let url = origin.put("f", content(1 << 20, 1));
    let target = tmp.path().join("planted");
    runtime().block_on(async {
        let mut upload =
            DfdaemonUploadClient::connect(format!("http://127.0.0.1:{}", daemon.upload_port))
                .await
                .unwrap();
        let cases: [(&str, Download); 4] = [
            (
                "output_path",
                Download {
                    url: url.clone(),
                    output_path: Some(target.display().to_string()),
                    ..Default::default()
                },
            ),
            (
                "overwrite",
                Download {
                    url: url.clone(),
                    overwrite: true,
                    ..Default::default()
                },
            ),
            (
                "force_hard_link",
                Download {
                    url: url.clone(),
                    force_hard_link: true,
                    ..Default::default()
                },
            ),
            (
                "need_piece_content",
                Download {
                    url: url.clone(),
                    need_piece_content: true,
                    ..Default::default()
                },
            ),
        ];
        for (field, download) in cases {
            let err = upload
                .download_task(DownloadTaskRequest {
                    download: Some(download),
                })
                .await
                .expect_err(field);
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{field}");
            assert!(
                err.message().contains(field) && err.message().contains("unix socket"),
                "{field}: {}",
                err.message()
            );
        }
        let err = upload
            .delete_task(DeleteTaskRequest {
                task_id: "a".repeat(64),
                remote_ip: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    });
    assert!(!target.exists(), "a remote request planted a file");
    assert_eq!(origin.requests(), 0, "a refused request reached the origin");
    assert!(files_under(&daemon.tasks_dir()).is_empty());
}

#[test]
fn denied_origins_are_refused_with_the_setting_named() {
    let tmp = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions::default());
    let url = origin.put("f", content(1 << 20, 2));
    // The origin listens on 127.0.0.1; deny it, as a metadata address is denied by default.
    let daemon = Daemon::start(
        &tmp.path().join("peer"),
        "backend:\n  deniedNetworks: [127.0.0.0/8, 169.254.0.0/16]\n",
    )
    .unwrap();
    let output = tmp.path().join("out");
    let out = daemon.dfget_output(&url, &output, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("backend.deniedNetworks"), "{stderr}");
    assert!(!output.exists());
    assert_eq!(origin.requests(), 0);

    // The default denies link-local (cloud metadata) addresses.
    let daemon = Daemon::start(&tmp.path().join("default"), "").unwrap();
    let out = daemon.dfget_output("http://169.254.169.254/latest/meta-data/iam", &output, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("169.254.0.0/16"), "{stderr}");
}

/// Fetches every piece of `task_id` from the daemon's piece server, from 127.0.0.2;
/// returns the bytes and how long it took.
async fn fetch_all(daemon: &Daemon, task_id: &str, pieces: u32) -> (Vec<u8>, std::time::Duration) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", daemon.piece_port).parse().unwrap();
    let started = std::time::Instant::now();
    let mut client = d7y_vortex::Client::connect_from(
        addr,
        Some("127.0.0.2".parse().unwrap()),
        std::time::Duration::from_secs(3),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    for n in 0..pieces {
        let (_, data) = client.fetch_piece(task_id, n).await.unwrap();
        out.extend_from_slice(&data);
    }
    (out, started.elapsed())
}

#[test]
fn a_thousand_connections_that_never_read_do_not_stop_a_good_child() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_opts(
        &tmp.path().join("peer"),
        &DaemonOptions {
            piece_server_yaml:
                "    maxConnectionsPerIP: 100\n    idleTimeout: 2s\n    writeTimeout: 2s\n".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let origin = Origin::start(OriginOptions::default());
    let size = 64 << 20;
    let data = content(size, 3);
    let url = origin.put("big", data.clone());
    let output = tmp.path().join("big");
    let out = daemon.dfget_output(&url, &output, &["--piece-length", "4mib"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task_id = files_under(&daemon.tasks_dir())[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let pieces = (size / (4 << 20)) as u32;
    let rt = runtime();
    let (got, baseline) = rt.block_on(fetch_all(&daemon, &task_id, pieces));
    assert!(got == data);

    // 1,000 connections from 127.0.0.1: each asks for a piece and never reads.
    let request = d7y_vortex::encode_request(&task_id, 0);
    let mut open = Vec::new();
    for _ in 0..1000 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", daemon.piece_port)).unwrap();
        let _ = c.write_all(&request);
        open.push(c);
    }
    // Beyond the per-address cap (100) they are refused: closed at once.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut refused = 0;
    let mut scratch = vec![0u8; 64 * 1024];
    for c in &mut open {
        c.set_nonblocking(true).unwrap();
        loop {
            match c.read(&mut scratch) {
                Ok(0) => {
                    refused += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    refused += 1;
                    break;
                }
            }
        }
        c.set_nonblocking(false).unwrap();
    }
    assert!(
        refused >= 900,
        "only {refused} connections refused; at most 100 may be admitted from one address"
    );
    // The good child, on another address, at (nearly) full speed.
    let (got, attacked) = rt.block_on(fetch_all(&daemon, &task_id, pieces));
    assert!(got == data);
    assert!(
        attacked <= baseline * 4 + std::time::Duration::from_secs(1),
        "the good child took {attacked:?} under attack, {baseline:?} without"
    );
    // The ones admitted are cut when their writes time out, or closed when idle.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut closed = 0;
    let mut buf = vec![0u8; 1 << 20];
    for c in &mut open {
        c.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        loop {
            match c.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(_) if std::time::Instant::now() < deadline => continue,
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, 1000, "connections left open after the timeouts");
    let metrics = Daemon::http_get(daemon.metrics_port, "/metrics").unwrap();
    assert!(
        metrics.contains("dragonfly_dfdaemon"),
        "the daemon stopped answering"
    );
}

#[test]
fn a_blob_whose_bytes_do_not_match_its_digest_is_neither_kept_nor_served() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let origin = Origin::start(OriginOptions::default());
    // The URL names the digest of other bytes than the origin sends.
    let claimed = d7y_types::Digest::of(d7y_types::Algorithm::Sha256, b"the real layer");
    let path = format!("v2/library/app/blobs/{claimed}");
    let url = origin.put_at(&path, content(6 << 20, 4));
    let output = tmp.path().join("layer");
    let out = daemon.dfget_output(&url, &output, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("digest mismatch"), "{stderr}");
    assert!(!output.exists());
    // Nothing is kept, so nothing can be served.
    assert!(
        files_under(&daemon.tasks_dir()).is_empty(),
        "the content was kept"
    );
    let task_id = claimed.encoded().to_string();
    runtime().block_on(async {
        let err = daemon
            .download_client()
            .await
            .unwrap()
            .stat_local_task(dragonfly_api::dfdaemon::v2::StatLocalTaskRequest {
                task_id: task_id.clone(),
                remote_ip: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        let addr = format!("127.0.0.1:{}", daemon.piece_port).parse().unwrap();
        let mut client = d7y_vortex::Client::connect(addr, std::time::Duration::from_secs(3))
            .await
            .unwrap();
        assert!(client
            .request_piece(&task_id, 0)
            .await
            .unwrap_err()
            .is_not_found());
    });
    // A blob whose bytes do match is downloaded and kept.
    let layer = content(6 << 20, 8);
    let digest = d7y_types::Digest::of(d7y_types::Algorithm::Sha256, &layer);
    let url = origin.put_at(&format!("v2/library/app/blobs/{digest}"), layer.clone());
    let out = daemon.dfget_output(&url, &output, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&output).unwrap() == layer);
}

#[test]
fn bytes_lost_in_a_crash_are_fetched_again_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let origin = Origin::start(OriginOptions::default());
    let size = 24 << 20;
    let data = content(size, 6);
    let url = origin.put("kept", data.clone());
    let output = tmp.path().join("kept");
    let out = daemon.dfget_output(&url, &output, &["--piece-length", "4mib"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content_file = files_under(&daemon.tasks_dir())[0].clone();
    let task_id = content_file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();

    // A crash, and the disk lost the bytes of piece 2 (zeros where they were).
    daemon.kill();
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&content_file)
            .unwrap();
        file.write_all_at(&vec![0u8; 4 << 20], 2 * (4 << 20))
            .unwrap();
    }
    daemon.restart().unwrap();
    // A child asking for the damaged piece is told it is not here.
    runtime().block_on(async {
        let addr = format!("127.0.0.1:{}", daemon.piece_port).parse().unwrap();
        let mut client = d7y_vortex::Client::connect(addr, std::time::Duration::from_secs(3))
            .await
            .unwrap();
        assert!(client
            .request_piece(&task_id, 2)
            .await
            .unwrap_err()
            .is_not_found());
        // An intact one is served.
        let (_, piece) = client.fetch_piece(&task_id, 1).await.unwrap();
        assert!(piece == data[4 << 20..8 << 20]);
    });
    // The next download fetches the lost piece again and delivers the right bytes.
    origin.reset_counters();
    std::fs::remove_file(&output).unwrap();
    let out = daemon.dfget_output(&url, &output, &["--piece-length", "4mib"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&output).unwrap() == data,
        "served the lost bytes"
    );
    let fetched = origin.bytes_served();
    assert!(
        (4 << 20..=(4 << 20) + 4096).contains(&fetched),
        "expected only the lost piece from the origin, it served {fetched} bytes"
    );
}

/// A task may be dropped over the network only by the daemon's control plane: a stranger
/// is refused, a connection from its scheduler's address is served.
#[test]
fn only_the_control_plane_may_delete_a_task_over_the_network() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_opts(
        &tmp.path().join("peer"),
        &DaemonOptions {
            // Nothing listens there; only the address matters.
            schedulers: vec!["127.0.0.2:1".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let origin = Origin::start(OriginOptions::default());
    let url = origin.put("f", content(6 << 20, 2));
    let out = tmp.path().join("out");
    let got = daemon.dfget_output(&url, &out, &[]);
    assert!(
        got.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&got.stderr),
        daemon.log()
    );
    let task = std::fs::read_dir(daemon.tasks_dir())
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .next()
        .expect("the download left a task");
    let upload = format!("127.0.0.1:{}", daemon.upload_port);
    runtime().block_on(async {
        let delete = |from: &'static str| {
            let upload = upload.clone();
            let task = task.clone();
            async move {
                let channel = d7y_net::channel(
                    &upload,
                    &d7y_net::ChannelOptions {
                        local: Some(from.parse().unwrap()),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                DfdaemonUploadClient::new(channel)
                    .delete_task(DeleteTaskRequest {
                        task_id: task,
                        remote_ip: None,
                    })
                    .await
            }
        };
        let refused = delete("127.0.0.1").await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("manager and schedulers"),
            "{}",
            refused.message()
        );
        assert!(
            daemon.content_path(&task).exists(),
            "a stranger dropped the task"
        );
        delete("127.0.0.2").await.unwrap();
    });
    assert!(
        !daemon.content_path(&task).exists(),
        "the scheduler's delete was not done"
    );
}
