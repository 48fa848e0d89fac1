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

/// A host ID as upstream forms it (`<ip>-<hostname>`), which the scheduler checks.
fn hid(name: &str) -> String {
    format!("127.0.0.1-{name}")
}

/// A task ID (64 hex characters) standing for `name`.
fn tid(name: &str) -> String {
    d7y_types::id::task_id(&d7y_types::TaskIdParams {
        url: &format!("http://origin/{name}"),
        ..Default::default()
    })
    .unwrap()
}

fn host(id: &str, seed: bool) -> Host {
    Host {
        id: hid(id),
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
            host: hid(host),
            task: tid(task),
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
        [hid("s")]
    );
    c.delete_host(DeleteHostRequest { host_id: hid("a") })
        .await
        .unwrap();
    let err = c
        .delete_host(DeleteHostRequest { host_id: hid("a") })
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
            host_id: hid("ha"),
            task_id: tid("t"),
            peer_id: "pa".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(peer.state, "Succeeded");
    assert_eq!(peer.pieces.len(), 2);
    let task = c
        .stat_task(StatTaskRequest {
            host_id: hid("ha"),
            task_id: tid("t"),
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
            host_id: hid("ha"),
            task_id: tid("t"),
            peer_id: "pa".into(),
        })
        .await
        .is_ok());
    let err = c
        .stat_peer(StatPeerRequest {
            host_id: hid("hb"),
            task_id: tid("t"),
            peer_id: "pb".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    c.delete_peer(DeletePeerRequest {
        host_id: hid("ha"),
        task_id: tid("t"),
        peer_id: "pa".into(),
    })
    .await
    .unwrap();
    let err = c
        .delete_task(DeleteTaskRequest {
            host_id: hid("ha"),
            task_id: tid("nope"),
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
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.host = String::new();
    s.register(download(1, Priority::Level6)).await;
    assert_eq!(
        s.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let mut s = Stream::open(&mut c, "h", "t", "p").await;
    s.tx.send(AnnouncePeerRequest {
        host_id: hid("h"),
        task_id: tid("t"),
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
    s.task = tid("other-task");
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
            host_id: hid("h"),
            task_id: tid("t"),
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
                host_id: hid("h"),
                task_id: tid("t"),
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

/// Upstream's client (1.5.10) keeps its request stream open after its final event and
/// returns only when the scheduler ends the response stream: each final event must end it,
/// promptly, after the replies queued before it.
#[tokio::test]
async fn final_events_end_the_announce_stream_while_the_peer_keeps_its_side_open() {
    let server = start("").await;
    let mut c = client(&server).await;
    announce_host(&mut c, "h", false).await;

    let finals: [(&str, Event); 4] = [
        (
            "finished",
            Event::DownloadPeerFinishedRequest(DownloadPeerFinishedRequest {}),
        ),
        (
            "back-to-source finished",
            Event::DownloadPeerBackToSourceFinishedRequest(
                DownloadPeerBackToSourceFinishedRequest {},
            ),
        ),
        (
            "failed",
            Event::DownloadPeerFailedRequest(DownloadPeerFailedRequest {
                description: Some("gave up".into()),
            }),
        ),
        (
            "back-to-source failed",
            Event::DownloadPeerBackToSourceFailedRequest(DownloadPeerBackToSourceFailedRequest {
                description: Some("origin 500".into()),
            }),
        ),
    ];
    for (i, (what, event)) in finals.into_iter().enumerate() {
        let task = format!("t{i}");
        let mut s = Stream::open(&mut c, "h", &task, &format!("p{i}")).await;
        s.register(download(8 << 20, Priority::Level6)).await;
        // No reading in between: the back-to-source answer is queued when the final event
        // arrives, and must still be delivered before the end.
        s.send(Event::DownloadPeerBackToSourceStartedRequest(
            DownloadPeerBackToSourceStartedRequest { description: None },
        ))
        .await;
        s.piece_from_source(0).await;
        s.send(event).await;
        assert!(
            matches!(s.next().await, Ok(Reply::NeedBackToSourceResponse(_))),
            "{what}: the queued answer comes first"
        );
        // `s.tx` is still open, as upstream's client keeps it.
        let end = tokio::time::timeout(Duration::from_secs(1), s.rx.message())
            .await
            .unwrap_or_else(|_| panic!("{what}: the stream did not end within 1 s"));
        assert!(
            matches!(end, Ok(None)),
            "{what}: expected a clean end, got {end:?}"
        );
        let peer = c
            .stat_peer(StatPeerRequest {
                host_id: hid("h"),
                task_id: tid(&task),
                peer_id: format!("p{i}"),
            })
            .await;
        if what.ends_with("finished") {
            // A finished peer stays a parent after its stream ended.
            assert_eq!(peer.unwrap().into_inner().state, "Succeeded", "{what}");
        } else {
            assert_eq!(peer.unwrap_err().code(), tonic::Code::NotFound, "{what}");
        }
    }
}

/// A client whose connections come from `ip` (any 127.0.0.0/8 address is local).
async fn client_from(server: &Server, ip: &str) -> SchedulerClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .local_address(Some(ip.parse().unwrap()))
        .connect()
        .await
        .unwrap();
    SchedulerClient::new(channel)
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn hostile_sizes_are_refused_and_memory_stays_flat() {
    let server = start("").await;
    let mut c = client(&server).await;
    announce_host(&mut c, "h", false).await;
    let before = rss();
    for round in 0..200u32 {
        // A piece count of 2^40.
        let mut s = Stream::open(&mut c, "h", &format!("huge{round}"), &format!("p{round}")).await;
        let mut d = download(8 << 20, Priority::Level6);
        d.actual_content_length = None;
        d.actual_piece_count = Some(1 << 40);
        s.register(d).await;
        let err = s.next().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("piece count"), "{}", err.message());

        // A piece number of u32::MAX on a well-formed task.
        let mut s = Stream::open(&mut c, "h", &format!("t{round}"), &format!("q{round}")).await;
        s.register(download(8 << 20, Priority::Level6)).await;
        assert!(matches!(
            s.next().await.unwrap(),
            Reply::NeedBackToSourceResponse(_)
        ));
        s.piece_from_source(u32::MAX).await;
        let err = s.next().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("out of range"), "{}", err.message());

        // Costs that would overflow a sum, and a length that disagrees with the task.
        let mut s = Stream::open(&mut c, "h", &format!("t{round}"), &format!("r{round}")).await;
        let mut d = download(8 << 20, Priority::Level6);
        d.actual_content_length = Some(9 << 20);
        s.register(d).await;
        let err = s.next().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("content length"),
            "{}",
            err.message()
        );
    }
    let mut s = Stream::open(&mut c, "h", "costly", "cp").await;
    s.register(download(8 << 20, Priority::Level6)).await;
    assert!(matches!(
        s.next().await.unwrap(),
        Reply::NeedBackToSourceResponse(_)
    ));
    for number in 0..2 {
        s.send(Event::DownloadPieceBackToSourceFinishedRequest(
            DownloadPieceBackToSourceFinishedRequest {
                piece: Some(Piece {
                    number,
                    length: 4 << 20,
                    digest: "crc32:1".into(),
                    cost: Some(prost_wkt_types::Duration {
                        seconds: i64::MAX,
                        nanos: i32::MAX,
                    }),
                    ..Default::default()
                }),
            },
        ))
        .await;
    }
    // A task ID that is not one never reaches the model.
    let mut bad = Stream::open(&mut c, "h", "x", "bad").await;
    bad.task = "../../etc/passwd".into();
    bad.register(download(8 << 20, Priority::Level6)).await;
    assert_eq!(
        bad.next().await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // The scheduler still answers.
    c.stat_peer(StatPeerRequest {
        host_id: hid("h"),
        task_id: tid("costly"),
        peer_id: "cp".into(),
    })
    .await
    .unwrap();
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
}

#[tokio::test]
async fn hosts_must_announce_the_address_they_connect_from() {
    let server = start("").await;
    let mut c = client(&server).await;
    // An address it does not connect from.
    let mut h = host("liar", false);
    h.ip = "10.9.9.9".into();
    h.id = "10.9.9.9-liar".into();
    let err = c
        .announce_host(AnnounceHostRequest {
            host: Some(h),
            interval: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("verifyHostIP"), "{}", err.message());
    // An ID that names another address.
    let mut h = host("liar", false);
    h.id = "10.9.9.9-liar".into();
    let err = c
        .announce_host(AnnounceHostRequest {
            host: Some(h),
            interval: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // A host on 127.0.0.1 cannot be updated, deleted or used from 127.0.0.2.
    announce_host(&mut c, "victim", false).await;
    let mut stranger = client_from(&server, "127.0.0.2").await;
    let err = stranger
        .announce_host(AnnounceHostRequest {
            host: Some(host("victim", false)),
            interval: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let err = stranger
        .delete_host(DeleteHostRequest {
            host_id: hid("victim"),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut s = Stream::open(&mut stranger, "victim", "t", "p").await;
    s.register(download(8 << 20, Priority::Level6)).await;
    assert_eq!(
        s.next().await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    // The victim still works.
    let mut s = Stream::open(&mut c, "victim", "t", "p").await;
    s.register(download(8 << 20, Priority::Level6)).await;
    assert!(matches!(
        s.next().await.unwrap(),
        Reply::NeedBackToSourceResponse(_)
    ));
}

/// A scheduler with one configured seed peer (127.0.0.1, upload port 4000), whose host is
/// announced and which holds task `name` in full (two pieces, CRCs 100 and 101).
async fn with_seed(name: &str) -> (Server, SchedulerClient<Channel>, Stream) {
    let server = start("  retryLimit: 4\n  retryBackToSourceLimit: 3\nseedPeers:\n  - ip: 127.0.0.1\n    port: 4000\n").await;
    let mut c = client(&server).await;
    announce_host(&mut c, "seed", true).await;
    let mut seed = Stream::open(&mut c, "seed", name, "seed-peer").await;
    seed.register(download(8 << 20, Priority::Level6)).await;
    assert!(matches!(
        seed.next().await.unwrap(),
        Reply::NeedBackToSourceResponse(_)
    ));
    seed.send(Event::DownloadPeerBackToSourceStartedRequest(
        DownloadPeerBackToSourceStartedRequest { description: None },
    ))
    .await;
    for number in 0..2 {
        seed.send(Event::DownloadPieceBackToSourceFinishedRequest(
            DownloadPieceBackToSourceFinishedRequest {
                piece: Some(Piece {
                    number,
                    length: 4 << 20,
                    digest: format!("crc32:{}", 100 + number),
                    ..Default::default()
                }),
            },
        ))
        .await;
    }
    (server, c, seed)
}

/// The parents of a NormalTaskResponse, or a panic naming what came instead.
fn parents(reply: Reply) -> Vec<Peer> {
    match reply {
        Reply::NormalTaskResponse(r) => r.candidate_parents,
        other => panic!("expected parents, got {other:?}"),
    }
}

#[tokio::test]
async fn one_child_blaming_the_seed_does_not_take_it_from_the_others() {
    let (server, mut c, _seed) = with_seed("blamed").await;
    announce_host(&mut c, "a", false).await;
    announce_host(&mut c, "b", false).await;
    let mut a = Stream::open(&mut c, "a", "blamed", "pa").await;
    a.register(download(8 << 20, Priority::Level6)).await;
    let got = parents(a.next().await.unwrap());
    assert_eq!(got[0].id, "seed-peer");
    // The seed's digests travel with the parents.
    let pieces = &got[0].task.as_ref().unwrap().pieces;
    let mut digests: Vec<(u32, &str)> = pieces
        .iter()
        .map(|p| (p.number, p.digest.as_str()))
        .collect();
    digests.sort();
    assert_eq!(digests, [(0, "crc32:100"), (1, "crc32:101")]);

    a.send(Event::DownloadPieceFailedRequest(
        DownloadPieceFailedRequest {
            piece_number: Some(0),
            parent_id: "seed-peer".into(),
            temporary: false,
        },
    ))
    .await;
    // Another child still gets the seed.
    let mut b = Stream::open(&mut c, "b", "blamed", "pb").await;
    b.register(download(8 << 20, Priority::Level6)).await;
    assert_eq!(parents(b.next().await.unwrap())[0].id, "seed-peer");
    // The blaming child does not: with nobody else, it is sent to the origin.
    a.send(Event::ReschedulePeerRequest(ReschedulePeerRequest {
        candidate_parents: vec![],
        description: Some("parent failed".into()),
    }))
    .await;
    match a.next().await.unwrap() {
        Reply::NeedBackToSourceResponse(_) => {}
        Reply::NormalTaskResponse(r) => assert!(
            r.candidate_parents.iter().all(|p| p.id != "seed-peer"),
            "{r:?}"
        ),
        other => panic!("{other:?}"),
    }
    // The same child again, from the same address: still one witness.
    let mut a2 = Stream::open(&mut c, "a", "blamed", "pa2").await;
    a2.register(download(8 << 20, Priority::Level6)).await;
    parents(a2.next().await.unwrap());
    a2.send(Event::DownloadPieceFailedRequest(
        DownloadPieceFailedRequest {
            piece_number: Some(1),
            parent_id: "seed-peer".into(),
            temporary: false,
        },
    ))
    .await;
    let mut d = Stream::open(&mut c, "b", "blamed", "pd").await;
    d.register(download(8 << 20, Priority::Level6)).await;
    assert_eq!(parents(d.next().await.unwrap())[0].id, "seed-peer");

    // A second address agrees: now nobody gets it.
    let mut far = client_from(&server, "127.0.0.3").await;
    let mut h = host("far", false);
    h.ip = "127.0.0.3".into();
    h.id = "127.0.0.3-far".into();
    far.announce_host(AnnounceHostRequest {
        host: Some(h),
        interval: None,
    })
    .await
    .unwrap();
    let mut f = Stream::open(&mut far, "far", "blamed", "pf").await;
    f.host = "127.0.0.3-far".into();
    f.register(download(8 << 20, Priority::Level6)).await;
    parents(f.next().await.unwrap());
    f.send(Event::DownloadPieceFailedRequest(
        DownloadPieceFailedRequest {
            piece_number: Some(1),
            parent_id: "seed-peer".into(),
            temporary: false,
        },
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut e = Stream::open(&mut c, "b", "blamed", "pe").await;
    e.register(download(8 << 20, Priority::Level6)).await;
    match e.next().await.unwrap() {
        Reply::NormalTaskResponse(r) => assert!(
            r.candidate_parents.iter().all(|p| p.id != "seed-peer"),
            "{r:?}"
        ),
        Reply::NeedBackToSourceResponse(_) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_peer_reporting_digests_the_seed_contradicts_is_isolated() {
    let (_server, mut c, _seed) = with_seed("lies").await;
    announce_host(&mut c, "liar", false).await;
    announce_host(&mut c, "child", false).await;
    // A self-declared seed the config does not name is a normal host.
    announce_host(&mut c, "fake-seed", true).await;

    let mut liar = Stream::open(&mut c, "liar", "lies", "pl").await;
    liar.register(download(8 << 20, Priority::Level6)).await;
    parents(liar.next().await.unwrap());
    liar.send(Event::DownloadPeerStartedRequest(
        DownloadPeerStartedRequest {},
    ))
    .await;
    // It claims both pieces with CRCs the seed contradicts.
    for number in 0..2 {
        liar.send(Event::DownloadPieceFinishedRequest(
            DownloadPieceFinishedRequest {
                piece: Some(Piece {
                    number,
                    parent_id: Some("seed-peer".into()),
                    length: 4 << 20,
                    digest: "crc32:666".into(),
                    ..Default::default()
                }),
            },
        ))
        .await;
    }
    liar.send(Event::DownloadPeerFinishedRequest(
        DownloadPeerFinishedRequest {},
    ))
    .await;
    let mut fake = Stream::open(&mut c, "fake-seed", "lies", "pfake").await;
    fake.register(download(8 << 20, Priority::Level6)).await;
    // Not trusted as a seed: it is scheduled like any peer, not sent to fetch a first copy.
    assert!(parents(fake.next().await.unwrap())
        .iter()
        .all(|p| p.id != "pl"));

    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        let mut child = Stream::open(&mut c, "child", "lies", &format!("pc{i}")).await;
        child.register(download(8 << 20, Priority::Level6)).await;
        let got = parents(child.next().await.unwrap());
        assert!(
            got.iter().all(|p| p.id != "pl"),
            "the liar was offered: {got:?}"
        );
    }
    let peer = c
        .stat_peer(StatPeerRequest {
            host_id: hid("liar"),
            task_id: tid("lies"),
            peer_id: "pl".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(peer.state, "Succeeded");
}
