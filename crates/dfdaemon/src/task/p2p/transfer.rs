//! The transfers of the piece loop: a parent's SyncPieces stream (which pieces it holds
//! or is receiving) and one piece fetched from a parent over Vortex, checked against its
//! CRC: into the content file (relayed to children as it arrives, recorded when whole) or,
//! for an endgame duplicate, into memory only ([`Target`]), so that the copy that loses the
//! race leaves nothing behind. Pieces from the origin are fetched by
//! [`crate::task::source::fetch_piece`].

use super::super::sink::PieceSink;
use super::super::{TaskManager, TaskRun};
use super::CONNECT_TIMEOUT;
use crate::error::TaskError;
use crate::relay::FlightInfo;
use d7y_storage::{PieceMeta, StorageError};
use d7y_types::{Digest, PieceLayout};
use dragonfly_api::common::v2::TrafficType;
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::SyncPiecesRequest;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::oneshot;

/// A fetch whose parent sends nothing for this long is abandoned and its piece asked for
/// again: a flow stuck in TCP back-off on a crowded link, or a parent that froze. A relay
/// passes each write on as it arrives, so even a chain of relays is never silent this
/// long while its head is making progress.
const FETCH_SILENCE: Duration = Duration::from_secs(8);

/// How fetching a piece from a parent failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    #[error(
        "piece {number} from {parent} failed its CRC check: expected {expected}, got {actual}"
    )]
    Corrupt {
        number: u32,
        parent: String,
        expected: String,
        actual: String,
    },
    #[error("parent does not have the piece")]
    NotFound,
    #[error("{0}")]
    Transfer(String),
    #[error("{0}")]
    Storage(#[from] StorageError),
    /// A piece from the origin failed (after the backend's own retries): final.
    #[error("{0}")]
    Origin(TaskError),
}

/// Where a fetched piece's bytes go.
pub(super) enum Target {
    /// Into the content file at the piece's offset, relayed to children as they arrive,
    /// recorded once verified. The engine may [`Steer`] it while it reads (never during a
    /// write, so when it returns, none of its writes can still land).
    File(oneshot::Receiver<Steer>),
    /// Into memory only (an endgame duplicate, while another fetch writes the file):
    /// nothing is written, relayed or recorded until the engine commits it
    /// ([`commit_buffered`]).
    Buffer,
}

/// What the engine tells a fetch that writes the file, while it runs.
pub(super) enum Steer {
    /// Give up (its parent stalled).
    Stop,
    /// An endgame copy of the whole piece (verified) arrived first, from `parent_id`:
    /// write the rest of the piece from it instead of waiting on this parent. Children
    /// relaying this fetch's flight get those bytes as they are written.
    TakeOver {
        data: bytes::Bytes,
        parent_id: String,
    },
}

/// A fetched, verified piece.
pub(super) enum Fetched {
    /// Written and recorded.
    Recorded(PieceMeta),
    /// Held in memory (a [`Target::Buffer`] fetch): `piece` describes it, `data` is it.
    Buffered {
        piece: PieceMeta,
        data: bytes::Bytes,
    },
}

/// Something a parent's background stream learnt.
/// Events carry the parent's incarnation (`generation`): a parent dropped and added again
/// gets new streams, and late events of the old ones are ignored.
pub(super) enum ParentEvent {
    Available {
        parent: String,
        generation: u64,
        number: u32,
        addr: Option<SocketAddr>,
    },
    SyncEnded {
        parent: String,
        generation: u64,
        error: Option<String>,
    },
}

pub(super) async fn sync_pieces(
    upload: String,
    options: d7y_net::ChannelOptions,
    host_id: String,
    task_id: String,
    (parent, generation): (String, u64),
    interested: Vec<u32>,
    events: mpsc::Sender<ParentEvent>,
) {
    let result: Result<(), String> = async {
        let channel = d7y_net::channel(&upload, &options)
            .await
            .map_err(|e| format!("connect {upload}: {e}"))?;
        let mut stream = DfdaemonUploadClient::new(channel)
            .sync_pieces(SyncPiecesRequest {
                host_id,
                task_id,
                interested_piece_numbers: interested,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        while let Some(r) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            let addr =
                r.ip.parse::<std::net::IpAddr>()
                    .ok()
                    .zip(r.tcp_port.filter(|p| *p > 0))
                    .map(|(ip, port)| SocketAddr::new(ip, port as u16));
            if events
                .send(ParentEvent::Available {
                    parent: parent.clone(),
                    generation,
                    number: r.number,
                    addr,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    let _ = events
        .send(ParentEvent::SyncEnded {
            parent,
            generation,
            error: result.err(),
        })
        .await;
}

/// Fetches one piece over Vortex into `target`, checks its CRC, and records it when it
/// went into the file.
#[allow(clippy::too_many_arguments)]
pub(super) async fn fetch_piece(
    mgr: &TaskManager,
    run: &TaskRun,
    writer: d7y_storage::ContentWriter,
    task_id: String,
    layout: PieceLayout,
    number: u32,
    parent_id: String,
    addr: SocketAddr,
    pool: Arc<Mutex<Vec<d7y_vortex::Client>>>,
    authority: Option<Digest>,
    received: Arc<std::sync::atomic::AtomicU64>,
    mut target: Target,
) -> Result<Fetched, FetchError> {
    let started = Instant::now();
    let timeout = mgr.config.download.piece_timeout;
    let transfer = |e: String| FetchError::Transfer(e);
    let (offset, length) = layout.range(number).map_err(|e| transfer(e.to_string()))?;
    let pooled = pool.lock().expect("pool").pop();
    let mut client = match pooled {
        Some(c) => c,
        None => {
            d7y_vortex::Client::connect_with(addr, None, CONNECT_TIMEOUT, mgr.peer_tls.as_deref())
                .await
                .map_err(|e| transfer(e.to_string()))?
        }
    };
    let silent = || {
        transfer(format!(
            "no bytes of piece {number} from the parent for {FETCH_SILENCE:?}"
        ))
    };
    let work = async {
        let meta = tokio::time::timeout(FETCH_SILENCE, client.request_piece(&task_id, number))
            .await
            .map_err(|_| silent())?
            .map_err(|e| {
                if e.is_not_found() {
                    FetchError::NotFound
                } else {
                    transfer(e.to_string())
                }
            })?;
        let header_at = started.elapsed();
        if meta.number != number || meta.offset != offset || meta.length != length {
            return Err(FetchError::Corrupt {
                number,
                parent: parent_id.clone(),
                expected: format!("piece {number} at {offset}+{length}"),
                actual: format!("piece {} at {}+{}", meta.number, meta.offset, meta.length),
            });
        }
        let claimed: Digest = meta.digest.parse().map_err(|_| FetchError::Corrupt {
            number,
            parent: parent_id.clone(),
            expected: "a crc32 digest".into(),
            actual: meta.digest.clone(),
        })?;
        // A parent that claims another digest than the seed's is serving other bytes:
        // refused before a byte is read (the connection is dropped with the error).
        if let Some(authority) = &authority {
            if *authority != claimed {
                return Err(FetchError::Corrupt {
                    number,
                    parent: parent_id.clone(),
                    expected: format!("{authority} (the seed peer's)"),
                    actual: format!("{claimed} (claimed by the parent)"),
                });
            }
        }
        let expected = authority.unwrap_or(claimed);
        // The whole piece's CRC against the expected one.
        let verify = |crc: u32| {
            let actual = Digest::crc32(crc);
            if actual == expected {
                Ok(actual)
            } else {
                Err(FetchError::Corrupt {
                    number,
                    parent: parent_id.clone(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                })
            }
        };
        let mut steer = match &mut target {
            Target::File(steer) => Some(steer),
            Target::Buffer => {
                let data = read_to_memory(&mut client, length, &received, silent).await?;
                let actual = verify(crc32fast::hash(&data))?;
                return Ok((actual, Err(data), true, parent_id.clone()));
            }
        };
        // From here the piece can be relayed to children while it arrives.
        let flight = mgr.flights.begin(
            &task_id,
            FlightInfo {
                number,
                offset,
                length,
                digest: meta.digest.clone(),
                parent_id: parent_id.clone(),
            },
        );
        run.add_arriving(PieceMeta::new(number, offset, length, meta.digest.clone()));
        let limits = [&mgr.download_bandwidth];
        let write_buffer_size = mgr.config.storage.write_buffer_size;
        let mut sink =
            PieceSink::new(&writer, &limits, offset, length, write_buffer_size).relaying(&flight);
        let mut reader = client.content(length);
        // Who the bytes came from, and whether the connection is at a message boundary.
        let mut source = parent_id.clone();
        let mut reusable = true;
        loop {
            // Only the read waits on the engine: a write, once begun, finishes.
            let read = tokio::select! {
                biased;
                steered = async { steer.as_mut().expect("guarded").await }, if steer.is_some() => {
                    steer = None;
                    match steered {
                        Ok(Steer::Stop) => {
                            return Err(transfer("abandoned: the parent stalled".into()))
                        }
                        Ok(Steer::TakeOver { data, parent_id }) => {
                            let have = sink.len() as usize;
                            if data.len() as u64 != length || have > data.len() {
                                return Err(transfer(format!(
                                    "an endgame copy of {} bytes for a piece of {length}",
                                    data.len()
                                )));
                            }
                            for chunk in data[have..].chunks(1 << 20) {
                                sink.push(chunk).await?;
                            }
                            source = parent_id;
                            reusable = false; // the rest of this parent's answer is unread
                            break;
                        }
                        Err(_) => continue, // the engine let go: read on
                    }
                }
                read = tokio::time::timeout(FETCH_SILENCE, sink.read(&mut reader)) => {
                    read.map_err(|_| silent())?
                }
            };
            match read {
                Ok(0) => break,
                Ok(n) => {
                    received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    sink.flush_if_full().await?;
                }
                Err(e) => return Err(transfer(e.to_string())),
            }
        }
        let body_at = started.elapsed();
        let (written, crc) = sink.finish().await?;
        if written != length {
            return Err(transfer(format!(
                "parent closed after {written} of {length} bytes"
            )));
        }
        let actual = verify(crc)?;
        // Where the fetch spent its time (the parent's answer, the bytes, the last write),
        // for tracing a swarm run piece by piece: a relayed piece ends after its flight.
        tracing::debug!(
            number,
            header_ms = header_at.as_millis() as u64,
            body_ms = body_at.as_millis() as u64,
            finish_ms = started.elapsed().as_millis() as u64,
            "piece received"
        );
        Ok((actual, Ok(flight), reusable, source))
    };
    let (digest, landed, reusable, source) = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(transfer(format!(
                "piece {number} timed out after {timeout:?}"
            )))
        }
    };
    if reusable {
        pool.lock().expect("pool").push(client);
    }
    let mut piece = PieceMeta::new(number, offset, length, digest.to_string());
    piece.parent_id = Some(source);
    piece.traffic_type = TrafficType::RemotePeer as i32;
    piece.cost_millis = started.elapsed().as_millis() as u64;
    match landed {
        Ok(flight) => {
            mgr.record_piece(run, &task_id, piece.clone(), "REMOTE_PEER")
                .await?;
            flight.verified();
            Ok(Fetched::Recorded(piece))
        }
        Err(data) => Ok(Fetched::Buffered { piece, data }),
    }
}

/// Reads a piece's `length` bytes into memory (an endgame duplicate).
async fn read_to_memory(
    client: &mut d7y_vortex::Client,
    length: u64,
    received: &std::sync::atomic::AtomicU64,
    silent: impl Fn() -> FetchError,
) -> Result<bytes::Bytes, FetchError> {
    use tokio::io::AsyncReadExt;
    let mut reader = client.content(length);
    let mut data = bytes::BytesMut::with_capacity(length as usize);
    loop {
        let n = tokio::time::timeout(FETCH_SILENCE, reader.read_buf(&mut data))
            .await
            .map_err(|_| silent())?
            .map_err(|e| FetchError::Transfer(e.to_string()))?;
        if n == 0 {
            break;
        }
        received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
    if data.len() as u64 != length {
        return Err(FetchError::Transfer(format!(
            "parent closed after {} of {length} bytes",
            data.len()
        )));
    }
    Ok(data.freeze())
}

/// Writes an endgame copy that won into the content file and records it. Its CRC was
/// checked when it arrived; the fetch that was writing the same bytes has ended.
pub(super) async fn commit_buffered(
    mgr: &TaskManager,
    run: &TaskRun,
    writer: &d7y_storage::ContentWriter,
    task_id: &str,
    piece: PieceMeta,
    data: bytes::Bytes,
) -> Result<PieceMeta, FetchError> {
    let limits = [&mgr.download_bandwidth];
    let mut sink = PieceSink::new(
        writer,
        &limits,
        piece.offset,
        piece.length,
        mgr.config.storage.write_buffer_size,
    );
    for chunk in data.chunks(1 << 20) {
        sink.push(chunk).await?;
    }
    let (written, _) = sink.finish().await?;
    if written != piece.length {
        return Err(FetchError::Transfer(format!(
            "wrote {written} of {} bytes of piece {}",
            piece.length, piece.number
        )));
    }
    mgr.record_piece(run, task_id, piece.clone(), "REMOTE_PEER")
        .await?;
    Ok(piece)
}
