//! Reading a task's content in order while it downloads: what the proxy sends its clients.
//!
//! Bytes leave only once their piece is recorded (whole and CRC-checked), and the last
//! chunk of a stream only once the task is finished, that is, once its content matched
//! every digest known for it ([`super::TaskManager::mark_finished`]). A download that fails
//! ends the stream with an error before its end, so a reader never sees a clean end of a
//! wrong body.

use super::{TaskManager, TaskRun};
use crate::error::TaskError;
use bytes::{Bytes, BytesMut};
use d7y_types::PieceLayout;
use std::ops::Range;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// What a stream carries: content chunks, or the error that ends it early.
pub type Chunk = Result<Bytes, std::io::Error>;

/// Sends bytes `range` of the run's content to `tx` in chunks of at most `chunk_size`.
/// Returns how many bytes were sent; an `Err` also went down `tx` (unless the reader left).
pub async fn stream_range(
    mgr: Arc<TaskManager>,
    run: Arc<TaskRun>,
    range: Range<u64>,
    chunk_size: usize,
    tx: mpsc::Sender<Chunk>,
) -> Result<u64, TaskError> {
    let result = send_range(&mgr, &run, range, chunk_size, &tx).await;
    if let Err(err) = &result {
        let _ = tx.send(Err(std::io::Error::other(err.to_string()))).await;
    }
    result
}

async fn send_range(
    mgr: &TaskManager,
    run: &TaskRun,
    range: Range<u64>,
    chunk_size: usize,
    tx: &mpsc::Sender<Chunk>,
) -> Result<u64, TaskError> {
    let _lease = mgr.storage().lease(&run.task_id);
    let mut rx = run.subscribe();
    let (content_length, piece_length) = loop {
        let state = rx.borrow_and_update().clone();
        if let Some(Err(err)) = &state.outcome {
            return Err(TaskError::Internal(err.to_string()));
        }
        if state.started {
            break (state.content_length.unwrap_or_default(), state.piece_length);
        }
        rx.changed()
            .await
            .map_err(|_| TaskError::Internal("download ended without an outcome".into()))?;
    };
    if range.end > content_length || range.start > range.end {
        return Err(TaskError::InvalidArgument(format!(
            "range {}-{} is outside the content of {content_length} bytes",
            range.start, range.end
        )));
    }
    if range.is_empty() {
        wait_finished(run, &mut rx).await?;
        return Ok(0);
    }
    let layout = PieceLayout::new(content_length, piece_length);
    let mut have = vec![false; layout.piece_count() as usize];
    let mut seen = 0;
    let mut file = mgr
        .storage()
        .open_content_at(&run.task_id, range.start)
        .await?;
    let mut pos = range.start;
    let mut sent = 0u64;
    while pos < range.end {
        let number = (pos / layout.piece_length) as u32;
        // Wait until the piece is recorded.
        loop {
            let state = rx.borrow_and_update().clone();
            for piece in &state.pieces[seen.min(state.pieces.len())..] {
                if let Some(h) = have.get_mut(piece.number as usize) {
                    *h = true;
                }
            }
            seen = state.pieces.len();
            if have[number as usize] {
                break;
            }
            match &state.outcome {
                Some(Err(err)) => return Err(TaskError::Internal(err.to_string())),
                Some(Ok(())) => {
                    return Err(TaskError::Internal(format!(
                        "task finished without piece {number}"
                    )))
                }
                None => {}
            }
            run.want(number);
            rx.changed()
                .await
                .map_err(|_| TaskError::Internal("download ended without an outcome".into()))?;
        }
        let piece_end = (layout.offset(number) + layout.piece_length).min(range.end);
        while pos < piece_end {
            let len = (piece_end - pos).min(chunk_size as u64) as usize;
            let mut buf = BytesMut::zeroed(len);
            file.read_exact(&mut buf).await.map_err(|e| {
                TaskError::Internal(format!("reading the content of task {}: {e}", run.task_id))
            })?;
            pos += len as u64;
            if pos == range.end {
                // The last bytes only after the whole content was verified.
                wait_finished(run, &mut rx).await?;
            }
            if tx.send(Ok(buf.freeze())).await.is_err() {
                return Ok(sent); // the reader left
            }
            sent += len as u64;
        }
    }
    Ok(sent)
}

async fn wait_finished(
    run: &TaskRun,
    rx: &mut tokio::sync::watch::Receiver<super::RunState>,
) -> Result<(), TaskError> {
    loop {
        match &rx.borrow_and_update().outcome {
            Some(Ok(())) => return Ok(()),
            Some(Err(err)) => {
                return Err(TaskError::Internal(format!(
                    "task {} failed: {err}",
                    run.task_id
                )))
            }
            None => {}
        }
        rx.changed()
            .await
            .map_err(|_| TaskError::Internal("download ended without an outcome".into()))?;
    }
}
