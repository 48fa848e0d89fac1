//! Origins other than HTTP with real servers on 127.0.0.1: S3 through s3s-fs (auth
//! enforced) and moto, a directory of 1,000 objects with `dfget -r`, three peers sharing one
//! object (the store serves it once), wrong credentials, and credentials kept out of logs,
//! task IDs and stored metadata.

use d7y_testkit::stores::{S3Kind, S3Server};
use d7y_testkit::{content, Daemon, DaemonOptions, Swarm};
use std::path::Path;
use std::process::{Command, Output};

const MIB: usize = 1024 * 1024;
const AK: &str = "AKIDTESTKEY123";
const SK: &str = "secret-TEST-value-9f8e7d";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn dfget(daemon: &Daemon, s3: &S3Server, url: &str, out: &Path, extra: &[&str]) -> Output {
    Command::new(d7y_testkit::bin_path("dfget"))
        .arg(url)
        .arg("-O")
        .arg(out)
        .arg("-e")
        .arg(&daemon.socket)
        .arg("--no-progress")
        .args([
            "--storage-endpoint",
            &s3.endpoint,
            "--storage-region",
            "us-east-1",
        ])
        .args([
            "--storage-access-key-id",
            &s3.access_key,
            "--storage-access-key-secret",
            &s3.secret_key,
        ])
        .args(extra)
        .output()
        .unwrap()
}

fn files_under(dir: &Path, base: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files_under(&p, base, out);
        } else {
            out.push((
                p.strip_prefix(base).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
}

/// The same checks on one server: a ranged 20 MiB object, a 1,000-object prefix
/// downloaded and resumed, and (where auth is enforced) a clear error for a wrong secret.
fn object_and_prefix(kind: S3Kind) {
    let tmp = tempfile::tempdir().unwrap();
    let s3 = match kind {
        S3Kind::S3sFs => S3Server::s3s_fs(&tmp.path().join("s3"), AK, SK).unwrap(),
        S3Kind::Moto => S3Server::moto(&tmp.path().join("s3")).unwrap(),
    };
    let big = content(20 * MIB + 123, 1);
    let mut objects = vec![
        ("models/big.bin".to_string(), big.clone()),
        ("models/private.bin".to_string(), content(6 * MIB, 2)),
    ];
    for i in 0..1000 {
        objects.push((
            format!("many/d{}/f{i:04}.bin", i % 10),
            content(512 + i * 7, 100 + i as u64),
        ));
    }
    s3.put_objects("bucket", &objects).unwrap();
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();

    let out = tmp.path().join("big.bin");
    let got = dfget(&daemon, &s3, "s3://bucket/models/big.bin", &out, &[]);
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(std::fs::read(&out).unwrap() == big, "the object differs");

    let dir = tmp.path().join("many");
    let got = dfget(
        &daemon,
        &s3,
        "s3://bucket/many",
        &dir,
        &[
            "-r",
            "--max-files",
            "2000",
            "--max-concurrent-requests",
            "16",
        ],
    );
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(
        text(&got).contains("1000 files downloaded"),
        "{}",
        text(&got)
    );
    let mut found = Vec::new();
    files_under(&dir, &dir, &mut found);
    found.sort();
    let mut want: Vec<(String, Vec<u8>)> = objects[2..]
        .iter()
        .map(|(k, v)| (k.trim_start_matches("many/").to_string(), v.clone()))
        .collect();
    want.sort();
    assert_eq!(found.len(), 1000);
    assert!(found == want, "the directory differs from the prefix");
    // A second run fetches only what is missing.
    for i in [3, 500, 999] {
        std::fs::remove_file(dir.join(format!("d{}/f{i:04}.bin", i % 10))).unwrap();
    }
    let got = dfget(
        &daemon,
        &s3,
        "s3://bucket/many",
        &dir,
        &["-r", "--max-files", "2000"],
    );
    assert!(got.status.success(), "{}", text(&got));
    assert!(
        text(&got).contains("3 files downloaded") && text(&got).contains("997 already present"),
        "{}",
        text(&got)
    );
    // Filters.
    let some = tmp.path().join("some");
    let got = dfget(
        &daemon,
        &s3,
        "s3://bucket/many",
        &some,
        &["-r", "-I", "d7/*", "--exclude-files", "f00*"],
    );
    assert!(got.status.success(), "{}", text(&got));
    let mut only = Vec::new();
    files_under(&some, &some, &mut only);
    assert_eq!(
        only.len(),
        90,
        "d7/ without f0007..f0097: {:?}",
        only.iter().map(|f| &f.0).collect::<Vec<_>>()
    );

    if kind == S3Kind::S3sFs {
        // (An object the daemon has not cached: its cache answers this host's users.)
        let bad = Command::new(d7y_testkit::bin_path("dfget"))
            .args(["s3://bucket/models/private.bin", "-O"])
            .arg(tmp.path().join("nope"))
            .arg("-e")
            .arg(&daemon.socket)
            .args([
                "--no-progress",
                "--storage-endpoint",
                &s3.endpoint,
                "--storage-access-key-id",
                AK,
                "--storage-access-key-secret",
                "wrong-secret",
            ])
            .output()
            .unwrap();
        assert_eq!(bad.status.code(), Some(4), "{}", text(&bad));
        let message = text(&bad);
        eprintln!("wrong credentials: {message}");
        assert!(
            message.contains("s3://bucket") && message.contains("403"),
            "{message}"
        );
        assert!(!message.contains("wrong-secret"), "{message}");
        assert!(!tmp.path().join("nope").exists());
    }
}

#[test]
fn s3s_fs_objects_prefixes_and_wrong_credentials() {
    object_and_prefix(S3Kind::S3sFs);
}

#[test]
fn moto_objects_and_prefixes() {
    object_and_prefix(S3Kind::Moto);
}

#[test]
fn three_peers_share_one_object_and_credentials_stay_out_of_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::s3s_fs(&tmp.path().join("s3"), AK, SK).unwrap();
    let data = content(48 * MIB, 7);
    s3.put_objects("bucket", &[("shared/model.bin".to_string(), data.clone())])
        .unwrap();
    let swarm = Swarm::start_custom(3, |_| DaemonOptions::default());
    let before = s3.bytes_served();
    std::thread::scope(|s| {
        let handles: Vec<_> = swarm
            .peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                let out = tmp.path().join(format!("out{i}"));
                let s3 = &s3;
                s.spawn(move || {
                    (
                        dfget(peer, s3, "s3://bucket/shared/model.bin", &out, &[]),
                        out,
                    )
                })
            })
            .collect();
        for h in handles {
            let (got, out) = h.join().unwrap();
            assert!(got.status.success(), "{}", text(&got));
            assert!(std::fs::read(&out).unwrap() == data);
        }
    });
    let served = s3.bytes_served() - before;
    assert!(
        served < data.len() as u64 + 2 * MIB as u64,
        "the store served {served} bytes for a {} byte object: more than one copy",
        data.len()
    );
    // The key ID and the secret are nowhere: logs, task IDs, the daemons' stores.
    let mut places: Vec<(String, Vec<u8>)> =
        vec![("scheduler log".into(), swarm.scheduler.log().into_bytes())];
    for (i, d) in swarm
        .peers
        .iter()
        .chain(std::iter::once(&swarm.seed))
        .enumerate()
    {
        places.push((format!("daemon {i} log"), d.log().into_bytes()));
        let mut stored = Vec::new();
        files_under(&d.data_dir(), &d.data_dir(), &mut stored);
        for (name, bytes) in stored {
            if !name.contains("content/tasks") {
                places.push((format!("daemon {i} {name}"), bytes));
            }
        }
    }
    for (place, bytes) in places {
        for secret in [AK, SK] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} found in the {place}"
            );
        }
    }
}

#[test]
fn hdfs_files_and_directories_through_webhdfs_with_a_delegation_token() {
    use d7y_testkit::webhdfs::FakeWebHdfs;
    let tmp = tempfile::tempdir().unwrap();
    let hdfs = FakeWebHdfs::start(Some("dt-token-123"));
    let big = content(9 * MIB + 5, 11);
    hdfs.put("/data/big.bin", big.clone());
    for i in 0..20 {
        hdfs.put(
            &format!("/data/set/part-{i:03}"),
            content(1000 + i, 20 + i as u64),
        );
    }
    hdfs.put("/data/set/sub/last", content(77, 99));
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let run = |url: &str, out: &Path, extra: &[&str]| {
        Command::new(d7y_testkit::bin_path("dfget"))
            .arg(url)
            .arg("-O")
            .arg(out)
            .arg("-e")
            .arg(&daemon.socket)
            .arg("--no-progress")
            .args(extra)
            .output()
            .unwrap()
    };
    let out = tmp.path().join("big.bin");
    let got = run(
        &hdfs.url("/data/big.bin"),
        &out,
        &["--hdfs-delegation-token", "dt-token-123"],
    );
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(std::fs::read(&out).unwrap() == big);
    let dir = tmp.path().join("set");
    let got = run(
        &hdfs.url("/data/set"),
        &dir,
        &["-r", "--hdfs-delegation-token", "dt-token-123"],
    );
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(text(&got).contains("21 files downloaded"), "{}", text(&got));
    assert_eq!(
        std::fs::read(dir.join("sub/last")).unwrap(),
        content(77, 99)
    );
    assert_eq!(
        std::fs::read(dir.join("part-019")).unwrap(),
        content(1019, 39)
    );
    // Without the token: a clear refusal.
    let got = run(&hdfs.url("/data/other"), &tmp.path().join("x"), &[]);
    assert!(!got.status.success());
    assert!(text(&got).contains("hdfs://"), "{}", text(&got));
    assert!(
        !daemon.log().contains("dt-token-123"),
        "the token reached the log"
    );
}

/// The daemon's own cloud identity (its environment) serves this host's users, never a
/// request from the network: a seed peer must not lend strangers its credentials.
#[test]
fn environment_credentials_serve_local_users_only() {
    use dragonfly_api::common::v2::{Download, ObjectStorage};
    use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
    use dragonfly_api::dfdaemon::v2::DownloadTaskRequest;
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::s3s_fs(&tmp.path().join("s3"), AK, SK).unwrap();
    s3.put_objects(
        "bucket",
        &[
            ("a.bin".to_string(), content(5 * MIB, 4)),
            ("b.bin".to_string(), content(5 * MIB, 5)),
        ],
    )
    .unwrap();
    let env = vec![
        ("AWS_ACCESS_KEY_ID".to_string(), AK.to_string()),
        ("AWS_SECRET_ACCESS_KEY".to_string(), SK.to_string()),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
    ];
    let daemon = Daemon::start_opts(
        &tmp.path().join("peer"),
        &DaemonOptions {
            env,
            ..Default::default()
        },
    )
    .unwrap();
    // A local user without keys: the daemon's environment signs.
    let out = tmp.path().join("a.bin");
    let got = Command::new(d7y_testkit::bin_path("dfget"))
        .args(["s3://bucket/a.bin", "-O"])
        .arg(&out)
        .arg("-e")
        .arg(&daemon.socket)
        .args(["--no-progress", "--storage-endpoint", &s3.endpoint])
        .output()
        .unwrap();
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(std::fs::read(&out).unwrap() == content(5 * MIB, 4));
    // The same request from the network: no keys, no environment, refused by the store.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let failure = rt.block_on(async {
        let mut client =
            DfdaemonUploadClient::connect(format!("http://127.0.0.1:{}", daemon.upload_port))
                .await
                .unwrap();
        let request = DownloadTaskRequest {
            download: Some(Download {
                url: "s3://bucket/b.bin".into(),
                object_storage: Some(ObjectStorage {
                    endpoint: Some(s3.endpoint.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        match client.download_task(request).await {
            Err(status) => status.message().to_string(),
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => return String::from("finished"),
                        Err(status) => return status.message().to_string(),
                    }
                }
            }
        }
    });
    assert!(
        failure.contains("403"),
        "a network request used the daemon's credentials: {failure}"
    );
}

/// An object download interrupted by a crash resumes: the second run takes only the
/// pieces the first did not store (read as ranges from the store).
#[test]
fn an_interrupted_object_download_resumes_with_the_missing_ranges_only() {
    let tmp = tempfile::tempdir().unwrap();
    let s3 = S3Server::s3s_fs(&tmp.path().join("s3"), AK, SK).unwrap();
    let data = content(32 * MIB, 12);
    s3.put_objects("bucket", &[("big.bin".to_string(), data.clone())])
        .unwrap();
    // Slow enough to be killed early: 2 MiB/s from the origin, one piece at a time, so
    // pieces are stored every 2 s (with the default eight fetches sharing the limit, all
    // eight pieces of the object would land together at the end). The limit is lifted for
    // the second run.
    let mut daemon = Daemon::start_with(
        &tmp.path().join("peer"),
        "  backToSourceBandwidthLimit: 2MiB\n  backToSourceConcurrentPieceCount: 1\n",
        "",
    )
    .unwrap();
    let out = tmp.path().join("big.bin");
    let mut first = Command::new(d7y_testkit::bin_path("dfget"))
        .args(["s3://bucket/big.bin", "-O"])
        .arg(&out)
        .arg("-e")
        .arg(&daemon.socket)
        .args([
            "--no-progress",
            "--storage-endpoint",
            &s3.endpoint,
            "--storage-access-key-id",
            AK,
            "--storage-access-key-secret",
            SK,
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until some pieces are stored, then crash the daemon. (What the store has sent
    // says little: loopback socket buffers take most of a 32 MiB object at once.)
    let stored = || -> u64 {
        daemon
            .metrics()
            .lines()
            .filter(|l| {
                l.starts_with("dragonfly_dfdaemon_download_piece_total")
                    && l.contains("BACK_TO_SOURCE")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stored() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the download never started: {}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let stored_pieces = stored();
    // Records are committed in batches (storage's COMMIT_INTERVAL, 200 ms): give the ones
    // counted time to become durable, as a crash after that interval would find them.
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(stored() < 8, "the first run finished before the crash");
    daemon.kill();
    let _ = first.wait();
    let after_first = s3.bytes_served();
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(
        &daemon.config,
        config.replace(
            "backToSourceBandwidthLimit: 2MiB",
            "backToSourceBandwidthLimit: 1GiB",
        ),
    )
    .unwrap();
    daemon.restart().unwrap();
    let got = dfget(&daemon, &s3, "s3://bucket/big.bin", &out, &[]);
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(std::fs::read(&out).unwrap() == data);
    // Pieces are 4 MiB: the second run reads only the ranges of the pieces not stored (the
    // count includes response headers: 64 KiB of slack).
    let second = s3.bytes_served() - after_first;
    assert!(
        second <= data.len() as u64 - stored_pieces * 4 * MIB as u64 + 64 * 1024,
        "the store served {second} bytes in the resumed run of a {} byte object of which {stored_pieces} pieces were stored",
        data.len()
    );
}
