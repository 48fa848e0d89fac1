//! The origin's side of a download: the probe (length, Range support), the task's storage
//! prepared for pieces, one piece as a ranged GET ([`fetch_piece`], a source of the piece
//! loop in [`super::p2p`]), and the whole content as one streamed GET cut into pieces when
//! the origin takes no ranges ([`transfer`]). Pieces already in storage (an interrupted
//! earlier run) are not fetched again.

use super::sink::PieceSink;
use super::{DownloadPlan, TaskManager, TaskRun};
use crate::error::TaskError;
use crate::ratelimit::Bandwidth;
use bytes::Bytes;
use d7y_backend::{BackendError, Probe, SourceRequest};
use d7y_storage::{now_secs, ContentWriter, PieceMeta, TaskMeta};
use d7y_types::piece::{piece_length_for, MIN_PIECE_LENGTH};
use d7y_types::{Digest, PieceLayout};
use dragonfly_api::common::v2::TrafficType;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::time::Instant;
use tracing::{debug, warn};

/// Attempts per piece (the backend retries establishing each request on its own).
const PIECE_ATTEMPTS: u32 = 3;

/// A download with no scheduler configured: the piece loop with the origin as its only
/// source.
pub(super) async fn download(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
) -> Result<(), TaskError> {
    if plan.disable_back_to_source {
        return Err(TaskError::BackToSourceDisabled);
    }
    let probe = probe(mgr, plan).await?;
    let content_length = probe.stat.content_length;
    super::p2p::standalone(mgr, run, plan, probe, content_length).await
}

/// Piece `number` of `layout` from the origin (a ranged GET, retried), written, recorded
/// and published.
pub(super) async fn fetch_piece(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    request: &SourceRequest,
    writer: &ContentWriter,
    layout: PieceLayout,
    number: u32,
) -> Result<PieceMeta, TaskError> {
    let ctx = Ctx {
        mgr,
        run,
        plan,
        request,
        writer,
    };
    ctx.ranged_piece(layout, number).await
}

/// Asks the origin for the length and Range support (a one-byte ranged GET).
pub(super) async fn probe(mgr: &TaskManager, plan: &DownloadPlan) -> Result<Probe, TaskError> {
    let request = plan.source_request();
    let scheme = plan.url.scheme().to_string();
    mgr.metrics
        .backend_request_total
        .with_label_values(&[&scheme, "GET"])
        .inc();
    Ok(mgr
        .backend
        .probe(&request, mgr.config.download.piece_timeout)
        .await
        .inspect_err(|_| {
            mgr.metrics
                .backend_request_failure_total
                .with_label_values(&[&scheme, "GET"])
                .inc();
        })?)
}

/// A task's storage, ready for pieces: metadata written, content file sized, and the
/// pieces an interrupted earlier run left behind.
pub(super) struct Prepared {
    pub meta: TaskMeta,
    pub writer: ContentWriter,
    pub piece_length: u64,
    pub content_length: Option<u64>,
}

/// Opens (or resumes) a task's storage for a content of `content_length` bytes and publishes
/// the run as started with the pieces already stored.
pub(super) async fn prepare(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    content_length: Option<u64>,
    response_header: Vec<(String, String)>,
) -> Result<Prepared, TaskError> {
    let piece_length = plan.piece_length.unwrap_or_else(|| {
        content_length
            .map(piece_length_for)
            .unwrap_or(MIN_PIECE_LENGTH)
    });
    let task_id = &plan.task_id;
    let storage = &mgr.storage;
    let previous = storage.task(task_id).await?;
    // Pieces left by an earlier run are checked once (a crash may have lost their bytes).
    storage.verify_task(task_id).await?;
    let mut existing = storage.pieces(task_id).await?;
    if let Some(prev) = &previous {
        if prev.content_length != content_length || prev.piece_length != Some(piece_length) {
            if !existing.is_empty() {
                warn!(
                    task_id,
                    "origin content changed since the interrupted download, starting over"
                );
            }
            storage.clear_pieces(task_id).await?;
            existing.clear();
        }
    }
    if content_length.is_none() {
        // Offsets of a stream of unknown length cannot be trusted across runs.
        storage.clear_pieces(task_id).await?;
        existing.clear();
    }
    let mut meta = previous.unwrap_or_else(|| TaskMeta::new(task_id.clone(), plan.url.to_string()));
    meta.url = plan.url.to_string();
    meta.content_length = content_length;
    meta.piece_length = Some(piece_length);
    meta.response_header = response_header.clone();
    meta.accessed_at = now_secs();
    meta.finished_at = None;
    storage.put_task(meta.clone()).await?;

    let writer = storage.open_content_for_write(task_id).await?;
    if let Some(len) = content_length {
        writer.set_len(len).await?;
    }
    if !existing.is_empty() {
        debug!(
            task_id,
            pieces = existing.len(),
            "resuming with pieces from an earlier run"
        );
    }
    run.set_started(content_length, piece_length, response_header, existing);
    Ok(Prepared {
        meta,
        writer,
        piece_length,
        content_length,
    })
}

/// Streams the content from the origin (one GET, the probe's body when it sent one),
/// storing every piece the run does not have yet. Returns when the content is complete; a
/// content of unknown length gets its length recorded.
pub(super) async fn transfer(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    prepared: &mut Prepared,
    probe: Probe,
) -> Result<(), TaskError> {
    let request = plan.source_request();
    let have: HashSet<u32> = run.state().pieces.iter().map(|p| p.number).collect();
    let ctx = Ctx {
        mgr,
        run,
        plan,
        request: &request,
        writer: &prepared.writer,
    };
    let piece_length = prepared.piece_length;
    let content_length = prepared.content_length;
    let total = ctx
        .streamed(probe.full_body, piece_length, content_length, have)
        .await?;
    if content_length.is_none() {
        prepared.writer.set_len(total).await?;
        prepared.meta.content_length = Some(total);
        prepared.content_length = Some(total);
        run.set_content_length(total);
    }
    Ok(())
}

struct Ctx<'a> {
    mgr: &'a TaskManager,
    run: &'a TaskRun,
    plan: &'a DownloadPlan,
    request: &'a SourceRequest,
    writer: &'a ContentWriter,
}

impl Ctx<'_> {
    /// A sink for the piece at `offset`, limited by the back-to-source and download limits.
    fn sink<'s>(
        &'s self,
        limits: &'s [&'s Bandwidth],
        offset: u64,
        piece_length: u64,
    ) -> PieceSink<'s> {
        let write_buffer_size = self.mgr.config.storage.write_buffer_size;
        PieceSink::new(self.writer, limits, offset, piece_length, write_buffer_size)
    }

    fn limits(&self) -> [&Bandwidth; 2] {
        [&self.mgr.source_bandwidth, &self.mgr.download_bandwidth]
    }

    /// Records a written piece and makes it visible.
    async fn commit(
        &self,
        number: u32,
        offset: u64,
        length: u64,
        crc: u32,
        started: Instant,
    ) -> Result<PieceMeta, TaskError> {
        let mut piece = PieceMeta::new(number, offset, length, Digest::crc32(crc).to_string());
        piece.traffic_type = TrafficType::BackToSource as i32;
        piece.cost_millis = started.elapsed().as_millis() as u64;
        self.mgr
            .record_piece(
                self.run,
                &self.plan.task_id,
                piece.clone(),
                "BACK_TO_SOURCE",
            )
            .await?;
        Ok(piece)
    }

    async fn ranged_piece(&self, layout: PieceLayout, number: u32) -> Result<PieceMeta, TaskError> {
        let (offset, length) = layout
            .range(number)
            .map_err(|e| TaskError::Internal(e.to_string()))?;
        let timeout = self.mgr.config.download.piece_timeout;
        let mut attempt = 1;
        loop {
            let started = Instant::now();
            let result = tokio::time::timeout(timeout, self.fetch_range(offset, length)).await;
            let err = match result {
                Ok(Ok(crc)) => return self.commit(number, offset, length, crc, started).await,
                Ok(Err(err)) => err,
                Err(_) => TaskError::PieceTimeout {
                    number,
                    seconds: timeout.as_secs(),
                },
            };
            let retryable = match &err {
                TaskError::Backend(e) => e.retryable(),
                TaskError::PieceTimeout { .. } => true,
                _ => false,
            };
            if !retryable || attempt >= PIECE_ATTEMPTS {
                return Err(err);
            }
            debug!(number, attempt, %err, "piece from source failed, retrying");
            tokio::time::sleep(std::time::Duration::from_millis(200 * attempt as u64)).await;
            attempt += 1;
        }
    }

    /// Fetches one range into the content file; returns its CRC-32.
    async fn fetch_range(&self, offset: u64, length: u64) -> Result<u32, TaskError> {
        let timeout = self.mgr.config.download.piece_timeout;
        let scheme = self.plan.url.scheme();
        self.mgr
            .metrics
            .backend_request_total
            .with_label_values(&[scheme, "GET"])
            .inc();
        let mut body = self
            .mgr
            .backend
            .get_range(self.request, offset, length, timeout)
            .await
            .inspect_err(|_| {
                self.mgr
                    .metrics
                    .backend_request_failure_total
                    .with_label_values(&[scheme, "GET"])
                    .inc();
            })?;
        let limits = self.limits();
        let mut sink = self.sink(&limits, offset, length);
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if sink.len() + chunk.len() as u64 > length {
                return Err(TaskError::LengthMismatch {
                    url: self.plan.url.to_string(),
                    expected: length,
                    actual: sink.len() + chunk.len() as u64,
                });
            }
            sink.push(&chunk).await?;
        }
        if sink.len() != length {
            return Err(BackendError::Body {
                url: self.plan.url.to_string(),
                reason: format!("connection closed after {} of {length} bytes", sink.len()),
            }
            .into());
        }
        Ok(sink.finish().await?.1)
    }

    /// Streams the whole body, retrying from the start (skipping finished pieces) when the
    /// stream breaks. Returns the total length.
    async fn streamed(
        &self,
        mut first: Option<d7y_backend::BodyStream>,
        piece_length: u64,
        expected: Option<u64>,
        mut have: HashSet<u32>,
    ) -> Result<u64, TaskError> {
        let mut attempt = 1;
        loop {
            let body = match first.take() {
                Some(body) => body,
                None => {
                    let timeout = self.mgr.config.download.piece_timeout;
                    self.mgr.backend.get(self.request, timeout).await?
                }
            };
            match self
                .stream_once(body, piece_length, expected, &mut have)
                .await
            {
                Ok(total) => return Ok(total),
                Err(TaskError::Backend(err)) if err.retryable() && attempt < PIECE_ATTEMPTS => {
                    debug!(attempt, %err, "source stream broke, streaming again");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn stream_once(
        &self,
        mut body: d7y_backend::BodyStream,
        piece_length: u64,
        expected: Option<u64>,
        have: &mut HashSet<u32>,
    ) -> Result<u64, TaskError> {
        let idle = self.mgr.config.download.piece_timeout;
        let limits = self.limits();
        let mut number = 0u32;
        let mut piece_start = 0u64;
        let mut in_piece = 0u64;
        // None while skipping a piece an earlier run already stored.
        let mut sink = (!have.contains(&0)).then(|| self.sink(&limits, 0, piece_length));
        let mut started = Instant::now();
        loop {
            let next = tokio::time::timeout(idle, body.next()).await.map_err(|_| {
                TaskError::Backend(BackendError::Timeout {
                    url: self.plan.url.to_string(),
                    timeout: idle,
                })
            })?;
            let Some(chunk) = next else { break };
            let mut chunk: Bytes = chunk?;
            while !chunk.is_empty() {
                let take = ((piece_length - in_piece) as usize).min(chunk.len());
                let part = chunk.split_to(take);
                in_piece += take as u64;
                if let Some(limit) = expected {
                    if piece_start + in_piece > limit {
                        return Err(TaskError::LengthMismatch {
                            url: self.plan.url.to_string(),
                            expected: limit,
                            actual: piece_start + in_piece,
                        });
                    }
                }
                if let Some(sink) = sink.as_mut() {
                    sink.push(&part).await?;
                }
                if in_piece == piece_length {
                    self.end_piece(number, piece_start, sink.take(), started, have)
                        .await?;
                    number += 1;
                    piece_start += in_piece;
                    in_piece = 0;
                    sink = (!have.contains(&number))
                        .then(|| self.sink(&limits, piece_start, piece_length));
                    started = Instant::now();
                }
            }
        }
        if in_piece > 0 {
            self.end_piece(number, piece_start, sink.take(), started, have)
                .await?;
        }
        let total = piece_start + in_piece;
        if let Some(limit) = expected {
            if total != limit {
                return Err(BackendError::Body {
                    url: self.plan.url.to_string(),
                    reason: format!("connection closed after {total} of {limit} bytes"),
                }
                .into());
            }
        }
        Ok(total)
    }

    /// Records a streamed piece (unless it was already stored: no sink).
    async fn end_piece(
        &self,
        number: u32,
        offset: u64,
        sink: Option<PieceSink<'_>>,
        started: Instant,
        have: &mut HashSet<u32>,
    ) -> Result<(), TaskError> {
        let Some(sink) = sink else { return Ok(()) };
        let (length, crc) = sink.finish().await?;
        self.commit(number, offset, length, crc, started).await?;
        have.insert(number);
        Ok(())
    }
}
