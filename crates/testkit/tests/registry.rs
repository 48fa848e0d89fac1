//! Image pulls through dfdaemon with real software: CNCF distribution as the registry,
//! containerd pulling through the hosts.toml dfinit wrote, skopeo through a registries.conf
//! mirror and through the forward proxy with HTTPS interception.

use d7y_testkit::rigs::{
    dfinit, ensure_host_alias, skopeo_copy, Containerd, Registry, RegistryOptions, TestImage,
};
use d7y_testkit::{Daemon, DaemonOptions, Swarm};
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

fn metric(daemon: &Daemon, name: &str) -> f64 {
    let out = Command::new("curl")
        .args([
            "-s",
            &format!("http://127.0.0.1:{}/metrics", daemon.metrics_port),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn via_dfdaemon(daemon: &Daemon) -> f64 {
    metric(
        daemon,
        "dragonfly_dfdaemon_proxy_request_via_dfdaemon_total",
    )
}

/// dfinit for containerd: a hosts.toml for `registry` sending pulls to `daemon`'s proxy.
fn dfinit_containerd(dir: &Path, ctd: &Containerd, daemon: &Daemon, registry: &str) {
    let yaml = format!(
        "proxy:\n  addr: http://127.0.0.1:{}\ncontainerRuntime:\n  containerd:\n    configPath: {}\n    registries:\n      - hostNamespace: {registry}\n        serverAddr: http://{registry}\n",
        daemon.proxy_port,
        ctd.config.display()
    );
    let first = text(&dfinit(dir, &yaml, &[]).unwrap());
    assert!(
        first.contains("wrote") && first.contains("hosts.toml"),
        "{first}"
    );
    let second = text(&dfinit(dir, &yaml, &[]).unwrap());
    assert!(
        !second.contains("wrote") && second.contains("unchanged"),
        "a second run changes nothing: {second}"
    );
}

/// dfinit for Podman/CRI-O: a registries.conf that mirrors `registry` at `daemon`'s proxy.
fn dfinit_registries_conf(dir: &Path, daemon: &Daemon, registry: &str) -> std::path::PathBuf {
    let conf = dir.join("registries.conf");
    let yaml = format!(
        "proxy:\n  addr: http://127.0.0.1:{}\ncontainerRuntime:\n  podman:\n    configPath: {}\n    unqualifiedSearchRegistries: ['{registry}']\n    registries:\n      - prefix: '{registry}'\n        location: '{registry}'\n",
        daemon.proxy_port,
        conf.display()
    );
    dfinit(dir, &yaml, &[]).unwrap();
    assert!(text(&dfinit(dir, &yaml, &[]).unwrap()).contains("unchanged"));
    conf
}

#[test]
fn three_hosts_pull_one_image_and_the_registry_serves_each_blob_once() {
    let tmp = tempfile::tempdir().unwrap();
    let registry =
        Registry::start(&tmp.path().join("registry"), RegistryOptions::default()).unwrap();
    let image = TestImage::write(
        &tmp.path().join("img"),
        "v1",
        &[12 * MIB, 9 * MIB, 6 * MIB],
        1,
    );
    registry.push(&image, "127.0.0.1", "test/img", None);
    let reg = registry.host("127.0.0.1");
    // CRI-O and Podman name no registry per request: each daemon mirrors this one.
    let swarm = Swarm::start_custom(3, |_| DaemonOptions {
        proxy_yaml: format!("  registryMirror:\n    addr: http://{reg}\n"),
        ..Default::default()
    });
    let ctd = Containerd::start(&tmp.path().join("containerd")).unwrap();
    dfinit_containerd(&tmp.path().join("dfinit0"), &ctd, &swarm.peers[0], &reg);
    let confs: Vec<_> = (1..3)
        .map(|i| {
            dfinit_registries_conf(
                &tmp.path().join(format!("dfinit{i}")),
                &swarm.peers[i],
                &reg,
            )
        })
        .collect();

    let reference = format!("{reg}/test/img:v1");
    std::thread::scope(|s| {
        let containerd = s.spawn(|| ctd.pull(&reference, None));
        let skopeos: Vec<_> = confs
            .iter()
            .enumerate()
            .map(|(i, conf)| {
                let dest = tmp.path().join(format!("out{i}"));
                let source = format!("docker://{reference}");
                s.spawn(move || {
                    let conf = conf.display().to_string();
                    let out = skopeo_copy(
                        &source,
                        &dest,
                        &["--registries-conf", &conf],
                        &["--src-tls-verify=false"],
                        &[],
                    );
                    (out, dest)
                })
            })
            .collect();
        let pulled = containerd.join().unwrap();
        assert!(
            pulled.status.success(),
            "ctr pull: {}\n{}",
            text(&pulled),
            ctd.log()
        );
        for skopeo in skopeos {
            let (out, dest) = skopeo.join().unwrap();
            assert!(out.status.success(), "skopeo: {}", text(&out));
            assert!(image.same_blobs_as(&dest), "skopeo's copy differs");
        }
    });

    for (i, peer) in swarm.peers.iter().enumerate() {
        assert!(
            via_dfdaemon(peer) >= image.blobs().len() as f64,
            "peer {i} did not take the blobs through its proxy"
        );
    }
    let egress = registry.blob_egress();
    for (digest, size) in &image.layers {
        let sent = egress.get(digest).copied().unwrap_or(0);
        assert!(
            sent <= size + 16,
            "the registry sent {sent} bytes of {digest} ({size} bytes) to three hosts\n{}",
            swarm.logs()
        );
    }
}

#[test]
fn a_registry_with_auth_works_through_the_mirror_with_the_clients_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let registry = Registry::start(
        &tmp.path().join("registry"),
        RegistryOptions {
            htpasswd: Some(("alice".into(), "secret".into())),
            ..Default::default()
        },
    )
    .unwrap();
    let image = TestImage::write(&tmp.path().join("img"), "v1", &[6 * MIB, 5 * MIB], 2);
    registry.push(&image, "127.0.0.1", "test/private", None);
    let reg = registry.host("127.0.0.1");
    let daemon = Daemon::start(&tmp.path().join("peer"), "").unwrap();
    let ctd = Containerd::start(&tmp.path().join("containerd")).unwrap();
    dfinit_containerd(&tmp.path().join("dfinit"), &ctd, &daemon, &reg);

    // Without credentials the registry's 401 and its challenge reach the client unchanged.
    let (layer, _) = &image.layers[0];
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-o", "/dev/null", "-H"])
        .arg(format!("X-Dragonfly-Registry: http://{reg}"))
        .arg(format!(
            "http://127.0.0.1:{}/v2/test/private/blobs/{layer}",
            daemon.proxy_port
        ))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(
        head.contains("www-authenticate: basic realm=\"test\""),
        "{head}"
    );
    let reference = format!("{reg}/test/private:v1");
    let refused = ctd.pull(&reference, None);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("401"), "{}", text(&refused));

    let pulled = ctd.pull(&reference, Some("alice:secret"));
    assert!(pulled.status.success(), "{}", text(&pulled));
    assert!(via_dfdaemon(&daemon) >= image.layers.len() as f64);
    let egress = registry.blob_egress();
    for (digest, size) in &image.layers {
        assert!(egress.get(digest).copied().unwrap_or(0) <= size + 16);
    }
}

#[test]
fn a_corrupted_blob_fails_the_pull_and_no_peer_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let registry =
        Registry::start(&tmp.path().join("registry"), RegistryOptions::default()).unwrap();
    let image = TestImage::write(&tmp.path().join("img"), "v1", &[8 * MIB, 6 * MIB], 3);
    registry.push(&image, "127.0.0.1", "test/bad", None);
    let (bad, _) = image.layers[0].clone();
    registry.corrupt_blob(&bad);
    let reg = registry.host("127.0.0.1");
    let swarm = Swarm::start_custom(2, |_| DaemonOptions {
        proxy_yaml: format!("  registryMirror:\n    addr: http://{reg}\n"),
        ..Default::default()
    });
    let ctd = Containerd::start(&tmp.path().join("containerd")).unwrap();
    dfinit_containerd(&tmp.path().join("dfinit0"), &ctd, &swarm.peers[0], &reg);
    let conf = dfinit_registries_conf(&tmp.path().join("dfinit1"), &swarm.peers[1], &reg);

    let reference = format!("{reg}/test/bad:v1");
    // The proxy cuts the body short (the client sees a broken transfer, never a clean end
    // of wrong bytes); the daemon says why.
    let pulled = ctd.pull(&reference, None);
    assert!(
        !pulled.status.success(),
        "containerd accepted a corrupted layer"
    );
    assert!(text(&pulled).contains("EOF"), "{}", text(&pulled));
    assert!(
        swarm.peers[0].log().contains("does not match its digest"),
        "{}",
        swarm.peers[0].log()
    );
    let copied = skopeo_copy(
        &format!("docker://{reference}"),
        &tmp.path().join("out"),
        &["--registries-conf", &conf.display().to_string()],
        &["--src-tls-verify=false"],
        &[],
    );
    assert!(
        !copied.status.success(),
        "skopeo accepted a corrupted layer"
    );

    let hex = bad.trim_start_matches("sha256:");
    for daemon in std::iter::once(&swarm.seed).chain(&swarm.peers) {
        assert!(
            !daemon.content_path(hex).exists(),
            "{} kept the corrupted blob",
            daemon.dir.display()
        );
    }
}

#[test]
fn skopeo_pulls_through_the_forward_proxy_with_https_interception() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "d7y-registry.test";
    ensure_host_alias(name).unwrap();
    let ca = d7y_net::testing::TestCa::new(&tmp.path().join("certs"), "registry");
    let leaf = ca.leaf("server", &[name]);
    let registry = Registry::start(
        &tmp.path().join("registry"),
        RegistryOptions {
            tls: Some((leaf.cert.clone().unwrap(), leaf.key.clone().unwrap())),
            ..Default::default()
        },
    )
    .unwrap();
    // skopeo trusts the *.crt files of a directory.
    let registry_ca_dir = tmp.path().join("registry-ca");
    std::fs::create_dir_all(&registry_ca_dir).unwrap();
    std::fs::copy(ca.cert_path(), registry_ca_dir.join("ca.crt")).unwrap();
    let image = TestImage::write(&tmp.path().join("img"), "v1", &[7 * MIB, 5 * MIB], 4);
    registry.push(&image, name, "test/tls", Some(&registry_ca_dir));
    let host = registry.host(name);
    let daemon = Daemon::start_opts(
        &tmp.path().join("peer"),
        &DaemonOptions {
            proxy_yaml: format!(
                "  registryMirror:\n    cert: {}\n  hijackHTTPS:\n    hosts:\n      - regx: '^d7y-registry\\.test:{}$'\n",
                ca.cert_path().display(),
                registry.port
            ),
            ..Default::default()
        },
    )
    .unwrap();
    let proxy = format!("http://127.0.0.1:{}", daemon.proxy_port);
    let source = format!("docker://{host}/test/tls:v1");

    // A client that does not trust the proxy's CA is not served behind its back.
    let untrusting = skopeo_copy(
        &source,
        &tmp.path().join("refused"),
        &[],
        &["--src-cert-dir", &registry_ca_dir.display().to_string()],
        &[("HTTPS_PROXY", &proxy)],
    );
    assert!(!untrusting.status.success());
    assert!(
        text(&untrusting).contains("certificate"),
        "{}",
        text(&untrusting)
    );

    let proxy_ca_dir = tmp.path().join("proxy-ca");
    std::fs::create_dir_all(&proxy_ca_dir).unwrap();
    std::fs::copy(
        daemon.data_dir().join("proxy-ca/ca.crt"),
        proxy_ca_dir.join("ca.crt"),
    )
    .expect("the generated interception CA is written where the user can install it");
    let out = skopeo_copy(
        &source,
        &tmp.path().join("out"),
        &[],
        &["--src-cert-dir", &proxy_ca_dir.display().to_string()],
        &[("HTTPS_PROXY", &proxy)],
    );
    assert!(
        out.status.success(),
        "skopeo: {}\n{}",
        text(&out),
        daemon.log()
    );
    assert!(image.same_blobs_as(&tmp.path().join("out")));
    assert!(via_dfdaemon(&daemon) >= image.blobs().len() as f64);
    for (digest, _) in &image.layers {
        assert!(
            daemon
                .content_path(digest.trim_start_matches("sha256:"))
                .exists(),
            "{digest} did not go through a task"
        );
    }
}
