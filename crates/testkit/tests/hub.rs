//! Model hubs as origins, against a fake Hugging Face Hub on 127.0.0.1 (model info with
//! siblings, resolve with redirects to a CDN host, LFS files, a gated repo): `dfget -r
//! hf://...`, single files, tokens, and the real `huggingface_hub` client
//! (`snapshot_download`) with `HF_ENDPOINT` at the proxy, its files through the swarm.

use d7y_testkit::hub::FakeHub;
use d7y_testkit::{content, Daemon, DaemonOptions, Swarm};
use std::path::Path;
use std::process::{Command, Output};

const MIB: usize = 1024 * 1024;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn dfget(daemon: &Daemon, url: &str, out: &Path, extra: &[&str]) -> Output {
    Command::new(d7y_testkit::bin_path("dfget"))
        .arg(url)
        .arg("-O")
        .arg(out)
        .arg("-e")
        .arg(&daemon.socket)
        .arg("--no-progress")
        .args(extra)
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .output()
        .unwrap()
}

fn model_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("config.json".into(), b"{\"model_type\":\"test\"}".to_vec()),
        ("tokenizer/vocab.json".into(), content(20_000, 1)),
        (
            "model-00001-of-00002.safetensors".into(),
            content(6 * MIB + 17, 2),
        ),
        (
            "model-00002-of-00002.safetensors".into(),
            content(5 * MIB + 3, 3),
        ),
    ]
}

#[test]
fn dfget_takes_hub_repos_files_and_gated_repos_with_their_token() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = FakeHub::start();
    hub.add_repo("org/model", model_files(), None);
    hub.add_repo(
        "org/gated",
        vec![("weights.bin".into(), content(5 * MIB, 9))],
        Some("hf_right"),
    );
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let base = hub.endpoint();

    let dir = tmp.path().join("model");
    let got = dfget(
        &daemon,
        "hf://org/model",
        &dir,
        &["-r", "--hf-base-url", &base],
    );
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(text(&got).contains("4 files downloaded"), "{}", text(&got));
    for (name, data) in model_files() {
        assert!(
            std::fs::read(dir.join(&name)).unwrap() == data,
            "{name} differs"
        );
    }
    // One file, and a directory inside the repo.
    let one = tmp.path().join("config.json");
    let got = dfget(
        &daemon,
        "hf://org/model/config.json",
        &one,
        &["--hf-base-url", &base],
    );
    assert!(got.status.success(), "{}", text(&got));
    assert_eq!(std::fs::read(&one).unwrap(), model_files()[0].1);
    let sub = tmp.path().join("tok");
    let got = dfget(
        &daemon,
        "hf://org/model/tokenizer",
        &sub,
        &["-r", "--hf-base-url", &base],
    );
    assert!(got.status.success(), "{}", text(&got));
    assert!(sub.join("vocab.json").exists());

    // A gated repo: no token 401, a wrong one 403, the right one works.
    for (token, code) in [(None, "401"), (Some("hf_wrong"), "403")] {
        let mut extra = vec!["--hf-base-url", base.as_str()];
        if let Some(t) = token {
            extra.extend(["--hf-token", t]);
        }
        let out = tmp.path().join(format!("gated-{code}"));
        let got = dfget(&daemon, "hf://org/gated/weights.bin", &out, &extra);
        assert_eq!(got.status.code(), Some(4), "{}", text(&got));
        assert!(text(&got).contains(code), "{}", text(&got));
        assert!(
            !text(&got).contains("hf_wrong"),
            "the token is in the message: {}",
            text(&got)
        );
        assert!(!out.exists());
    }
    let out = tmp.path().join("gated");
    let got = dfget(
        &daemon,
        "hf://org/gated/weights.bin",
        &out,
        &["--hf-base-url", &base, "--hf-token", "hf_right"],
    );
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    assert!(std::fs::read(&out).unwrap() == content(5 * MIB, 9));
    assert!(
        !daemon.log().contains("hf_right"),
        "the token reached the log"
    );
    assert_eq!(hub.cdn_authorized(), 0, "a token was sent to the CDN");

    // ModelScope: the same repo through its paths.
    let ms = tmp.path().join("ms");
    let got = dfget(
        &daemon,
        "modelscope://org/model",
        &ms,
        &["-r", "--ms-base-url", &base],
    );
    assert!(got.status.success(), "{}\n{}", text(&got), daemon.log());
    for (name, data) in model_files() {
        assert!(
            std::fs::read(ms.join(&name)).unwrap() == data,
            "modelscope {name} differs"
        );
    }
}

#[test]
fn huggingface_hub_downloads_a_repo_through_the_proxy_and_the_swarm() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = FakeHub::start();
    hub.add_repo("org/model", model_files(), None);
    let hub_url = hub.endpoint();
    // Every peer mirrors the hub; file downloads (resolve) go through the swarm, the
    // hub's API passes through.
    let swarm = Swarm::start_custom(2, |_| DaemonOptions {
        proxy_yaml: format!(
            "  registryMirror:\n    addr: {hub_url}\n  rules:\n    - regex: '/resolve/'\n"
        ),
        ..Default::default()
    });
    let lfs_total: u64 = model_files()
        .iter()
        .filter(|(_, d)| d.len() >= d7y_testkit::hub::LFS_THRESHOLD)
        .map(|(_, d)| d.len() as u64)
        .sum();
    for (i, peer) in swarm.peers.iter().enumerate() {
        let cache = tmp.path().join(format!("hf-cache{i}"));
        let out = Command::new("python3")
            .args([
                "-c",
                "import sys\nfrom huggingface_hub import snapshot_download\nprint(snapshot_download('org/model', cache_dir=sys.argv[1]))",
            ])
            .arg(&cache)
            .env("HF_ENDPOINT", format!("http://127.0.0.1:{}", peer.proxy_port))
            .env("HF_HUB_DISABLE_XET", "1")
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env("HF_HUB_ETAG_TIMEOUT", "30")
            .env("HF_HUB_DOWNLOAD_TIMEOUT", "60")
            .env_remove("HF_TOKEN")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}\n{}", text(&out), peer.log());
        let snapshot =
            std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        for (name, data) in model_files() {
            let got = std::fs::read(snapshot.join(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(got == data, "{name} differs on peer {i}");
        }
    }
    // The LFS files left the CDN once (the seed peer's copy), though both hosts took them.
    let cdn = hub.cdn_bytes();
    assert!(
        cdn >= lfs_total && cdn <= lfs_total + 64 * 1024,
        "the CDN served {cdn} bytes for {lfs_total} bytes of LFS files"
    );
    // The hub answered the API (model info) itself, through the proxies.
    assert!(hub.api_requests() >= 2);
    let via: f64 = swarm
        .peers
        .iter()
        .map(|p| {
            d7y_testkit::Daemon::http_get(p.metrics_port, "/metrics")
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("dragonfly_dfdaemon_proxy_request_via_dfdaemon_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum();
    assert!(
        via >= 4.0,
        "the files did not go through the swarm ({via} requests)"
    );
}
