//! The Vortex piece server's view of local storage: finished pieces only, an upload-slot
//! limit, the upload bandwidth limit and upload metrics.

use crate::host::Traffic;
use crate::metrics::Metrics;
use crate::ratelimit::Bandwidth;
use chrono::DateTime;
use d7y_storage::Storage;
use d7y_vortex::{OpenedPiece, PieceMetadata, PieceProvider, ServeError};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

pub struct StoragePieces {
    pub storage: Storage,
    pub metrics: Arc<Metrics>,
    pub traffic: Arc<Traffic>,
    pub bandwidth: Bandwidth,
    pub slots: Arc<Semaphore>,
    pub disable_shared: bool,
    pub buffer_size: usize,
    /// Seed peers: told which pieces children asked for.
    pub super_seed: Option<Arc<crate::superseed::SuperSeed>>,
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
        let piece = self
            .storage
            .piece(task_id, number)
            .await
            .map_err(|e| fail(ServeError::internal(e.to_string())))?
            .ok_or_else(|| {
                fail(ServeError::not_found(format!(
                    "piece {number} of task {task_id} is not here"
                )))
            })?;
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ServeError::internal("shutting down"))?;
        let lease = self.storage.lease(task_id);
        let file = self
            .storage
            .open_content_at(task_id, piece.offset)
            .await
            .map_err(|e| fail(ServeError::internal(e.to_string())))?;
        self.storage.touch(task_id);
        self.metrics
            .upload_piece_total
            .with_label_values(&["STANDARD"])
            .inc();
        self.metrics.concurrent_upload_piece_total.inc();
        let metadata = PieceMetadata {
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
        };
        Ok(OpenedPiece {
            metadata,
            reader: Box::pin(
                tokio::io::BufReader::with_capacity(self.buffer_size, file).take(piece.length),
            ),
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
