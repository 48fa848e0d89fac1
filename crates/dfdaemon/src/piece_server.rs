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
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Semaphore;
use tokio_util::io::{InspectReader, StreamReader};

pub struct StoragePieces {
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
    pub traffic: Arc<Traffic>,
    pub bandwidth: Bandwidth,
    pub slots: Arc<Semaphore>,
    /// The number of upload slots `slots` started with.
    pub total_slots: usize,
    pub disable_shared: bool,
    pub buffer_size: usize,
    /// Pieces still arriving here, served as they arrive.
    pub flights: Arc<crate::relay::Flights>,
    /// Seed peers: told which pieces children asked for.
    pub super_seed: Option<Arc<crate::superseed::SuperSeed>>,
    /// Pieces being served, by child address: one address gets at most a quarter of the
    /// upload slots, so a stranger holding connections open cannot starve the others.
    pub per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl StoragePieces {
    /// Upload slots one address may hold at once.
    fn per_ip_limit(&self, slots: usize) -> usize {
        (slots / 4).max(1)
    }
}

/// Counts a piece being served to an address.
struct AddressSlot {
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// How long a request waits for an upload slot before the child is told to go elsewhere.
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// Where a requested piece is.
enum Found {
    Stored(d7y_storage::PieceMeta),
    Flight(Arc<crate::relay::Flight>),
}

struct UploadGuard {
    _address: AddressSlot,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _lease: d7y_storage::TaskLease,
    _serve_end: Option<ServeEnd>,
    metrics: Arc<Metrics>,
}

/// On a seed peer: tells the dealer when a serve ends and whether every byte of the piece
/// was read out to the child (a serve that lags or ends short frees its piece).
struct ServeEnd {
    seed: Arc<crate::superseed::SuperSeed>,
    task_id: String,
    number: u32,
    length: u64,
    read: Arc<AtomicU64>,
}

impl Drop for ServeEnd {
    fn drop(&mut self) {
        let complete = self.read.load(Ordering::Relaxed) >= self.length;
        self.seed.sent(&self.task_id, self.number, complete);
    }
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.metrics.concurrent_upload_piece_total.dec();
    }
}

impl PieceProvider for StoragePieces {
    async fn open(
        &self,
        task_id: &str,
        number: u32,
        from: IpAddr,
    ) -> Result<OpenedPiece, ServeError> {
        if self.disable_shared {
            return Err(ServeError::not_found("this peer does not share its tasks"));
        }
        if !d7y_types::is_task_id(task_id) {
            return Err(ServeError {
                code: d7y_vortex::Code::InvalidArgument,
                message: "the task ID must be 64 lowercase hex characters".into(),
            });
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
        let not_here = || {
            fail(ServeError::not_found(format!(
                "piece {number} of task {task_id} is not here"
            )))
        };
        let found = match self.flights.get(task_id, number) {
            Some(flight) => Found::Flight(flight),
            None => {
                let piece = self
                    .storage
                    .piece(task_id, number)
                    .await
                    .map_err(|e| fail(ServeError::internal(e.to_string())))?
                    .ok_or_else(not_here)?;
                // A piece from before a restart is served once its bytes match its CRC.
                let intact = self
                    .storage
                    .check_piece(task_id, &piece)
                    .await
                    .map_err(|e| fail(ServeError::internal(e.to_string())))?;
                if !intact {
                    return Err(not_here());
                }
                Found::Stored(piece)
            }
        };
        // Only a piece that is here is worth remembering (the super-seeding map is keyed
        // by what children ask for).
        if let Some(seed) = &self.super_seed {
            seed.served(task_id, number);
        }
        let address = {
            let limit = self.per_ip_limit(self.total_slots);
            let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(from).or_default();
            if *n >= limit {
                return Err(ServeError::internal(format!(
                    "{from} already has {limit} pieces in flight here; try another parent"
                )));
            }
            *n += 1;
            AddressSlot {
                per_ip: self.per_ip.clone(),
                ip: from,
            }
        };
        let permit = match tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(ServeError::internal("shutting down")),
            Err(_) => {
                return Err(ServeError::internal(
                    "every upload slot is busy; try another parent",
                ))
            }
        };
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
        let (reader, serve_end) = match &self.super_seed {
            Some(seed) => {
                let read = Arc::new(AtomicU64::new(0));
                let counter = read.clone();
                let reader: Pin<Box<dyn AsyncRead + Send>> =
                    Box::pin(InspectReader::new(reader, move |bytes: &[u8]| {
                        counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }));
                let end = ServeEnd {
                    seed: seed.clone(),
                    task_id: task_id.to_string(),
                    number,
                    length: metadata.length,
                    read,
                };
                (reader, Some(end))
            }
            None => (reader, None),
        };
        Ok(OpenedPiece {
            metadata,
            reader,
            guard: Box::new(UploadGuard {
                _address: address,
                _permit: permit,
                _lease: lease,
                _serve_end: serve_end,
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Served {
        storage: Storage,
        flights: Arc<Flights>,
        addr: std::net::SocketAddr,
        _dir: tempfile::TempDir,
    }

    async fn serve() -> Served {
        serve_with(4, d7y_vortex::ServerLimits::default()).await
    }

    async fn serve_with(slots: usize, limits: d7y_vortex::ServerLimits) -> Served {
        serve_as(slots, limits, None).await
    }

    async fn serve_as(
        slots: usize,
        limits: d7y_vortex::ServerLimits,
        super_seed: Option<Arc<crate::superseed::SuperSeed>>,
    ) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), true).unwrap();
        let flights = Arc::new(Flights::default());
        let provider = Arc::new(StoragePieces {
            storage: storage.clone(),
            metrics: Arc::new(Metrics::new()),
            traffic: Arc::default(),
            bandwidth: Bandwidth::new(u64::MAX),
            slots: Arc::new(Semaphore::new(slots)),
            total_slots: slots,
            per_ip: Arc::default(),
            disable_shared: false,
            buffer_size: 64 * 1024,
            flights: flights.clone(),
            super_seed,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(d7y_vortex::serve(listener, provider, limits, None));
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

    /// Stores a finished piece 0 of `len` bytes for `task`.
    async fn store_piece(s: &Served, task: &str, len: usize) -> Vec<u8> {
        let data: Vec<u8> = (0..len as u32).map(|i| (i % 253) as u8).collect();
        store_pieces(s, task, &[&data]).await;
        data
    }

    /// Stores finished pieces 0, 1, ... with these contents, one after another, for `task`.
    async fn store_pieces(s: &Served, task: &str, pieces: &[&[u8]]) {
        let writer = s.storage.open_content_for_write(task).await.unwrap();
        let mut offset = 0u64;
        for (number, data) in pieces.iter().enumerate() {
            writer
                .write_at(offset, bytes::Bytes::copy_from_slice(data))
                .await
                .unwrap();
            let digest = d7y_types::Digest::crc32(crc32fast::hash(data)).to_string();
            let len = data.len() as u64;
            let meta = d7y_storage::PieceMeta::new(number as u32, offset, len, digest);
            s.storage.put_piece(task, meta).await.unwrap();
            offset += len;
        }
    }

    /// Requests a piece on a new connection and reads its first 64 KiB; the rest stays
    /// unread (the serve hangs) until the returned connection is dropped.
    async fn start_reading(s: &Served, task: &str, number: u32) -> d7y_vortex::Client {
        let mut client = d7y_vortex::Client::connect(s.addr, Duration::from_secs(3))
            .await
            .unwrap();
        let meta = client.request_piece(task, number).await.unwrap();
        read_exactly(&mut client.content(meta.length), 64 << 10)
            .await
            .unwrap();
        client
    }

    /// Waits (up to 5 s) until `ok` holds, looking every 10 ms; returns how long it took.
    async fn until(mut ok: impl FnMut() -> bool) -> Duration {
        let start = std::time::Instant::now();
        while !ok() {
            assert!(start.elapsed() < Duration::from_secs(5), "never happened");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        start.elapsed()
    }

    #[tokio::test]
    async fn a_seeds_serve_that_ends_short_or_lags_at_the_end_frees_its_piece_for_everyone() {
        use crate::superseed::SuperSeed;
        let seed = Arc::new(SuperSeed::default());
        let s = serve_as(4, d7y_vortex::ServerLimits::default(), Some(seed.clone())).await;
        const BIG: usize = 32 << 20; // more than the sockets between here and the child hold

        // A serve that ends short: the child hangs up after 64 KiB. Nothing is measured for
        // this task, so only the short end can free the piece before the grace (12 s).
        let task = "e".repeat(64);
        store_pieces(&s, &task, &[&vec![0; BIG]]).await;
        seed.join(&task, "a");
        seed.join(&task, "b");
        assert_eq!(seed.release_at(&task, "a", 0, Some(8)), None, "dealt to a");
        let client = start_reading(&s, &task, 0).await;
        assert!(
            seed.release_at(&task, "b", 0, Some(8)).is_some(),
            "held from b"
        );
        drop(client);
        until(|| seed.release_at(&task, "b", 0, Some(8)).is_none()).await;

        // A serve that lags: a whole small piece measures the usual serve (well under the
        // 1 s floor), then a big one is read 64 KiB and left hanging. With no fresh piece
        // left to deal (three pieces: 0 and 1 dealt to a, 2 to b), once it has run the floor
        // the others are told of it.
        let task = "f".repeat(64);
        let small = vec![0; 64 << 10];
        store_pieces(&s, &task, &[&small, &vec![1; BIG], &small]).await;
        seed.join(&task, "a");
        seed.join(&task, "b");
        for n in [0, 1] {
            assert_eq!(seed.release_at(&task, "a", n, Some(3)), None, "dealt to a");
        }
        assert_eq!(seed.release_at(&task, "b", 2, Some(3)), None, "dealt to b");
        drop(start_reading(&s, &task, 0).await);
        until(|| seed.usual_serve(&task).is_some()).await;
        assert!(
            seed.release_at(&task, "b", 0, Some(3)).is_some(),
            "0 ended in time"
        );
        let client = start_reading(&s, &task, 1).await;
        let took = until(|| seed.release_at(&task, "b", 1, Some(3)).is_none()).await;
        assert!(
            took >= Duration::from_millis(800),
            "{took:?}: freed before it lagged"
        );
        drop(client);
    }

    /// A raw connection from `ip` (any 127.0.0.0/8 address is local).
    async fn connect_from(ip: &str, addr: std::net::SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// Whether the server closes (or refuses) the connection within `within`.
    async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {} // an error packet or piece bytes: keep reading to the end
            }
        }
    }

    #[tokio::test]
    async fn strangers_are_capped_idle_ones_closed_and_a_good_child_still_served() {
        let limits = d7y_vortex::ServerLimits {
            max_connections: 100,
            max_connections_per_ip: 20,
            idle_timeout: Duration::from_millis(800),
            write_timeout: Duration::from_millis(800),
        };
        let s = serve_with(2, limits).await;
        let task = "e".repeat(64);
        // Larger than the socket buffers, so a child that does not read blocks the write.
        let data = store_piece(&s, &task, 16 * 1024 * 1024).await;

        // 20 connections from one address ask for the piece and never read; 20 more sit
        // idle; the next ones are refused at once.
        let mut stalled = Vec::new();
        for _ in 0..20 {
            let mut c = connect_from("127.0.0.1", s.addr).await;
            let request = d7y_vortex::encode_request(&task, 0);
            c.write_all(&request).await.unwrap();
            stalled.push(c);
        }
        let mut refused = 0;
        for _ in 0..20 {
            let mut c = connect_from("127.0.0.1", s.addr).await;
            if closed_within(&mut c, Duration::from_millis(300)).await {
                refused += 1;
            }
        }
        assert_eq!(
            refused, 20,
            "connections beyond the per-address cap must be refused"
        );

        // A well-behaved child on another address gets the piece, even with both upload
        // slots taken by stalled strangers (their writes time out and free them).
        let started = std::time::Instant::now();
        let mut client = d7y_vortex::Client::connect_from(
            s.addr,
            Some("127.0.0.2".parse().unwrap()),
            Duration::from_secs(3),
        )
        .await
        .unwrap();
        let (meta, got) = client.fetch_piece(&task, 0).await.unwrap();
        assert_eq!(meta.length, data.len() as u64);
        assert!(got == data);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        // The stalled and idle connections are closed within their timeouts.
        let mut idle = connect_from("127.0.0.3", s.addr).await;
        assert!(
            closed_within(&mut idle, Duration::from_secs(3)).await,
            "idle kept open"
        );
        for mut c in stalled {
            // Drain what was buffered: the server must have cut the piece short.
            let mut total = 0usize;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => total += n,
                    Err(_) => panic!("a stalled connection was kept open"),
                }
            }
            assert!(
                total < data.len(),
                "a stalled child was sent the whole piece"
            );
        }
    }

    #[tokio::test]
    async fn malformed_task_ids_are_refused_before_any_lookup() {
        let s = serve().await;
        let mut client = d7y_vortex::Client::connect(s.addr, Duration::from_secs(3))
            .await
            .unwrap();
        let err = client.request_piece(&"Z".repeat(64), 0).await.unwrap_err();
        assert!(err.to_string().contains("64 lowercase hex"), "{err}");
    }
}
