//! gRPC services: translation between `dragonfly-api` messages and the task manager.

pub mod download;
pub mod upload;

use crate::error::TaskError;
use crate::host::HostInfo;
use crate::task::{DownloadPlan, TaskManager, TaskRun};
use d7y_storage::{PieceMeta, TaskMeta};
use dragonfly_api::common::v2::{Piece, Task, TaskType};
use dragonfly_api::dfdaemon::v2::{
    download_task_response, DownloadPieceFinishedResponse, DownloadTaskResponse,
    DownloadTaskStartedResponse, StatLocalTaskResponse,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::Status;

pub(crate) fn timestamp(secs: u64) -> prost_wkt_types::Timestamp {
    prost_wkt_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    }
}

pub(crate) fn piece_to_proto(piece: &PieceMeta) -> Piece {
    Piece {
        number: piece.number,
        parent_id: piece.parent_id.clone(),
        offset: piece.offset,
        length: piece.length,
        digest: piece.digest.clone(),
        content: None,
        traffic_type: Some(piece.traffic_type),
        cost: Some(prost_wkt_types::Duration {
            seconds: (piece.cost_millis / 1000) as i64,
            nanos: ((piece.cost_millis % 1000) * 1_000_000) as i32,
        }),
        created_at: Some(timestamp(piece.created_at)),
    }
}

pub(crate) fn stat_local(meta: &TaskMeta) -> StatLocalTaskResponse {
    StatLocalTaskResponse {
        task_id: meta.id.clone(),
        piece_length: meta.piece_length,
        content_length: meta.content_length,
        response_header: meta.response_header.iter().cloned().collect(),
        uploading_count: 0,
        uploaded_count: 0,
        created_at: Some(timestamp(meta.created_at)),
        updated_at: Some(timestamp(meta.accessed_at)),
        prefetched_at: None,
        failed_at: None,
        finished_at: meta.finished_at.map(timestamp),
    }
}

pub(crate) fn task_to_proto(meta: &TaskMeta, pieces: &[PieceMeta]) -> Task {
    let content_length = meta.content_length.unwrap_or_default();
    let layout = d7y_types::PieceLayout::new(content_length, meta.piece_length);
    Task {
        id: meta.id.clone(),
        r#type: TaskType::Standard as i32,
        url: meta.url.clone(),
        content_length,
        piece_count: layout.piece_count(),
        pieces: pieces.iter().map(piece_to_proto).collect(),
        state: if meta.is_finished() {
            "Succeeded"
        } else {
            "Running"
        }
        .to_string(),
        has_available_peer: meta.is_finished(),
        created_at: Some(timestamp(meta.created_at)),
        updated_at: Some(timestamp(meta.accessed_at)),
        ..Default::default()
    }
}

/// Who is answering a download stream.
#[derive(Clone)]
pub(crate) struct Envelope {
    pub host_id: String,
    pub task_id: String,
    pub peer_id: String,
}

impl Envelope {
    fn wrap(&self, response: download_task_response::Response) -> DownloadTaskResponse {
        DownloadTaskResponse {
            host_id: self.host_id.clone(),
            task_id: self.task_id.clone(),
            peer_id: self.peer_id.clone(),
            response: Some(response),
        }
    }
}

type Tx = mpsc::Sender<Result<DownloadTaskResponse, Status>>;

async fn piece_with_content(
    mgr: &TaskManager,
    task_id: &str,
    piece: &PieceMeta,
) -> Result<Piece, TaskError> {
    let mut proto = piece_to_proto(piece);
    let mut file = mgr.storage().open_content_at(task_id, piece.offset).await?;
    let mut data = vec![0u8; piece.length as usize];
    file.read_exact(&mut data)
        .await
        .map_err(|e| TaskError::Internal(format!("reading piece {}: {e}", piece.number)))?;
    proto.content = Some(data);
    Ok(proto)
}

/// Streams a run's progress: one started response, then one response per finished piece.
/// Returns when the run ends; the error is the run's.
pub(crate) async fn stream_progress(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    envelope: &Envelope,
    tx: &Tx,
) -> Result<(), Status> {
    let closed = || Status::cancelled("client went away");
    let mut rx = run.subscribe();
    let mut sent: Option<usize> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        if sent.is_none() && state.started {
            let pieces = if plan.need_piece_content {
                Vec::new()
            } else {
                state.pieces.iter().map(piece_to_proto).collect()
            };
            let started = DownloadTaskStartedResponse {
                content_length: state.content_length.unwrap_or_default(),
                range: None,
                response_header: state.response_header.iter().cloned().collect(),
                pieces,
                is_finished: matches!(state.outcome, Some(Ok(()))),
            };
            tx.send(Ok(envelope.wrap(
                download_task_response::Response::DownloadTaskStartedResponse(started),
            )))
            .await
            .map_err(|_| closed())?;
            sent = Some(if plan.need_piece_content {
                0
            } else {
                state.pieces.len()
            });
        }
        if let Some(from) = sent {
            for piece in &state.pieces[from..] {
                let piece = if plan.need_piece_content {
                    piece_with_content(mgr, &run.task_id, piece)
                        .await
                        .map_err(|e| e.to_status())?
                } else {
                    piece_to_proto(piece)
                };
                tx.send(Ok(envelope.wrap(
                    download_task_response::Response::DownloadPieceFinishedResponse(
                        DownloadPieceFinishedResponse { piece: Some(piece) },
                    ),
                )))
                .await
                .map_err(|_| closed())?;
            }
            sent = Some(state.pieces.len());
        }
        match &state.outcome {
            Some(Ok(())) if sent.is_some() => return Ok(()),
            Some(Ok(())) => continue,
            Some(Err(err)) => return Err(err.to_status()),
            None => {}
        }
        if rx.changed().await.is_err() {
            return Err(Status::internal("download ended without an outcome"));
        }
    }
}

/// Serves one DownloadTask request end to end: plan, join or start the run, stream progress,
/// then place the output. Errors go down the stream as a status.
pub(crate) async fn serve_download(
    mgr: Arc<TaskManager>,
    host_id: String,
    peer_id: String,
    download: dragonfly_api::common::v2::Download,
    local: bool,
) -> Result<mpsc::Receiver<Result<DownloadTaskResponse, Status>>, Status> {
    let mut plan = mgr.plan(&download).map_err(|e| e.to_status())?;
    if local {
        plan = plan.local();
    }
    if let Some(output) = &plan.output_path {
        crate::task::check_output(output, plan.overwrite).map_err(|e| e.to_status())?;
    }
    let labels = [
        "STANDARD".to_string(),
        mgr.metrics.bounded_label("tag", &plan.tag),
        mgr.metrics.bounded_label("application", &plan.application),
        crate::metrics::priority_label(plan.priority).to_string(),
    ];
    let labels: [&str; 4] = [&labels[0], &labels[1], &labels[2], &labels[3]];
    mgr.metrics
        .download_task_total
        .with_label_values(&labels)
        .inc();
    let run = match mgr.start(&plan).await {
        Ok(run) => run,
        Err(err) => {
            mgr.metrics
                .download_task_failure_total
                .with_label_values(&labels)
                .inc();
            return Err(err.to_status());
        }
    };
    let (tx, rx) = mpsc::channel(128);
    let envelope = Envelope {
        host_id,
        task_id: plan.task_id.clone(),
        peer_id,
    };
    let owned_labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
    tokio::spawn(async move {
        let labels: Vec<&str> = owned_labels.iter().map(String::as_str).collect();
        let gauge = mgr
            .metrics
            .concurrent_download_task_total
            .with_label_values(&labels);
        gauge.inc();
        let work = async {
            let _lease = mgr.storage().lease(&plan.task_id);
            stream_progress(&mgr, &run, &plan, &envelope, &tx).await?;
            if let Some(output) = &plan.output_path {
                let content = mgr
                    .storage()
                    .content_path(&plan.task_id)
                    .map_err(|e| TaskError::from(e).to_status())?;
                crate::task::place_output(
                    content,
                    output.clone(),
                    plan.force_hard_link,
                    plan.overwrite,
                    plan.digest.clone(),
                    plan.url.to_string(),
                )
                .await
                .map_err(|e| e.to_status())?;
            }
            Ok::<(), Status>(())
        };
        let result = match plan.timeout {
            Some(limit) => tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "download of {} did not finish within {}s",
                    plan.url,
                    limit.as_secs()
                )))
            }),
            None => work.await,
        };
        gauge.dec();
        if let Err(status) = result {
            mgr.metrics
                .download_task_failure_total
                .with_label_values(&labels)
                .inc();
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(rx)
}

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub(crate) fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not supported by this dfdaemon yet"))
}

/// The DownloadTask RPC, shared by the download (local) and upload (remote) services.
/// `local`: the request came over the unix socket (this host's users), so the origin may
/// be asked with this process's environment credentials.
pub(crate) async fn download_task(
    manager: &Arc<TaskManager>,
    host: &HostInfo,
    request: dragonfly_api::dfdaemon::v2::DownloadTaskRequest,
    local: bool,
) -> Result<tonic::Response<BoxStream<DownloadTaskResponse>>, Status> {
    let download = request
        .download
        .ok_or_else(|| Status::invalid_argument("missing download"))?;
    let rx = serve_download(
        manager.clone(),
        host.host_id.clone(),
        host.identity.peer_id(),
        download,
        local,
    )
    .await?;
    Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
}
