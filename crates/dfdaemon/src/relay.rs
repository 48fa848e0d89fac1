//! Cut-through relay: a piece that is still arriving from a parent can already be served
//! to children, byte range by byte range, as it reaches the content file.
//!
//! Without it a piece travels store-and-forward: each hop of a chain of peers adds a whole
//! piece time (4 MiB at 100 Mbit/s is 0.34 s), so the last of N peers finishes N piece
//! times after the first. With it a hop adds one write buffer (128 KiB by default).
//!
//! A [`Flight`] is registered once the parent's piece header has arrived, because only then
//! is the piece's digest known (it is the parent's; the bytes are checked against it here and
//! by every child). Pieces fetched from the origin are not relayed early: their digest is
//! known only at their end.
//!
//! **Invariants:**
//! - A reader never hands out a piece's last byte before the piece was verified here and
//!   recorded in storage, so a child never receives all of a piece that turned out corrupt:
//!   it sees a cut connection (a transfer error), not a digest mismatch it would blame on
//!   this peer.
//! - A reader follows one flight. If that flight fails, the reader fails, even when a new
//!   flight of the same piece starts, so waits only ever point at older flights (no cycles).

use bytes::BytesMut;
use futures_util::Stream;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// How far a flight has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes from the piece's start are in the content file.
    Written(u64),
    /// Whole, checked against its digest and recorded in storage.
    Verified,
    /// Given up; the bytes written so far are not to be trusted.
    Failed,
}

/// What a child is told about a piece in flight (the parent's header, passed on).
#[derive(Debug, Clone)]
pub struct FlightInfo {
    pub number: u32,
    pub offset: u64,
    pub length: u64,
    pub digest: String,
    pub parent_id: String,
}

/// One piece on its way into the content file.
pub struct Flight {
    pub info: FlightInfo,
    progress: watch::Sender<Progress>,
}

impl Flight {
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }
}

type Key = (String, u32);

/// Every piece in flight on this peer.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Key, Arc<Flight>>>,
}

impl Flights {
    /// Registers a piece whose bytes are about to arrive. The returned guard reports progress;
    /// dropping it before [`FlightGuard::verified`] fails the flight.
    pub fn begin(self: &Arc<Self>, task_id: &str, info: FlightInfo) -> FlightGuard {
        let key = (task_id.to_string(), info.number);
        let flight = Arc::new(Flight {
            info,
            progress: watch::Sender::new(Progress::Written(0)),
        });
        self.map
            .lock()
            .expect("flights lock")
            .insert(key.clone(), flight.clone());
        FlightGuard {
            flights: self.clone(),
            key,
            flight,
            done: false,
        }
    }

    /// The flight of a piece, if it is arriving now.
    pub fn get(&self, task_id: &str, number: u32) -> Option<Arc<Flight>> {
        self.map
            .lock()
            .expect("flights lock")
            .get(&(task_id.to_string(), number))
            .cloned()
    }

    fn remove(&self, key: &Key, flight: &Arc<Flight>) {
        let mut map = self.map.lock().expect("flights lock");
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("flights lock").len()
    }
}

/// The writer's handle on its flight.
pub struct FlightGuard {
    flights: Arc<Flights>,
    key: Key,
    flight: Arc<Flight>,
    done: bool,
}

impl FlightGuard {
    /// `bytes` from the piece's start are now in the content file.
    pub fn written(&self, bytes: u64) {
        self.flight.progress.send_replace(Progress::Written(bytes));
    }

    /// The piece is whole, verified and recorded in storage.
    pub fn verified(mut self) {
        self.done = true;
        self.flight.progress.send_replace(Progress::Verified);
        self.flights.remove(&self.key, &self.flight);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.done {
            self.flight.progress.send_replace(Progress::Failed);
            self.flights.remove(&self.key, &self.flight);
        }
    }
}

/// Reads a piece in flight from its content file (opened at the piece's offset) as its
/// bytes arrive: at most `chunk` bytes per item, the last byte only once verified, an error
/// if the flight fails.
pub fn follow(
    file: impl AsyncRead + Unpin + Send + 'static,
    flight: &Flight,
    chunk: usize,
) -> impl Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    struct State<R> {
        file: R,
        progress: watch::Receiver<Progress>,
        sent: u64,
        length: u64,
        chunk: usize,
    }
    let state = State {
        file,
        progress: flight.subscribe(),
        sent: 0,
        length: flight.info.length,
        chunk: chunk.max(1),
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if s.sent >= s.length {
                return None;
            }
            let progress = *s.progress.borrow_and_update();
            let allowed = match progress {
                Progress::Written(w) => w.min(s.length.saturating_sub(1)),
                Progress::Verified => s.length,
                Progress::Failed => {
                    let err = std::io::Error::other("the piece failed upstream while relayed");
                    return Some((Err(err), s));
                }
            };
            if s.sent < allowed {
                let want = (allowed - s.sent).min(s.chunk as u64) as usize;
                let mut buf = BytesMut::with_capacity(want);
                let mut limited = (&mut s.file).take(want as u64);
                while buf.len() < want {
                    match limited.read_buf(&mut buf).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => return Some((Err(e), s)),
                    }
                }
                if buf.len() < want {
                    let err = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "content file shorter than the bytes written to it",
                    );
                    return Some((Err(err), s));
                }
                s.sent += want as u64;
                return Some((Ok(buf.freeze()), s));
            }
            if s.progress.changed().await.is_err() {
                // The flight was dropped without a verdict: treat as failed.
                let err = std::io::Error::other("the piece's download ended while relayed");
                return Some((Err(err), s));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::time::Duration;

    fn info(length: u64) -> FlightInfo {
        FlightInfo {
            number: 3,
            offset: 0,
            length,
            digest: "crc32:0".into(),
            parent_id: "p".into(),
        }
    }

    async fn next_within(
        s: &mut (impl Stream<Item = std::io::Result<bytes::Bytes>> + Unpin),
    ) -> Option<Option<std::io::Result<bytes::Bytes>>> {
        tokio::time::timeout(Duration::from_millis(100), s.next())
            .await
            .ok()
    }

    #[tokio::test]
    async fn follows_writes_and_holds_the_last_byte_until_verified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let file = std::fs::File::create(&path).unwrap();
        let flights = Arc::new(Flights::default());
        let guard = flights.begin("task", info(10));
        let flight = flights.get("task", 3).expect("registered");
        let reader = tokio::fs::File::open(&path).await.unwrap();
        let mut s = Box::pin(follow(reader, &flight, 4));

        // Nothing written: the reader waits.
        assert!(next_within(&mut s).await.is_none());
        file.write_all_at(b"012345", 0).unwrap();
        guard.written(6);
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"0123");
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"45");
        // All ten written but not verified: nine go, the last waits.
        file.write_all_at(b"6789", 6).unwrap();
        guard.written(10);
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"678");
        assert!(next_within(&mut s).await.is_none());
        guard.verified();
        assert!(flights.get("task", 3).is_none());
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"9");
        assert!(s.next().await.is_none());
        drop(file);
    }

    #[tokio::test]
    async fn a_failed_flight_fails_its_readers_and_not_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(b"abcdefgh").unwrap();
        let flights = Arc::new(Flights::default());
        let first = flights.begin("task", info(8));
        let old = flights.get("task", 3).unwrap();
        let mut s = Box::pin(follow(tokio::fs::File::open(&path).await.unwrap(), &old, 8));
        first.written(4);
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"abcd");

        // A retry registers a new flight before the old guard is dropped.
        let second = flights.begin("task", info(8));
        drop(first);
        assert!(s.next().await.unwrap().is_err(), "old reader must fail");
        let new = flights.get("task", 3).expect("the retry stays registered");
        assert!(!Arc::ptr_eq(&new, &old));
        second.written(8);
        second.verified();
        assert_eq!(flights.len(), 0);
        let mut s = Box::pin(follow(tokio::fs::File::open(&path).await.unwrap(), &new, 8));
        assert_eq!(&s.next().await.unwrap().unwrap()[..], b"abcdefgh");
    }
}
