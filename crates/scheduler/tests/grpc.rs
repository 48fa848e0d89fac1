//! The scheduler's gRPC surface, in process on loopback: every announce request and response
//! kind, the unary RPCs, priorities, misbehaving clients and GC.

use d7y_config::scheduler::Config;
use dragonfly_api::common::v2::{Download, Host, Peer, Piece, Priority};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Event;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as Reply;
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::*;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

struct Server {
    addr: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(extra: &str) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = Config::from_yaml(&format!(
        "metrics:\n  enable: false\nscheduler:\n  retryInterval: 50ms\n{extra}"
    ))
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        d7y_scheduler::serve(config, listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Server { addr, _stop: stop }
}

async fn client(server: &Server) -> SchedulerClient<Channel> {
    SchedulerClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap()
}

fn host(id: &str, seed: bool) -> Host {
    Host {
        id: id.into(),
        r#type: seed as u32,
        hostname: id.into(),
        ip: "127.0.0.1".into(),
        port: 4000,
        download_port: 4005,
        ..Default::default()
    }
}

async fn announce_host(c: &mut SchedulerClient<Channel>, id: &str, seed: bool) {
    c.announce_host(AnnounceHostRequest {
        host: Some(host(id, seed)),
        interval: None,
    })
    .await
    .unwrap();
}

fn download(len: u64, priority: Priority) -> Download {
    Download {
        url: "http://origin/file".into(),
        priority: priority as i32,
        actual_content_length: Some(len),
        actual_piece_length: Some(4 << 20),
        ..Default::default()
    }
}

/// One peer's announce stream.
struct Stream {
    tx: mpsc::Sender<AnnouncePeerRequest>,
    rx: tonic::Streaming<AnnouncePeerResponse>,
    host: String,
    task: String,
    peer: String,
}

impl Stream {
    async fn open(c: &mut SchedulerClient<Channel>, host: &str, task: &str, peer: &str) -> Stream {
        let (tx, rx) = mpsc::channel(64);
        let rx = c
            .announce_peer(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Stream {
            tx,
            rx,
            host: host.into(),
            task: task.into(),
            peer: peer.into(),
        }
    }

    async fn send(&self, event: Event) {
        self.tx
            .send(AnnouncePeerRequest {
                host_id: self.host.clone(),
                task_id: self.task.clone(),
                peer_id: self.peer.clone(),
                request: Some(event),
            })
            .await
            .unwrap();
    }

    async fn register(&self, download: Download) {
        self.send(Event::RegisterPeerRequest(RegisterPeerRequest {
            download: Some(download),
        }))
        .await;
    }

    async fn next(&mut self) -> Result<Reply, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(5), self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m.response.expect("a response")),
            Ok(Ok(None)) => Err(tonic::Status::aborted("stream ended")),
            Ok(Err(s)) => Err(s),
            Err(_) => panic!("no answer within 5s"),
        }
    }

    async fn piece_from_source(&self, number: u32) {
        self.send(Event::DownloadPieceBackToSourceFinishedRequest(
            DownloadPieceBackToSourceFinishedRequest {
                piece: Some(Piece {
                    number,
                    length: 4 << 20,
                    digest: format!("crc32:{number}"),
                    ..Default::default()
                }),
            },
        ))
        .await;
    }
}

#[tokio::test]
async fn hosts_are_announced_listed_filtered_and_deleted() {
    let server = start("").await;
    let mut c = client(&server).await;
    announce_host(&mut c, "a", false).await;
    announce_host(&mut c, "s", true).await;
    let all = c
        .list_hosts(ListHostsRequest { r#type: None })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.hosts.len(), 2);
    let seeds = c
        .list_hosts(ListHostsRequest { r#type: Some(1) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        seeds
            .hosts
            .iter()
            .map(|h| h.id.as_str())
            .collect::<Vec<_>>(),
        ["s"]
    );
    c.delete_host(DeleteHostRequest {
        host_id: "a".into(),
    })
    .await
    .unwrap();
    let err = c
        .delete_host(DeleteHostRequest {
            host_id: "a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = c
        .announce_host(AnnounceHostRequest {
            host: None,
            interval: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn back_to_source_then_a_second_peer_gets_the_first_as_parent() {
    let server = start("").await;
    let mut c = client(&server).await;
    announce_host(&mut c, "ha", false).await;
    announce_host(&mut c, "hb", false).await;

    // No seed peer configured, nobody has the task: the first peer goes to the origin.
    let mut a = Stream::open(&mut c, "ha", "t", "pa").await;
    a.register(download(8 << 20, Priority::Level6)).await;
    assert!(matches!(
        a.next().await.unwrap(),
        Reply::NeedBackToSourceResponse(_)
    ));
    a.send(Event::DownloadPeerBackToSourceStartedRequest(
        DownloadPeerBackToSourceStartedRequest { description: None },
    ))
    .await;
    a.piece_from_source(0).await;

    // The second peer is given the first, which holds a piece it lacks.
    let mut b = Stream::open(&mut c, "hb", "t", "pb").await;
    b.register(download(8 << 20, Priority::Level6)).await;
    match b.next().await.unwrap() {
        Reply::NormalTaskResponse(r) => {
            let ids: Vec<&str> = r.candidate_parents.iter().map(|p| p.id.as_str()).collect();
            assert_eq!(ids, ["pa"]);
            let parent = &r.candidate_parents[0];
            assert_eq!(parent.host.as_ref().unwrap().download_port, 4005);
            assert_eq!(parent.task.as_ref().unwrap().content_length, 8 << 20);
        }
        other => panic!("expected parents, got {other:?}"),
    }
    b.send(Event::DownloadPeerStartedRequest(
        DownloadPeerStartedRequest {},
    ))
    .await;
    b.send(Event::DownloadPieceFinishedRequest(
        DownloadPieceFinishedRequest {
            piece: Some(Piece {
                number: 0,
                parent_id: Some("pa".into()),
                length: 4 << 20,
                ..Default::default()
            }),
        },
    ))
    .await;

    // A refresh is answered with a (possibly identical) parent set, not counted as failure.
    b.send(Event::ReschedulePeerRequest(ReschedulePeerRequest {
        candidate_parents: vec![],
        description: Some("refresh".into()),
    }))
    .await;
    assert!(matches!(
        b.next().await.unwrap(),
        Reply::NormalTaskResponse(_)
    ));

    // b reports pa as failing: pa is blocklisted, nobody else has the task, so after the
    // retry limit b is sent back to source.
    b.send(Event::ReschedulePeerRequest(ReschedulePeerRequest {
        candidate_parents: vec![Peer {
            id: "pa".into(),
            ..Default::default()
        }],
        description: Some("parent failed".into()),
    }))
    .await;
    match b.next().await.unwrap() {
        Reply::NeedBackToSourceResponse(r) => {
            assert!(r.description.unwrap().contains("no parent"));
        }
        other => panic!("expected back-to-source, got {other:?}"),
    }

    // Stat and the peer/task lifecycle.
    a.piece_from_source(1).await;
    a.send(Event::DownloadPeerBackToSourceFinishedRequest(
        DownloadPeerBackToSourceFinishedRequest {},
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let peer = c
        .stat_peer(StatPeerRequest {
            host_id: "ha".into(),
            task_id: "t".into(),
            peer_id: "pa".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(peer.state, "Succeeded");
    assert_eq!(peer.pieces.len(), 2);
    let task = c
        .stat_task(StatTaskRequest {
            host_id: "ha".into(),
            task_id: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.peer_count, 2);
    assert!(task.has_available_peer);
    assert_eq!(task.piece_count, 2);

    // A finished peer whose stream closes stays a parent; one that vanishes mid-download
    // is removed.
    drop(a);
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(c
        .stat_peer(StatPeerRequest {
            host_id: "ha".into(),
            task_id: "t".into(),
            peer_id: "pa".into(),
        })
        .await
        .is_ok());
    let err = c
        .stat_peer(StatPeerRequest {
            host_id: "hb".into(),
            task_id: "t".into(),
            peer_id: "pb".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    c.delete_peer(DeletePeerRequest {
        host_id: "ha".into(),
        task_id: "t".into(),
        peer_id: "pa".into(),
    })
    .await
    .unwrap();
    let err = c
        .delete_task(DeleteTaskRequest {
            host_id: "ha".into(),
            task_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn priorities_empty_tasks_and_metadata_only() {
    let server = start("  retryLimit: 3\n  retryBackToSourceLimit: 2\n").await;
    let mut c = client(&server).await;
    announce_host(&mut c, "h", false).await;

    let mut s = Stream::open(&mut c, "h", "t1", "p1").await;
    s.register(download(8 << 20, Priority::Level1)).await;
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("LEVEL1"));

    let mut s = Stream::open(&mut c, "h", "t2", "p2").await;
    s.register(download(8 << 20, Priority::Level3)).await;
    assert!(matches!(
        s.next().await.unwrap(),
        Reply::NeedBackToSourceResponse(_)
    ));

    // LEVEL2: never back to source on a first download; with nobody to give, it fails.
    let mut s = Stream::open(&mut c, "h", "t3", "p3").await;
    s.register(download(8 << 20, Priority::Level2)).await;
    let err = s.next().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let mut s = Stream::open(&mut c, "h", "t4", "p4").await;
    s.register(download(0, Priority::Level6)).await;
    assert!(matches!(
        s.next().await.unwrap(),
        Reply::EmptyTaskResponse(_)
    ));

    let mut s = Stream::open(&mut c, "h", "t5", "p5").await;
    let mut d = download(8 << 20, Priority::Level6);
    d.metadata_only = true;
    s.register(d).await;
    assert!(matches!(
        s.next().await.unwrap(),
        Reply::MetadataOnlyResponse(_)
    ));

    // disable_back_to_source with nobody to give: fails instead of back-to-source.
    let mut s = Stream::open(&mut c, "h", "t6", "p6").await;
    let mut d = download(8 << 20, Priority::Level6);
    d.disable_back_to_source = true;
    s.register(d).await;
    assert_eq!(
        s.next().await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
}

#[tokio::test]
async fn misbehaving_clients_are_cut_off_and_the_scheduler_keeps_serving() {
    let server = start("").await;
    let mut c = client(&server).await;
    announce_host(&mut c, "h", false).await;

    // Unknown host.
    let mut s = Stream::open(&mut c, "ghost", "t", "p").await;
    s.register(download(8 << 20, Priority::Level6)).await;
    assert_eq!(s.next().await.unwrap_err().code(), tonic::Code::NotFound);

    // An event before registering.
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.send(Event::DownloadPeerStartedRequest(
        DownloadPeerStartedRequest {},
    ))
    .await;
    assert_eq!(
        s.next().await.unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );

    // Missing ids and an empty request.
    let mut s = Stream::open(&mut c, "", "t", "p").await;
    s.register(download(1, Priority::Level6)).await;
    assert_eq!(
        s.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.tx.send(AnnouncePeerRequest {
        host_id: "h".into(),
        task_id: "t".into(),
        peer_id: "p".into(),
        request: None,
    })
    .await
    .unwrap();
    assert_eq!(
        s.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // Events for another task, and for another peer, on a registered stream.
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.register(download(8 << 20, Priority::Level6)).await;
    assert!(matches!(
        s.next().await.unwrap(),
        Reply::NeedBackToSourceResponse(_)
    ));
    s.task = "other-task".into();
    s.piece_from_source(0).await;
    assert_eq!(
        s.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let mut s2 = Stream::open(&mut c, "h", "t2", "p2").await;
    s2.register(download(8 << 20, Priority::Level6)).await;
    assert!(matches!(
        s2.next().await.unwrap(),
        Reply::NeedBackToSourceResponse(_)
    ));
    s2.peer = "someone-else".into();
    s2.send(Event::DownloadPeerStartedRequest(
        DownloadPeerStartedRequest {},
    ))
    .await;
    assert_eq!(
        s2.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // A piece report without a piece.
    let mut s3 = Stream::open(&mut c, "h", "t3", "p3").await;
    s3.register(download(8 << 20, Priority::Level6)).await;
    let _ = s3.next().await;
    s3.send(Event::DownloadPieceFinishedRequest(
        DownloadPieceFinishedRequest { piece: None },
    ))
    .await;
    assert_eq!(
        s3.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // Garbage bytes on the wire: a raw HTTP/2-less connection that sends junk and leaves.
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"\x00\x01garbage\xff\xfe not grpc")
        .await
        .unwrap();
    drop(raw);

    // Unimplemented families say so.
    let err = c
        .stat_cache_task(StatCacheTaskRequest {
            host_id: "h".into(),
            task_id: "t".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("StatCacheTask"));

    // Still serving, and upstream peers' health check passes.
    announce_host(&mut c, "h2", false).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn idle_peers_and_empty_tasks_are_collected() {
    let server = start(
        "  gc:\n    peerGCInterval: 100ms\n    peerTTL: 300ms\n    taskGCInterval: 100ms\n    hostGCInterval: 100ms\n    hostTTL: 600ms\n",
    )
    .await;
    let mut c = client(&server).await;
    announce_host(&mut c, "h", false).await;
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.register(download(8 << 20, Priority::Level6)).await;
    let _ = s.next().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stat = |c: &mut SchedulerClient<Channel>| {
        let mut c = c.clone();
        async move {
            c.stat_peer(StatPeerRequest {
                host_id: "h".into(),
                task_id: "t".into(),
                peer_id: "p".into(),
            })
            .await
        }
    };
    assert_eq!(
        stat(&mut c).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    let hosts = c
        .list_hosts(ListHostsRequest { r#type: None })
        .await
        .unwrap()
        .into_inner();
    assert!(hosts.hosts.is_empty(), "host past its TTL is collected");
}
