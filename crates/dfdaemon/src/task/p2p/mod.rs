//! A download's piece loop and its conversation with the scheduler: register with the
//! task's scheduler, then take pieces from several parents at once (SyncPieces for
//! availability, Vortex for bytes) and, once back-to-source is on, from the origin as one
//! more source ([`engine`]). A download with no scheduler is the same loop with no
//! parents. Only an origin that takes no ranges (or a content of unknown length) is read
//! as one streamed GET instead ([`super::source::transfer`]).
//!
//! Modules: [`conversation`] is what is said to the scheduler and what its replies mean;
//! [`engine`] feeds [`d7y_picker`] and runs the fetches; [`transfer`] moves one piece from
//! a parent (and keeps a parent's SyncPieces stream). Every piece is CRC-checked before it
//! is recorded; a parent that sends a bad piece is reported and dropped for this task.

mod conversation;
mod engine;
mod transfer;

use super::source::{self, Prepared};
use super::{DownloadPlan, TaskManager, TaskRun};
use crate::error::TaskError;
use crate::scheduler::{AnnounceStream, SchedulerError, Schedulers};
use conversation::Conversation;
use d7y_storage::PieceMeta;
use d7y_types::piece::{piece_length_for, MIN_PIECE_LENGTH};
use d7y_types::PieceLayout;
use dragonfly_api::common::v2::{Peer, TrafficType};
use dragonfly_api::scheduler::v2::announce_peer_response::Response as Reply;
use dragonfly_api::scheduler::v2::*;
use engine::{Engine, EngineExit};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Failed pieces before a parent is dropped for this task.
const PARENT_FAILURE_LIMIT: u32 = 3;
/// How often a downloading peer asks the scheduler for a fresher parent set: this often
/// after its parent set changed, backing off to [`REFRESH_MAX`] while refreshes change
/// nothing.
const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
const REFRESH_MAX: Duration = Duration::from_secs(4);
/// With the scheduler gone and nothing obtainable from the parents for this long, the
/// origin becomes a source.
const ORPHAN_STALL: Duration = Duration::from_secs(3);
/// With the scheduler there and no byte arriving from the parents for this long, the
/// parents are reported as failing and new ones asked for (a parent that announces pieces
/// it never sends, or stops answering, must not hold the download).
const PARENT_STALL: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a finished download waits for the scheduler to close the announce stream (so
/// the last events reach it) before dropping it.
const ANNOUNCE_DRAIN: Duration = Duration::from_secs(2);

/// Whether to bypass the scheduler: upstream sends contents of at most one minimum piece
/// straight to the origin under the AUTO scheduling policy.
fn bypasses_scheduler(plan: &DownloadPlan, content_length: Option<u64>) -> bool {
    plan.download.scheduling_policy == 0
        && !plan.disable_back_to_source
        && content_length.is_some_and(|len| len <= MIN_PIECE_LENGTH)
}

/// Whether the task is an OCI blob named by its digest (its content is verified against
/// the digest before it counts as finished).
fn is_digest_task(plan: &DownloadPlan) -> bool {
    d7y_types::id::blob_digest_encoded(&plan.download.url).is_some_and(|hex| hex == plan.task_id)
}

/// Downloads a task with the help of the schedulers.
pub(super) async fn download(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    schedulers: &Schedulers,
) -> Result<(), TaskError> {
    // An OCI blob the swarm already holds needs nothing from its registry: its bytes are
    // checked against the digest in its URL before the task counts as finished, so the
    // scheduler's word for its length is enough (a preheated image is then served with no
    // request to the registry at all).
    let known = if is_digest_task(plan) {
        schedulers
            .stat_task(&plan.task_id)
            .await
            .filter(|t| t.has_available_peer && t.content_length > MIN_PIECE_LENGTH)
    } else {
        None
    };
    // The origin tells the length (and whether it takes ranges); without it the parents'
    // view of the task does. An origin that answers with an HTTP error is final.
    let probe = if plan.disable_back_to_source || known.is_some() {
        None
    } else {
        match source::probe(mgr, plan).await {
            Ok(p) => Some(p),
            Err(TaskError::Backend(e)) if e.http_status().is_none() => {
                warn!(task_id = plan.task_id, error = %e, "origin unreachable; trying peers");
                None
            }
            Err(e) => return Err(e),
        }
    };
    let content_length = probe
        .as_ref()
        .and_then(|p| p.stat.content_length)
        .or(known.as_ref().map(|t| t.content_length));
    let probe = match probe {
        // Unknown length (cannot be laid out in pieces for peers) or a small file.
        Some(p) if content_length.is_none() || bypasses_scheduler(plan, content_length) => {
            return standalone(mgr, run, plan, p, content_length).await;
        }
        other => other,
    };

    let peer_id = schedulers.host().identity.peer_id();
    let piece_length =
        content_length.map(|len| plan.piece_length.unwrap_or_else(|| piece_length_for(len)));
    let mut register = plan.download.clone();
    // Where the output goes is this host's business, not the swarm's.
    register.output_path = None;
    register.overwrite = false;
    register.force_hard_link = false;
    register.need_piece_content = false;
    register.actual_content_length = content_length;
    register.actual_piece_length = piece_length;
    register.actual_piece_count = content_length
        .zip(piece_length)
        .map(|(len, pl)| PieceLayout::new(len, Some(pl)).piece_count() as u64);
    let stream = match schedulers.open(&plan.task_id, &peer_id, register).await {
        Ok(s) => s,
        Err(SchedulerError::Unreachable(tried)) => {
            warn!(
                task_id = plan.task_id,
                tried, "no scheduler reachable, going back to source"
            );
            return match probe {
                Some(probe) => standalone(mgr, run, plan, probe, content_length).await,
                None => Err(TaskError::SchedulerUnavailable(tried)),
            };
        }
        Err(e @ SchedulerError::Refused { .. }) => return Err(TaskError::Scheduler(e.to_string())),
    };
    let AnnounceStream {
        announce,
        first,
        mut responses,
    } = stream;
    let talk = Conversation::new(announce.clone(), &mut responses);
    let result = scheduled(mgr, run, plan, probe, content_length, talk, first).await;
    // Close our side and wait for the scheduler to close its: dropping the response stream
    // would reset the HTTP/2 stream and lose the events still queued (a fast seed peer's
    // "finished" among them, after which the scheduler dropped the only complete copy).
    drop(announce);
    let drain = async { while let Ok(Some(_)) = responses.message().await {} };
    let _ = tokio::time::timeout(ANNOUNCE_DRAIN, drain).await;
    result
}

/// The download as the scheduler's first answer directs it.
async fn scheduled(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    probe: Option<d7y_backend::Probe>,
    content_length: Option<u64>,
    talk: Conversation<'_>,
    first: Option<Reply>,
) -> Result<(), TaskError> {
    match first {
        Some(Reply::NormalTaskResponse(NormalTaskResponse { candidate_parents })) => {
            talk.started();
            let content_length =
                match content_length.or_else(|| length_from_parents(&candidate_parents)) {
                    Some(len) => len,
                    None => {
                        return Err(TaskError::Internal(
                            "neither the origin nor the parents know the content length".into(),
                        ))
                    }
                };
            let header = probe
                .as_ref()
                .map(|p| p.stat.headers.clone())
                .unwrap_or_default();
            let prepared = source::prepare(mgr, run, plan, Some(content_length), header).await?;
            let mut engine = Engine::new(mgr, run, plan, &prepared, talk, probe);
            engine.set_parents(candidate_parents);
            finish(mgr, run, plan, prepared, engine, None).await
        }
        Some(Reply::NeedBackToSourceResponse(r)) => {
            let reason = r.description.unwrap_or_else(|| "scheduler asked".into());
            debug!(task_id = plan.task_id, reason, "scheduler: back to source");
            let probe = probe_again(mgr, plan, probe).await?;
            let content_length = probe.stat.content_length;
            from_origin(mgr, run, plan, talk, probe, content_length, &reason).await
        }
        Some(Reply::EmptyTaskResponse(_)) => {
            let prepared = source::prepare(mgr, run, plan, Some(0), Vec::new()).await?;
            talk.started();
            talk.finished();
            mgr.mark_finished(plan, prepared.meta).await
        }
        Some(Reply::MetadataOnlyResponse(_)) | None => {
            // The scheduler is gone or answered nonsense: do the download alone.
            match probe {
                Some(probe) => standalone(mgr, run, plan, probe, content_length).await,
                None => Err(TaskError::SchedulerUnavailable(talk.addr().to_string())),
            }
        }
    }
}

/// A download with no scheduler: every piece from the origin.
pub(super) async fn standalone(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    probe: d7y_backend::Probe,
    content_length: Option<u64>,
) -> Result<(), TaskError> {
    let talk = Conversation::alone();
    from_origin(mgr, run, plan, talk, probe, content_length, "no scheduler").await
}

/// Every piece from the origin: the piece loop with no parents when the origin takes
/// ranges and the length is known, else one streamed GET.
async fn from_origin(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    talk: Conversation<'_>,
    probe: d7y_backend::Probe,
    content_length: Option<u64>,
    reason: &str,
) -> Result<(), TaskError> {
    if plan.disable_back_to_source {
        return Err(TaskError::BackToSourceDisabled);
    }
    let header = probe.stat.headers.clone();
    let prepared = source::prepare(mgr, run, plan, content_length, header).await?;
    // A content of unknown length cannot be laid out in pieces; an origin without ranges
    // is found out by `Engine::use_origin`, which hands the stream back.
    if content_length.is_none() {
        let mut talk = talk;
        talk.back_to_source_started(reason);
        return streamed(mgr, run, plan, talk, prepared, probe).await;
    }
    let engine = Engine::new(mgr, run, plan, &prepared, talk, Some(probe));
    finish(mgr, run, plan, prepared, engine, Some(reason)).await
}

/// Runs the piece loop to its end (with the origin as a source from the start when
/// `origin` says why) and reports that end.
async fn finish(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    prepared: Prepared,
    mut engine: Engine<'_>,
    origin: Option<&str>,
) -> Result<(), TaskError> {
    let result = match origin {
        Some(reason) => match engine.use_origin(reason).await {
            Ok(()) => engine.run().await,
            Err(e) => Err(e),
        },
        None => engine.run().await,
    };
    match result {
        Ok(()) => {
            engine.conversation().finished();
            mgr.mark_finished(plan, prepared.meta).await
        }
        Err(EngineExit::Streamed { reason, probe }) => {
            info!(
                task_id = plan.task_id,
                reason, "the origin takes no ranges; streaming the rest"
            );
            let mut talk = engine.into_conversation();
            talk.back_to_source_started(&reason);
            streamed(mgr, run, plan, talk, prepared, probe).await
        }
        Err(EngineExit::Failed(e)) => {
            engine.conversation().failed(e.to_string());
            Err(e)
        }
    }
}

/// The origin's probe: the one made at the start, or a new one when the origin was
/// unreachable then (its error is the one the user should see if it still is).
async fn probe_again(
    mgr: &TaskManager,
    plan: &DownloadPlan,
    probe: Option<d7y_backend::Probe>,
) -> Result<d7y_backend::Probe, TaskError> {
    if plan.disable_back_to_source {
        return Err(TaskError::BackToSourceDisabled);
    }
    match probe {
        Some(p) => Ok(p),
        None => source::probe(mgr, plan).await,
    }
}

fn length_from_parents(parents: &[Peer]) -> Option<u64> {
    parents
        .iter()
        .filter_map(|p| p.task.as_ref())
        .map(|t| t.content_length)
        .find(|len| *len > 0)
}

/// The missing pieces from one streamed GET (an origin without ranges), each reported to
/// the scheduler as it lands.
async fn streamed(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    talk: Conversation<'_>,
    mut prepared: Prepared,
    probe: d7y_backend::Probe,
) -> Result<(), TaskError> {
    let mut watch = run.subscribe();
    let mut reported = watch.borrow().pieces.len();
    let forward = |pieces: &[PieceMeta], from: usize| {
        for p in &pieces[from..] {
            if p.traffic_type == TrafficType::BackToSource as i32 {
                talk.piece_finished(p, true);
            }
        }
    };
    let result = {
        let transfer = source::transfer(mgr, run, plan, &mut prepared, probe);
        tokio::pin!(transfer);
        loop {
            tokio::select! {
                r = &mut transfer => break r,
                changed = watch.changed() => {
                    if changed.is_err() { continue; }
                    let pieces = watch.borrow_and_update().pieces.clone();
                    forward(&pieces, reported);
                    reported = pieces.len();
                }
            }
        }
    };
    let pieces = run.state().pieces;
    forward(&pieces, reported);
    match result {
        Ok(()) => {
            talk.finished();
            mgr.mark_finished(plan, prepared.meta).await
        }
        Err(e) => {
            talk.failed(e.to_string());
            Err(e)
        }
    }
}
