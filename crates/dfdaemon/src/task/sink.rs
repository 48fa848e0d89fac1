//! One piece's bytes on their way into the content file: gathered into write-buffer-sized
//! writes at the piece's offset, hashed, and throttled once per write. Used by both the
//! back-to-source paths and the peer-to-peer fetch, which also reports each write to the
//! piece's [`crate::relay`] flight.

use crate::ratelimit::Bandwidth;
use crate::relay::FlightGuard;
use bytes::BytesMut;
use d7y_storage::{ContentWriter, StorageError};
use tokio::io::{AsyncRead, AsyncReadExt};

pub(super) struct PieceSink<'a> {
    writer: &'a ContentWriter,
    limits: &'a [&'a Bandwidth],
    offset: u64,
    flushed: u64,
    cap: usize,
    buf: BytesMut,
    hasher: crc32fast::Hasher,
    flight: Option<&'a FlightGuard>,
}

impl<'a> PieceSink<'a> {
    /// A sink for the piece of `length` bytes at `offset`, writing `storage.writeBufferSize`
    /// bytes at a time (at least 64 KiB, at most the piece) after waiting for every limit in
    /// `limits`.
    pub(super) fn new(
        writer: &'a ContentWriter,
        limits: &'a [&'a Bandwidth],
        offset: u64,
        length: u64,
        write_buffer_size: usize,
    ) -> PieceSink<'a> {
        let cap = (write_buffer_size as u64).min(length).max(64 * 1024) as usize;
        PieceSink {
            writer,
            limits,
            offset,
            flushed: 0,
            cap,
            buf: BytesMut::with_capacity(cap),
            hasher: crc32fast::Hasher::new(),
            flight: None,
        }
    }

    /// Reports every write to `flight`, so children can be sent the bytes at once.
    pub(super) fn relaying(mut self, flight: &'a FlightGuard) -> Self {
        self.flight = Some(flight);
        self
    }

    /// Bytes received so far.
    pub(super) fn len(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    /// Adds bytes received elsewhere (a copy into the buffer).
    pub(super) async fn push(&mut self, chunk: &[u8]) -> Result<(), StorageError> {
        self.hasher.update(chunk);
        self.buf.extend_from_slice(chunk);
        self.flush_if_full().await
    }

    /// Reads once from `reader` into the buffer without writing it out; returns the bytes
    /// read (0 at its end). Dropping this future never leaves a write behind (the caller
    /// then calls [`PieceSink::flush_if_full`]).
    pub(super) async fn read(
        &mut self,
        reader: &mut (impl AsyncRead + Unpin),
    ) -> std::io::Result<usize> {
        self.buf.reserve(self.cap.saturating_sub(self.buf.len()));
        let start = self.buf.len();
        let n = reader.read_buf(&mut self.buf).await?;
        self.hasher.update(&self.buf[start..]);
        Ok(n)
    }

    /// Writes the buffer out once it is full.
    pub(super) async fn flush_if_full(&mut self) -> Result<(), StorageError> {
        if self.buf.len() >= self.cap {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // The buffer's allocation is reused: a buffer that stays in the CPU cache is what
        // makes the kernel's copy into the page cache cheap.
        let data = self.buf.split().freeze();
        for limit in self.limits {
            limit.acquire(data.len()).await;
        }
        let n = data.len() as u64;
        self.writer
            .write_at(self.offset + self.flushed, data)
            .await?;
        self.flushed += n;
        if let Some(flight) = self.flight {
            flight.written(self.flushed);
        }
        self.buf.reserve(self.cap);
        Ok(())
    }

    /// Writes what is left and returns the piece's length and CRC-32.
    pub(super) async fn finish(mut self) -> Result<(u64, u32), StorageError> {
        self.flush().await?;
        Ok((self.flushed, self.hasher.finalize()))
    }
}
