//! The daemon's gRPC surfaces as a remote peer and a local tool see them.

use d7y_testkit::{content, Daemon, Origin, OriginOptions};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::{
    DeleteTaskRequest, ListLocalTasksRequest, StatLocalTaskRequest, SyncHostRequest,
    SyncPiecesRequest,
};
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

#[test]
fn sync_pieces_streams_pieces_while_downloading() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(
        &tmp.path().join("peer"),
        "  backToSourceConcurrentPieceCount: 2\n",
        "",
    )
    .unwrap();
    let origin = Origin::start(OriginOptions {
        range: true,
        rate: Some(16 * MIB as u64),
        ..Default::default()
    });
    let size = 40 * MIB;
    let data = content(size, 3);
    let url = origin.put("s", data.clone());
    let output = tmp.path().join("s");
    let mut dfget = daemon
        .dfget(&url, &output)
        .args(["--piece-length", "4mib"])
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Find the task as soon as the daemon registers it.
        let mut local = daemon.download_client().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let task_id = loop {
            let tasks = local
                .list_local_tasks(ListLocalTasksRequest { remote_ip: None })
                .await
                .unwrap()
                .into_inner()
                .tasks;
            if let Some(task) = tasks.first() {
                break task.task_id.clone();
            }
            assert!(Instant::now() < deadline, "task never appeared");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };

        let mut upload =
            DfdaemonUploadClient::connect(format!("http://127.0.0.1:{}", daemon.upload_port))
                .await
                .unwrap();
        let mut stream = upload
            .sync_pieces(SyncPiecesRequest {
                host_id: "child".into(),
                task_id: task_id.clone(),
                interested_piece_numbers: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        let mut numbers = Vec::new();
        let mut first_while_running = None;
        while let Some(piece) = stream.message().await.unwrap() {
            assert_eq!(piece.ip, "127.0.0.1");
            assert_eq!(piece.tcp_port, Some(daemon.piece_port as i32));
            assert_eq!(piece.offset, piece.number as u64 * 4 * MIB as u64);
            if first_while_running.is_none() {
                first_while_running = Some(dfget.try_wait().unwrap().is_none());
            }
            numbers.push(piece.number);
        }
        numbers.sort();
        assert_eq!(numbers, (0..10).collect::<Vec<u32>>());
        assert_eq!(
            first_while_running,
            Some(true),
            "the first piece must be announced before the download ends"
        );
        assert!(dfget.wait().unwrap().success(), "{}", daemon.log());
        assert_eq!(std::fs::read(&output).unwrap(), data);

        // Only some pieces: the stream ends once those were sent.
        let mut stream = upload
            .sync_pieces(SyncPiecesRequest {
                host_id: "child".into(),
                task_id: task_id.clone(),
                interested_piece_numbers: vec![3, 7],
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = Vec::new();
        while let Some(piece) = stream.message().await.unwrap() {
            got.push(piece.number);
        }
        got.sort();
        assert_eq!(got, vec![3, 7]);

        // Unknown task: NotFound, not an empty stream.
        let err = upload
            .sync_pieces(SyncPiecesRequest {
                host_id: "child".into(),
                task_id: "e".repeat(64),
                interested_piece_numbers: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);

        // SyncHost reports this host with its ports and bandwidth.
        let mut hosts = upload
            .sync_host(SyncHostRequest {
                host_id: "child".into(),
                peer_id: "p".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let host = hosts.message().await.unwrap().unwrap();
        assert_eq!(host.ip, "127.0.0.1");
        assert_eq!(host.download_port, daemon.piece_port as i32);
        assert!(host.network.unwrap().max_tx_bandwidth > 0);

        // Stat, then delete.
        let stat = local
            .stat_local_task(StatLocalTaskRequest {
                task_id: task_id.clone(),
                remote_ip: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stat.content_length, Some(size as u64));
        assert!(stat.finished_at.is_some());
        local
            .delete_task(DeleteTaskRequest {
                task_id: task_id.clone(),
                remote_ip: None,
            })
            .await
            .unwrap();
        let err = local
            .stat_local_task(StatLocalTaskRequest {
                task_id,
                remote_ip: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    });
}

#[test]
fn back_to_source_bandwidth_limit_is_enforced() {
    let tmp = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(
        &tmp.path().join("peer"),
        "  backToSourceBandwidthLimit: 4MiB\n",
        "",
    )
    .unwrap();
    let origin = Origin::start(OriginOptions::default());
    let size = 10 * MIB;
    let data = content(size, 9);
    let url = origin.put("slow", data.clone());
    let output = tmp.path().join("slow");
    let started = Instant::now();
    let out = daemon.dfget_output(&url, &output, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let elapsed = started.elapsed();
    // 10 MiB at 4 MiB/s with a 0.4 MiB head start: at least ~2.4 s.
    assert!(
        elapsed >= Duration::from_millis(2200),
        "took only {elapsed:?}"
    );
    assert_eq!(std::fs::read(&output).unwrap(), data);
}

#[test]
fn the_piece_servers_congestion_control_is_applied_or_start_up_says_what_to_load() {
    let tmp = tempfile::tempdir().unwrap();
    let options = |cc: &str| d7y_testkit::DaemonOptions {
        piece_server_yaml: format!("    tcpCongestionControl: {cc}\n"),
        ..Default::default()
    };
    let err = Daemon::start_opts(&tmp.path().join("missing"), &options("nosuchcc"))
        .err()
        .expect("a congestion control the kernel lacks stops start-up")
        .to_string();
    assert!(
        err.contains("tcpCongestionControl \"nosuchcc\"") && err.contains("modprobe"),
        "{err}"
    );
    // reno is built into every Linux kernel (this machine's default is another).
    let daemon = Daemon::start_opts(&tmp.path().join("reno"), &options("reno")).unwrap();
    let _conn = std::net::TcpStream::connect(("127.0.0.1", daemon.piece_port)).unwrap();
    // The daemon's end of the connection, as the kernel reports it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = std::process::Command::new("ss")
            .args(["-tni", "state", "established"])
            .arg(format!("( sport = :{} )", daemon.piece_port))
            .output()
            .expect("ss (iproute2)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains(" reno ") || text.contains("\treno ") {
            break;
        }
        assert!(Instant::now() < deadline, "no reno connection in:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
