//! The shared, observable state of one task download.

use crate::error::TaskError;
use d7y_storage::{PieceMeta, TaskMeta};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// A snapshot of a run. `pieces` only grows, in completion order.
#[derive(Debug, Clone, Default)]
pub struct RunState {
    pub content_length: Option<u64>,
    pub piece_length: Option<u64>,
    pub response_header: Vec<(String, String)>,
    /// Set once the content length and piece length are known.
    pub started: bool,
    pub pieces: Arc<Vec<PieceMeta>>,
    /// Pieces that started arriving from a parent and can be relayed before they are whole
    /// (see [`crate::relay`]), in start order. Only grows; a piece appears again when a
    /// failed fetch of it is retried.
    pub arriving: Arc<Vec<PieceMeta>>,
    pub outcome: Option<Result<(), Arc<TaskError>>>,
}

impl RunState {
    pub fn piece_count(&self) -> Option<u32> {
        Some(d7y_types::PieceLayout::new(self.content_length?, self.piece_length).piece_count())
    }
}

/// One download of one task, observed by any number of requests.
pub struct TaskRun {
    pub task_id: String,
    state: watch::Sender<RunState>,
    /// The piece a reader streaming the content in order waits for ([`NO_PIECE`]: none):
    /// the download fetches it first when a parent has it.
    wanted: AtomicU32,
}

const NO_PIECE: u32 = u32::MAX;

impl TaskRun {
    pub(crate) fn new(task_id: String) -> TaskRun {
        TaskRun {
            task_id,
            state: watch::Sender::new(RunState::default()),
            wanted: AtomicU32::new(NO_PIECE),
        }
    }

    /// A run that finished earlier, rebuilt from storage.
    pub(crate) fn completed(meta: &TaskMeta, mut pieces: Vec<PieceMeta>) -> TaskRun {
        pieces.sort_by_key(|p| p.number);
        TaskRun {
            task_id: meta.id.clone(),
            state: watch::Sender::new(RunState {
                content_length: meta.content_length,
                piece_length: meta.piece_length,
                response_header: meta.response_header.clone(),
                started: true,
                pieces: Arc::new(pieces),
                arriving: Arc::default(),
                outcome: Some(Ok(())),
            }),
            wanted: AtomicU32::new(NO_PIECE),
        }
    }

    /// Says that a reader waits for piece `number` (the most recent reader wins).
    pub fn want(&self, number: u32) {
        self.wanted.store(number, Ordering::Relaxed);
    }

    /// The piece a reader waits for, if any.
    pub fn wanted(&self) -> Option<u32> {
        Some(self.wanted.load(Ordering::Relaxed)).filter(|&n| n != NO_PIECE)
    }

    pub fn state(&self) -> RunState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<RunState> {
        self.state.subscribe()
    }

    pub(crate) fn set_started(
        &self,
        content_length: Option<u64>,
        piece_length: u64,
        response_header: Vec<(String, String)>,
        existing: Vec<PieceMeta>,
    ) {
        self.state.send_modify(|s| {
            s.content_length = content_length;
            s.piece_length = Some(piece_length);
            s.response_header = response_header;
            s.started = content_length.is_some();
            s.pieces = Arc::new(existing);
        });
    }

    /// Sets a content length learnt at the end of a stream of unknown length.
    pub(crate) fn set_content_length(&self, content_length: u64) {
        self.state.send_modify(|s| {
            s.content_length = Some(content_length);
            s.started = true;
        });
    }

    pub(crate) fn add_piece(&self, piece: PieceMeta) {
        self.state
            .send_modify(|s| Arc::make_mut(&mut s.pieces).push(piece));
    }

    pub(crate) fn add_arriving(&self, piece: PieceMeta) {
        self.state
            .send_modify(|s| Arc::make_mut(&mut s.arriving).push(piece));
    }

    pub(crate) fn finish(&self, outcome: Result<(), Arc<TaskError>>) {
        self.state.send_modify(|s| {
            if outcome.is_ok() {
                s.started = true;
            }
            s.outcome = Some(outcome);
        });
    }
}
