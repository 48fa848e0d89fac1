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
    // Ports: a free block for the peer (+0..+5) and the seed (+100..+105), and a scheduler
    // port (and its metrics port, +1000) outside both blocks.
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let base = loop {
        let p = free_port();
        if p < 60000 && (0..6).chain(100..106).all(|o| free(p + o)) {
            break p;
        }
    };
    let taken = |p: u16| (base..base + 6).contains(&p) || (base + 100..base + 106).contains(&p);
    let scheduler_port = loop {
        let p = free_port();
        if p < 64000 && !taken(p) && !taken(p + 1000) && free(p + 1000) {
            break p;
        }
    };
    let pick = |used: &[u16]| loop {
        let p = free_port();
        if !taken(p) && !used.contains(&p) && p != scheduler_port + 1000 {
            break p;
        }
    };
    let manager_port = pick(&[scheduler_port]);
    let manager_grpc_port = pick(&[scheduler_port, manager_port]);
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
            "--manager-port",
            &manager_port.to_string(),
            "--manager-grpc-port",
            &manager_grpc_port.to_string(),
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
        "manager.yaml",
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

    // The manager answers with the root password `up` printed, and knows the scheduler
    // and the seed peer, which registered with it.
    let mut banner = String::new();
    {
        use std::io::BufRead;
        let stdout = up.stdout.take().unwrap();
        for line in std::io::BufReader::new(stdout).lines().take(5) {
            banner.push_str(&line.unwrap());
            banner.push('\n');
        }
    }
    let password = banner
        .split("password ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no password in: {banner}"))
        .to_string();
    assert!(
        banner.contains(&format!("http://127.0.0.1:{manager_port}")),
        "{banner}"
    );
    let signin = d7y_testkit::manager::http(
        manager_port,
        "POST",
        "/api/v1/users/signin",
        None,
        Some(&format!(r#"{{"name":"root","password":"{password}"}}"#)),
    )
    .unwrap();
    assert_eq!(signin.status, 200, "{}", signin.body);
    let token = signin.json()["token"].as_str().unwrap().to_string();
    for path in ["/api/v1/schedulers", "/api/v1/seed-peers"] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let a =
                d7y_testkit::manager::http(manager_port, "GET", path, Some(&token), None).unwrap();
            if a.json()
                .as_array()
                .is_some_and(|l| l.iter().any(|c| c["state"] == "active"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nothing active at {path}: {}",
                a.body
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

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
