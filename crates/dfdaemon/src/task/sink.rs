//! One piece's bytes on their way into the content file: gathered into write-buffer-sized
//! writes at the piece's offset, hashed, and throttled once per write.

use crate::error::TaskError;
use crate::ratelimit::Bandwidth;
use bytes::BytesMut;
use d7y_storage::ContentWriter;

pub(super) struct PieceSink<'a> {
    writer: &'a ContentWriter,
    limits: &'a [&'a Bandwidth],
    offset: u64,
    flushed: u64,
    cap: usize,
    buf: BytesMut,
    hasher: crc32fast::Hasher,
}

impl<'a> PieceSink<'a> {
    /// A sink for the piece at `offset`, writing `cap` bytes at a time after waiting for
    /// every limit in `limits`.
    pub(super) fn new(
        writer: &'a ContentWriter,
        limits: &'a [&'a Bandwidth],
        offset: u64,
        cap: usize,
    ) -> PieceSink<'a> {
        PieceSink {
            writer,
            limits,
            offset,
            flushed: 0,
            cap,
            buf: BytesMut::with_capacity(cap),
            hasher: crc32fast::Hasher::new(),
        }
    }

    /// Bytes received so far.
    pub(super) fn len(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    pub(super) async fn push(&mut self, chunk: &[u8]) -> Result<(), TaskError> {
        self.hasher.update(chunk);
        self.buf.extend_from_slice(chunk);
        if self.buf.len() >= self.cap {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TaskError> {
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
        self.buf.reserve(self.cap);
        Ok(())
    }

    /// Writes what is left and returns the piece's length and CRC-32.
    pub(super) async fn finish(mut self) -> Result<(u64, u32), TaskError> {
        self.flush().await?;
        Ok((self.flushed, self.hasher.finalize()))
    }
}
