//! The Vortex piece server's view of local storage: finished pieces and pieces still
//! arriving from a parent (see [`crate::relay`]), an upload-slot
//! limit, the upload bandwidth limit and upload metrics.

use crate::host::Traffic;
use crate::metrics::Metrics;
use crate::ratelimit::Bandwidth;
use chrono::DateTime;
use d7y_storage::Storage;
use d7y_vortex::{OpenedPiece, PieceMetadata, PieceProvider, ServeError};
use dragonfly_api::common::v2::TrafficType;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tokio_util::io::StreamReader;

pub struct StoragePieces {
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
    pub traffic: Arc<Traffic>,
    pub bandwidth: Bandwidth,
    pub slots: Arc<Semaphore>,
    pub disable_shared: bool,
    pub buffer_size: usize,
    /// Pieces still arriving here, served as they arrive.
    pub flights: Arc<crate::relay::Flights>,
    /// Seed peers: told which pieces children asked for.
    pub super_seed: Option<Arc<crate::superseed::SuperSeed>>,
}

/// Where a requested piece is.
enum Found {
    Stored(d7y_storage::PieceMeta),
    Flight(Arc<crate::relay::Flight>),
}

struct UploadGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _lease: d7y_storage::TaskLease,
    metrics: Arc<Metrics>,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.metrics.concurrent_upload_piece_total.dec();
    }
}

impl PieceProvider for StoragePieces {
    async fn open(&self, task_id: &str, number: u32) -> Result<OpenedPiece, ServeError> {
        if self.disable_shared {
            return Err(ServeError::not_found("this peer does not share its tasks"));
        }
        if let Some(seed) = &self.super_seed {
            seed.served(task_id, number);
        }
        let fail = |e: ServeError| {
            self.metrics
                .upload_piece_failure_total
                .with_label_values(&["STANDARD"])
                .inc();
            e
        };
        // A piece in flight first: once its flight is over it is in storage, so a piece
        // that is here is found by one of the two lookups.
        let found = match self.flights.get(task_id, number) {
            Some(flight) => Found::Flight(flight),
            None => Found::Stored(
                self.storage
                    .piece(task_id, number)
                    .await
                    .map_err(|e| fail(ServeError::internal(e.to_string())))?
                    .ok_or_else(|| {
                        fail(ServeError::not_found(format!(
                            "piece {number} of task {task_id} is not here"
                        )))
                    })?,
            ),
        };
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ServeError::internal("shutting down"))?;
        let lease = self.storage.lease(task_id);
        let offset = match &found {
            Found::Stored(piece) => piece.offset,
            Found::Flight(flight) => flight.info.offset,
        };
        let file = self
            .storage
            .open_content_at(task_id, offset)
            .await
            .map_err(|e| fail(ServeError::internal(e.to_string())))?;
        self.storage.touch(task_id);
        self.metrics
            .upload_piece_total
            .with_label_values(&["STANDARD"])
            .inc();
        self.metrics.concurrent_upload_piece_total.inc();
        let (metadata, reader): (PieceMetadata, Pin<Box<dyn AsyncRead + Send>>) = match found {
            Found::Stored(piece) => (
                PieceMetadata {
                    number: piece.number,
                    offset: piece.offset,
                    length: piece.length,
                    digest: piece.digest.clone(),
                    parent_id: piece.parent_id.clone().unwrap_or_default(),
                    traffic_type: piece.traffic_type as u8,
                    cost: Duration::from_millis(piece.cost_millis),
                    created_at: DateTime::from_timestamp(piece.created_at as i64, 0)
                        .unwrap_or_default()
                        .naive_utc(),
                },
                Box::pin(
                    tokio::io::BufReader::with_capacity(self.buffer_size, file).take(piece.length),
                ),
            ),
            Found::Flight(flight) => {
                let info = &flight.info;
                (
                    PieceMetadata {
                        number: info.number,
                        offset: info.offset,
                        length: info.length,
                        digest: info.digest.clone(),
                        parent_id: info.parent_id.clone(),
                        traffic_type: TrafficType::RemotePeer as u8,
                        cost: Duration::ZERO,
                        created_at: chrono::Utc::now().naive_utc(),
                    },
                    Box::pin(StreamReader::new(crate::relay::follow(
                        file,
                        &flight,
                        self.buffer_size,
                    ))),
                )
            }
        };
        Ok(OpenedPiece {
            metadata,
            reader,
            guard: Box::new(UploadGuard {
                _permit: permit,
                _lease: lease,
                metrics: self.metrics.clone(),
            }),
        })
    }

    async fn throttle(&self, bytes: usize) {
        self.bandwidth.acquire(bytes).await;
    }

    fn sent(&self, bytes: u64) {
        self.traffic.add_upload(bytes);
        self.metrics
            .upload_traffic
            .with_label_values(&["STANDARD"])
            .inc_by(bytes);
    }

    fn buffer_size(&self) -> usize {
        self.buffer_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::{FlightInfo, Flights};
    use tokio::io::AsyncReadExt;

    struct Served {
        storage: Storage,
        flights: Arc<Flights>,
        addr: std::net::SocketAddr,
        _dir: tempfile::TempDir,
    }

    async fn serve() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), true).unwrap();
        let flights = Arc::new(Flights::default());
        let provider = Arc::new(StoragePieces {
            storage: storage.clone(),
            metrics: Arc::new(Metrics::new()),
            traffic: Arc::default(),
            bandwidth: Bandwidth::new(u64::MAX),
            slots: Arc::new(Semaphore::new(4)),
            disable_shared: false,
            buffer_size: 64 * 1024,
            flights: flights.clone(),
            super_seed: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(d7y_vortex::serve(listener, provider));
        Served {
            storage,
            flights,
            addr,
            _dir: dir,
        }
    }

    async fn read_exactly(
        r: &mut (impl tokio::io::AsyncRead + Unpin),
        n: usize,
    ) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), r.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        Ok(buf)
    }

    #[tokio::test]
    async fn a_piece_in_flight_is_served_as_it_arrives_and_its_end_after_verification() {
        let s = serve().await;
        let task = "c".repeat(64);
        let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let half = data.len() / 2;
        let digest = d7y_types::Digest::crc32(crc32fast::hash(&data)).to_string();
        let writer = s.storage.open_content_for_write(&task).await.unwrap();
        let flight = s.flights.begin(
            &task,
            FlightInfo {
                number: 0,
                offset: 0,
                length: data.len() as u64,
                digest: digest.clone(),
                parent_id: "parent".into(),
            },
        );
        writer
            .write_at(0, bytes::Bytes::copy_from_slice(&data[..half]))
            .await
            .unwrap();
        flight.written(half as u64);

        let mut client = d7y_vortex::Client::connect(s.addr, Duration::from_secs(3))
            .await
            .unwrap();
        let meta = client.request_piece(&task, 0).await.unwrap();
        assert_eq!(meta.digest, digest, "the parent's digest is passed on");
        assert_eq!(meta.length, data.len() as u64);
        let mut content = client.content(meta.length);
        // The first half is here before the rest has even arrived.
        assert_eq!(
            read_exactly(&mut content, half).await.unwrap(),
            data[..half]
        );

        writer
            .write_at(half as u64, bytes::Bytes::copy_from_slice(&data[half..]))
            .await
            .unwrap();
        flight.written(data.len() as u64);
        // Whole but not yet verified: everything but the last byte.
        let rest = data.len() - half;
        assert_eq!(
            read_exactly(&mut content, rest - 1).await.unwrap(),
            data[half..data.len() - 1]
        );
        s.storage
            .put_piece(
                &task,
                d7y_storage::PieceMeta::new(0, 0, data.len() as u64, digest),
            )
            .await
            .unwrap();
        flight.verified();
        assert_eq!(
            read_exactly(&mut content, 1).await.unwrap(),
            data[data.len() - 1..]
        );
        drop(content);

        // Once verified the piece comes from storage.
        let again = client.request_piece(&task, 0).await.unwrap();
        assert_eq!(again.length, data.len() as u64);
        let mut content = client.content(again.length);
        assert_eq!(read_exactly(&mut content, data.len()).await.unwrap(), data);
    }

    #[tokio::test]
    async fn a_flight_that_fails_cuts_its_children_off() {
        let s = serve().await;
        let task = "d".repeat(64);
        let writer = s.storage.open_content_for_write(&task).await.unwrap();
        let flight = s.flights.begin(
            &task,
            FlightInfo {
                number: 2,
                offset: 0,
                length: 1000,
                digest: "crc32:1".into(),
                parent_id: "parent".into(),
            },
        );
        writer
            .write_at(0, bytes::Bytes::from(vec![7u8; 500]))
            .await
            .unwrap();
        flight.written(500);
        let mut client = d7y_vortex::Client::connect(s.addr, Duration::from_secs(3))
            .await
            .unwrap();
        let meta = client.request_piece(&task, 2).await.unwrap();
        let mut content = client.content(meta.length);
        assert_eq!(
            read_exactly(&mut content, 500).await.unwrap(),
            vec![7u8; 500]
        );
        drop(flight);
        assert!(
            read_exactly(&mut content, 500).await.is_err(),
            "the child must see the connection cut, not a whole piece"
        );
        drop(content);
        // The piece is gone from what this peer offers.
        let mut client = d7y_vortex::Client::connect(s.addr, Duration::from_secs(3))
            .await
            .unwrap();
        let err = client.request_piece(&task, 2).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }
}
