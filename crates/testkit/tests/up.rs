//! `dragonfly up`: one command gives a working local cluster.

use d7y_testkit::{bin_path, free_port, Daemon, Origin, OriginOptions};
use rand::RngCore;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn dfget_works_right_after_dragonfly_up_and_goes_through_the_seed_peer() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let socket = dir.path().join("peer.sock");
    // Ports: a free block for the peer (+0..+5) and the seed (+100..+105).
    let base = loop {
        let p = free_port();
        if p < 60000
            && [0, 2, 3, 5, 100, 102, 103, 105]
                .iter()
                .all(|o| std::net::TcpListener::bind(("127.0.0.1", p + o)).is_ok())
        {
            break p;
        }
    };
    let scheduler_port = free_port();
    let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
    let mut up = Command::new(bin_path("dragonfly"))
        .args(["up", "--dir"])
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--base-port",
            &base.to_string(),
            "--scheduler-port",
            &scheduler_port.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            up.try_wait().unwrap().is_none(),
            "dragonfly up exited: {}",
            std::fs::read_to_string(dir.path().join("up.log")).unwrap()
        );
        assert!(Instant::now() < deadline, "peer socket never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    for name in [
        "scheduler.yaml",
        "seed-peer.yaml",
        "peer.yaml",
        "dynconfig.yaml",
    ] {
        assert!(state.join(name).exists(), "{name} was not written");
    }

    let origin = Origin::start(OriginOptions::default());
    let mut data = vec![0u8; 24 * 1024 * 1024];
    rand::thread_rng().fill_bytes(&mut data);
    let url = origin.put("file.bin", data.clone());
    let out = dir.path().join("out.bin");
    let result = Command::new(bin_path("dfget"))
        .arg(&url)
        .arg("-O")
        .arg(&out)
        .arg("-e")
        .arg(&socket)
        .arg("--no-progress")
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&result.stderr),
        std::fs::read_to_string(dir.path().join("up.log")).unwrap()
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // The peer took its pieces from the seed peer, which went to the origin once.
    let metrics = Daemon::http_get(base + 2, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dragonfly_dfdaemon_download_traffic{")
                && l.contains("REMOTE_PEER")
                && !l.ends_with(" 0")),
        "no peer traffic on the peer:\n{metrics}"
    );
    assert!(origin.bytes_served() <= data.len() as u64 + 16);

    // Ctrl-C stops everything.
    Command::new("kill")
        .arg("-INT")
        .arg(up.id().to_string())
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = up.try_wait().unwrap() {
            assert!(status.success(), "dragonfly up exited with {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dragonfly up did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
