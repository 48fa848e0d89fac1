//! The scheduler's AnnouncePeer handling under arbitrary message sequences from several
//! peers at once (hosts announced from two addresses, some as seeds, IDs from small pools
//! so that sequences meet): no panic, and the swarm model's invariants hold afterwards.
#![no_main]
use dragonfly_api::common::v2::{Download, Host, Peer, Piece};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Event;
use dragonfly_api::scheduler::v2::*;
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use std::time::Duration;

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map(|(f, r)| (*f, r)).unwrap_or((0, &[]));
        self.0 = rest;
        first
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) << 32 | self.u32() as u64
    }
    fn small(&mut self, n: u8) -> u8 {
        self.u8() % n
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// A number: small, near a piece boundary, or anything.
    fn number(&mut self) -> u32 {
        match self.small(4) {
            0 => self.small(8) as u32,
            1 => u32::MAX - self.small(4) as u32,
            _ => self.u32(),
        }
    }
    fn length(&mut self) -> Option<u64> {
        match self.small(5) {
            0 => None,
            1 => Some(0),
            2 => Some((self.small(8) as u64 + 1) << 22),
            3 => Some(self.u64()),
            _ => Some(self.u32() as u64),
        }
    }
}

const TASKS: [&str; 2] = [
    "1111111111111111111111111111111111111111111111111111111111111111",
    "2222222222222222222222222222222222222222222222222222222222222222",
];

fn host_ip(i: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, 1 + (i % 2)])
}

fn host_id(i: u8) -> String {
    format!("{}-h{i}", host_ip(i))
}

fn download(b: &mut Bytes<'_>) -> Download {
    Download {
        url: "http://origin/f".into(),
        priority: b.small(9) as i32 - 1,
        actual_content_length: b.length(),
        actual_piece_length: b.length(),
        actual_piece_count: b.length(),
        need_back_to_source: b.small(4) == 0,
        disable_back_to_source: b.small(4) == 0,
        metadata_only: b.small(8) == 0,
        ..Default::default()
    }
}

fn piece(b: &mut Bytes<'_>) -> Piece {
    Piece {
        number: b.number(),
        length: b.length().unwrap_or(0),
        digest: match b.small(3) {
            0 => String::new(),
            1 => format!("crc32:{}", b.small(3)),
            _ => "crc32:notanumber".into(),
        },
        cost: Some(prost_wkt_types_duration(b.u64())),
        ..Default::default()
    }
}

fn prost_wkt_types_duration(v: u64) -> prost_wkt_types::Duration {
    prost_wkt_types::Duration {
        seconds: v as i64,
        nanos: (v >> 32) as i32,
    }
}

fn event(b: &mut Bytes<'_>) -> Event {
    match b.small(12) {
        0 => Event::RegisterPeerRequest(RegisterPeerRequest {
            download: Some(download(b)),
        }),
        1 => Event::DownloadPeerStartedRequest(DownloadPeerStartedRequest {}),
        2 => Event::DownloadPeerBackToSourceStartedRequest(DownloadPeerBackToSourceStartedRequest {
            description: None,
        }),
        3 => Event::ReschedulePeerRequest(ReschedulePeerRequest {
            candidate_parents: (0..b.small(4))
                .map(|i| Peer {
                    id: format!("p{i}"),
                    ..Default::default()
                })
                .collect(),
            description: Some(if b.small(2) == 0 { "refresh" } else { "failed" }.into()),
        }),
        4 => Event::DownloadPeerFinishedRequest(DownloadPeerFinishedRequest {}),
        5 => Event::DownloadPeerBackToSourceFinishedRequest(DownloadPeerBackToSourceFinishedRequest {}),
        6 => Event::DownloadPeerFailedRequest(DownloadPeerFailedRequest { description: None }),
        7 => Event::DownloadPeerBackToSourceFailedRequest(DownloadPeerBackToSourceFailedRequest {
            description: None,
        }),
        8 => Event::DownloadPieceFinishedRequest(DownloadPieceFinishedRequest {
            piece: Some(piece(b)),
        }),
        9 => Event::DownloadPieceBackToSourceFinishedRequest(DownloadPieceBackToSourceFinishedRequest {
            piece: Some(piece(b)),
        }),
        10 => Event::DownloadPieceFailedRequest(DownloadPieceFailedRequest {
            piece_number: Some(b.number()),
            parent_id: format!("p{}", b.small(6)),
            temporary: b.small(2) == 0,
        }),
        _ => Event::DownloadPieceBackToSourceFailedRequest(
            DownloadPieceBackToSourceFailedRequest {
                piece_number: Some(b.number()),
                response: None,
            },
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let config = d7y_config::scheduler::Config::from_yaml(
            "metrics:\n  enable: false\nscheduler:\n  retryInterval: 10ms\nseedPeers:\n  - ip: 127.0.0.1\n    port: 4000\n",
        )
        .unwrap();
        let service = d7y_scheduler::service::Service::new(
            config,
            std::sync::Arc::new(d7y_scheduler::metrics::Metrics::new()),
        );
        let mut b = Bytes(data);
        for i in 0..4u8 {
            let _ = service.announce_host(
                Some(Host {
                    id: host_id(i),
                    r#type: (i == 0) as u32,
                    ip: host_ip(i).to_string(),
                    port: 4000,
                    download_port: 4005,
                    ..Default::default()
                }),
                Some(host_ip(i)),
            );
        }
        // Up to six streams; each event goes to one of them.
        let mut streams = Vec::new();
        for s in 0..6u8 {
            let (tx, rx) = tokio::sync::mpsc::channel(256);
            let (reply_tx, mut reply_rx) = tokio::sync::mpsc::channel(64);
            let inbound = tokio_stream_from(rx);
            let origin = Some(host_ip(s % 4));
            tokio::spawn(service.clone().serve_stream(inbound, reply_tx, origin));
            tokio::spawn(async move { while reply_rx.recv().await.is_some() {} });
            streams.push(tx);
        }
        let mut sent = 0;
        while !b.is_empty() && sent < 512 {
            let s = b.small(6) as usize;
            let request = AnnouncePeerRequest {
                host_id: host_id(b.small(4)),
                task_id: TASKS[b.small(2) as usize].into(),
                peer_id: format!("p{s}"),
                request: Some(event(&mut b)),
            };
            let _ = streams[s].send(Ok(request)).await;
            sent += 1;
            tokio::task::yield_now().await;
        }
        drop(streams);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let _ = service.gc(true);
        service
            .with_resources(|r| r.check_invariants())
            .expect("swarm invariants");
    });
});

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<AnnouncePeerRequest, tonic::Status>>,
) -> impl futures_util::Stream<Item = Result<AnnouncePeerRequest, tonic::Status>> + Unpin + Send {
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}
