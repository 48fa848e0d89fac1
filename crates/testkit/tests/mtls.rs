//! A cluster with mutual TLS on every network port: it downloads through the swarm, and a
//! peer without a certificate, or with one from another CA, or speaking plaintext, is
//! refused at every port (scheduler gRPC, upload gRPC, piece server).

use d7y_net::testing::TestCa;
use d7y_net::{ChannelOptions, ClientTls, TlsFiles};
use d7y_testkit::{content, free_port, Daemon, DaemonOptions, DaemonTls, Origin, Scheduler};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::SyncHostRequest;
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::ListHostsRequest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

fn identity(ca: &TestCa, name: &str) -> DaemonTls {
    let server = ca.leaf(&format!("{name}-server"), &["127.0.0.1"]);
    let client = ca.leaf(&format!("{name}-client"), &["127.0.0.1"]);
    DaemonTls {
        ca_cert: ca.cert_path(),
        server_cert: server.cert.unwrap(),
        server_key: server.key.unwrap(),
        client_cert: client.cert.unwrap(),
        client_key: client.key.unwrap(),
    }
}

/// Whether a gRPC call over `tls` (plaintext when `None`) gets an answer from `addr`.
async fn grpc_answers(addr: &str, tls: Option<Arc<ClientTls>>, scheduler: bool) -> bool {
    let options = ChannelOptions {
        tls,
        connect_timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let Ok(channel) = d7y_net::channel(addr, &options).await else {
        return false;
    };
    let call = async {
        if scheduler {
            SchedulerClient::new(channel)
                .list_hosts(ListHostsRequest { r#type: None })
                .await
                .is_ok()
        } else {
            DfdaemonUploadClient::new(channel)
                .sync_host(SyncHostRequest {
                    host_id: "x".into(),
                    peer_id: String::new(),
                })
                .await
                .is_ok()
        }
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or(false)
}

/// Whether the piece server answers a request over `tls`.
async fn vortex_answers(addr: SocketAddr, tls: Option<&ClientTls>) -> bool {
    let Ok(mut client) =
        d7y_vortex::Client::connect_with(addr, None, Duration::from_secs(3), tls).await
    else {
        return false;
    };
    // Any answer (NotFound for an unknown task) proves the connection was admitted.
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.request_piece(&"a".repeat(64), 0),
    )
    .await
    {
        Ok(Err(e)) => e.is_not_found(),
        Ok(Ok(_)) => true,
        Err(_) => false,
    }
}

#[test]
fn a_cluster_with_mutual_tls_downloads_and_refuses_everyone_else() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("certs"), "cluster");
    let other = TestCa::new(&tmp.path().join("other"), "other");
    let origin = Origin::start(Default::default());

    let scheduler_port = free_port();
    let scheduler_addr = format!("127.0.0.1:{scheduler_port}");
    let seed = Daemon::start_opts(
        &tmp.path().join("seed"),
        &DaemonOptions {
            hostname: Some("seed".into()),
            schedulers: vec![scheduler_addr.clone()],
            seed: true,
            tls: Some(identity(&ca, "seed")),
            ..Default::default()
        },
    )
    .unwrap();
    let scheduler_id = ca.leaf("scheduler", &["127.0.0.1"]);
    let server_yaml = format!(
        "  tls:\n    caCert: {}\n    cert: {}\n    key: {}\n",
        ca.cert_path().display(),
        scheduler_id.cert.as_ref().unwrap().display(),
        scheduler_id.key.as_ref().unwrap().display()
    );
    let scheduler = Scheduler::start_full(
        &tmp.path().join("scheduler"),
        "127.0.0.1",
        scheduler_port,
        &[("127.0.0.1".into(), seed.upload_port)],
        &server_yaml,
        "",
    )
    .unwrap();
    let peers: Vec<Daemon> = (0..2)
        .map(|i| {
            Daemon::start_opts(
                &tmp.path().join(format!("peer{i}")),
                &DaemonOptions {
                    hostname: Some(format!("peer{i}")),
                    schedulers: vec![scheduler_addr.clone()],
                    tls: Some(identity(&ca, &format!("peer{i}"))),
                    ..Default::default()
                },
            )
            .unwrap()
        })
        .collect();

    // Both peers download through the swarm: the seed peer is triggered over TLS, pieces
    // travel over TLS, and the origin serves one copy.
    let size = 24 << 20;
    let data = content(size, 5);
    let url = origin.put("tls.bin", data.clone());
    for (i, peer) in peers.iter().enumerate() {
        let output = tmp.path().join(format!("out{i}"));
        let out = peer.dfget_output(&url, &output, &[]);
        assert!(
            out.status.success(),
            "peer{i}: {}\n--- scheduler\n{}\n--- seed\n{}\n--- peer\n{}",
            String::from_utf8_lossy(&out.stderr),
            scheduler.log(),
            seed.log(),
            peer.log()
        );
        assert!(
            std::fs::read(&output).unwrap() == data,
            "peer{i} output differs"
        );
    }
    let served = origin.bytes_served();
    assert!(
        served <= size as u64 + (1 << 20),
        "the origin served {served} bytes for a {size} byte file: the swarm did not work\n\
         --- scheduler\n{}\n--- seed\n{}\n--- peer0\n{}\n--- peer1\n{}",
        scheduler.log(),
        seed.log(),
        peers[0].log(),
        peers[1].log()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let good = ClientTls::load(ca.leaf("tester", &[]), None).unwrap();
        let anonymous = ClientTls::load(
            TlsFiles {
                ca_cert: Some(ca.cert_path()),
                cert: None,
                key: None,
            },
            None,
        )
        .unwrap();
        let mut foreign_files = other.leaf("tester", &[]);
        foreign_files.ca_cert = Some(ca.cert_path());
        let foreign = ClientTls::load(foreign_files, None).unwrap();

        let upload = format!("127.0.0.1:{}", peers[0].upload_port);
        let seed_upload = format!("127.0.0.1:{}", seed.upload_port);
        let piece: SocketAddr = format!("127.0.0.1:{}", peers[0].piece_port)
            .parse()
            .unwrap();
        let seed_piece: SocketAddr = format!("127.0.0.1:{}", seed.piece_port).parse().unwrap();

        // A client with a certificate of the cluster's CA is served everywhere (the
        // checks below would prove nothing otherwise).
        assert!(grpc_answers(&scheduler_addr, Some(good.clone()), true).await);
        assert!(grpc_answers(&upload, Some(good.clone()), false).await);
        assert!(grpc_answers(&seed_upload, Some(good.clone()), false).await);
        assert!(vortex_answers(piece, Some(&good)).await);
        assert!(vortex_answers(seed_piece, Some(&good)).await);

        for (who, tls) in [
            ("plaintext", None),
            ("no certificate", Some(anonymous.clone())),
            ("another CA", Some(foreign.clone())),
        ] {
            for (port, addr, scheduler) in [
                ("scheduler", &scheduler_addr, true),
                ("peer upload", &upload, false),
                ("seed upload", &seed_upload, false),
            ] {
                assert!(
                    !grpc_answers(addr, tls.clone(), scheduler).await,
                    "{who} was answered on the {port} port"
                );
            }
            for (port, addr) in [("peer piece", piece), ("seed piece", seed_piece)] {
                assert!(
                    !vortex_answers(addr, tls.as_deref()).await,
                    "{who} was answered on the {port} port"
                );
            }
        }
    });
}

/// Whether ListSchedulers over `tls` gets an answer from the manager at `addr`.
async fn manager_answers(addr: &str, tls: Option<Arc<ClientTls>>) -> bool {
    use dragonfly_api::manager::v2::manager_client::ManagerClient;
    use dragonfly_api::manager::v2::ListSchedulersRequest;
    let options = ChannelOptions {
        tls,
        connect_timeout: Some(Duration::from_secs(3)),
        ..Default::default()
    };
    let Ok(channel) = d7y_net::channel(addr, &options).await else {
        return false;
    };
    let mut client = ManagerClient::new(channel);
    let call = client.list_schedulers(ListSchedulersRequest {
        hostname: "tester".into(),
        ip: "127.0.0.1".into(),
        ..Default::default()
    });
    matches!(
        tokio::time::timeout(Duration::from_secs(5), call).await,
        Ok(Ok(_))
    )
}

#[test]
fn a_manager_with_mutual_tls_serves_certificate_holders_only() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&tmp.path().join("certs"), "cluster");
    let other = TestCa::new(&tmp.path().join("other"), "other");
    let manager_id = ca.leaf("manager", &["127.0.0.1"]);
    let tls_yaml = |indent: &str, id: &TlsFiles| {
        format!(
            "{indent}tls:\n{indent}  caCert: {}\n{indent}  cert: {}\n{indent}  key: {}\n",
            ca.cert_path().display(),
            id.cert.as_ref().unwrap().display(),
            id.key.as_ref().unwrap().display()
        )
    };
    let manager = d7y_testkit::Manager::start_full(
        &tmp.path().join("manager"),
        &tls_yaml("    ", &manager_id),
        "",
    )
    .unwrap();
    let scheduler_id = ca.leaf("scheduler", &["127.0.0.1"]);
    let scheduler = Scheduler::start_full(
        &tmp.path().join("scheduler"),
        "127.0.0.1",
        free_port(),
        &[],
        &tls_yaml("  ", &scheduler_id),
        &format!(
            "manager:\n  addr: {}\n  schedulerClusterID: 1\n  keepAlive:\n    interval: 1s\ndynconfig:\n  refreshInterval: 1s\n",
            manager.grpc_addr()
        ),
    )
    .unwrap();
    let seed = Daemon::start_opts(
        &tmp.path().join("seed"),
        &DaemonOptions {
            hostname: Some("seed".into()),
            seed: true,
            manager: Some(manager.grpc_addr()),
            tls: Some(identity(&ca, "seed")),
            ..Default::default()
        },
    )
    .unwrap();
    let token = manager.root_token();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !scheduler
        .log()
        .contains("cluster config from the manager applied")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the scheduler never took its config over TLS:\n{}\n--- manager\n{}",
            scheduler.log(),
            manager.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seeds = manager
        .request("GET", "/api/v1/seed-peers", Some(&token), None)
        .json();
    assert_eq!(
        seeds[0]["state"], "active",
        "the seed peer registered over TLS: {seeds}"
    );

    // A peer that finds its scheduler through the manager over TLS downloads through the
    // swarm.
    let peer = Daemon::start_opts(
        &tmp.path().join("peer"),
        &DaemonOptions {
            hostname: Some("peer".into()),
            manager: Some(manager.grpc_addr()),
            tls: Some(identity(&ca, "peer")),
            ..Default::default()
        },
    )
    .unwrap();
    let origin = Origin::start(Default::default());
    let data = content(12 << 20, 8);
    let url = origin.put("m.bin", data.clone());
    let output = tmp.path().join("out");
    let out = peer.dfget_output(&url, &output, &[]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        peer.log()
    );
    assert!(std::fs::read(&output).unwrap() == data);
    assert!(scheduler
        .metrics()
        .lines()
        .any(|l| l.starts_with("dragonfly_scheduler_register_peer_total") && !l.ends_with(" 0")));
    drop(seed);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let addr = manager.grpc_addr();
        let good = ClientTls::load(ca.leaf("tester", &[]), None).unwrap();
        assert!(manager_answers(&addr, Some(good)).await);
        let anonymous = ClientTls::load(
            TlsFiles {
                ca_cert: Some(ca.cert_path()),
                cert: None,
                key: None,
            },
            None,
        )
        .unwrap();
        let mut foreign_files = other.leaf("tester", &[]);
        foreign_files.ca_cert = Some(ca.cert_path());
        let foreign = ClientTls::load(foreign_files, None).unwrap();
        for (who, tls) in [
            ("plaintext", None),
            ("no certificate", Some(anonymous)),
            ("another CA", Some(foreign)),
        ] {
            assert!(
                !manager_answers(&addr, tls).await,
                "{who} was answered by the manager"
            );
        }
    });
}
