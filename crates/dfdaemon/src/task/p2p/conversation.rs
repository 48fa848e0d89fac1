//! The download's side of the AnnouncePeer conversation: what the piece loop tells the
//! scheduler (pieces, failures, requests for parents, going back to source) and what the
//! scheduler's replies mean for it. Without a scheduler (none reachable, or lost midway)
//! every report is dropped and no reply ever comes, so the loop runs the same either way.

use crate::grpc::piece_to_proto;
use crate::scheduler::{is_refusal, Announce};
use d7y_storage::PieceMeta;
use dragonfly_api::common::v2::Peer;
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Event;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as Reply;
use dragonfly_api::scheduler::v2::*;
use tracing::{debug, warn};

/// What a scheduler reply asks of the piece loop.
pub(super) enum Directive {
    /// A fresh parent set (it replaces the current one).
    Parents(Vec<Peer>),
    /// Take the rest from the origin.
    BackToSource(String),
    /// The scheduler refused the peer: the download fails with this message.
    Refused(String),
    /// Nothing for the loop (the scheduler may have gone: see [`Conversation::alive`]).
    Nothing,
}

pub(super) struct Conversation<'s> {
    announce: Option<Announce>,
    responses: Option<&'s mut tonic::Streaming<AnnouncePeerResponse>>,
    alive: bool,
    /// A request for parents is outstanding (the next parent set answers it).
    waiting: bool,
    /// The scheduler was told this peer went back to source.
    back_to_source: bool,
}

impl<'s> Conversation<'s> {
    pub fn new(
        announce: Announce,
        responses: &'s mut tonic::Streaming<AnnouncePeerResponse>,
    ) -> Conversation<'s> {
        Conversation {
            announce: Some(announce),
            responses: Some(responses),
            alive: true,
            waiting: false,
            back_to_source: false,
        }
    }

    /// A download with no scheduler.
    pub fn alone() -> Conversation<'s> {
        Conversation {
            announce: None,
            responses: None,
            alive: false,
            waiting: false,
            back_to_source: false,
        }
    }

    /// Whether the scheduler is still there to answer.
    pub fn alive(&self) -> bool {
        self.alive
    }

    pub fn addr(&self) -> &str {
        self.announce.as_ref().map_or("", |a| a.addr.as_str())
    }

    fn send(&self, event: Event) {
        if let Some(a) = &self.announce {
            a.send(event);
        }
    }

    /// The next reply; pends forever once the scheduler is gone (or was never there).
    pub async fn next(&mut self) -> Directive {
        let Some(responses) = self.responses.as_mut().filter(|_| self.alive) else {
            return std::future::pending().await;
        };
        match responses.message().await {
            Ok(Some(AnnouncePeerResponse {
                response: Some(reply),
            })) => match reply {
                Reply::NormalTaskResponse(r) => {
                    self.waiting = false;
                    Directive::Parents(r.candidate_parents)
                }
                Reply::NeedBackToSourceResponse(r) => Directive::BackToSource(
                    r.description.unwrap_or_else(|| "scheduler asked".into()),
                ),
                Reply::EmptyTaskResponse(_) | Reply::MetadataOnlyResponse(_) => Directive::Nothing,
            },
            Ok(Some(_)) => Directive::Nothing,
            Ok(None) => {
                self.lost("stream closed");
                Directive::Nothing
            }
            Err(status) if is_refusal(&status) => Directive::Refused(status.message().to_string()),
            Err(status) => {
                self.lost(status.message());
                Directive::Nothing
            }
        }
    }

    fn lost(&mut self, why: &str) {
        warn!(
            scheduler = self.addr(),
            why, "scheduler lost; continuing with the current parents"
        );
        self.alive = false;
    }

    pub fn started(&self) {
        self.send(Event::DownloadPeerStartedRequest(
            DownloadPeerStartedRequest {},
        ));
    }

    /// Every piece is here. A peer that went back to source says so with the
    /// back-to-source event (as upstream's client does), any other with the plain one.
    pub fn finished(&self) {
        if self.back_to_source {
            self.send(Event::DownloadPeerBackToSourceFinishedRequest(
                DownloadPeerBackToSourceFinishedRequest {},
            ));
        } else {
            self.send(Event::DownloadPeerFinishedRequest(
                DownloadPeerFinishedRequest {},
            ));
        }
    }

    pub fn failed(&self, description: String) {
        if self.back_to_source {
            self.send(Event::DownloadPeerBackToSourceFailedRequest(
                DownloadPeerBackToSourceFailedRequest {
                    description: Some(description),
                },
            ));
        } else {
            self.send(Event::DownloadPeerFailedRequest(
                DownloadPeerFailedRequest {
                    description: Some(description),
                },
            ));
        }
    }

    /// The peer takes pieces from the origin from now on (told once).
    pub fn back_to_source_started(&mut self, reason: &str) {
        if self.back_to_source || !self.alive {
            return;
        }
        self.back_to_source = true;
        self.send(Event::DownloadPeerBackToSourceStartedRequest(
            DownloadPeerBackToSourceStartedRequest {
                description: Some(reason.to_string()),
            },
        ));
    }

    pub fn piece_finished(&self, piece: &PieceMeta, from_origin: bool) {
        let piece = Some(piece_to_proto(piece));
        if from_origin {
            self.send(Event::DownloadPieceBackToSourceFinishedRequest(
                DownloadPieceBackToSourceFinishedRequest { piece },
            ));
        } else {
            self.send(Event::DownloadPieceFinishedRequest(
                DownloadPieceFinishedRequest { piece },
            ));
        }
    }

    pub fn piece_failed(&self, number: u32, parent_id: &str, temporary: bool) {
        self.send(Event::DownloadPieceFailedRequest(
            DownloadPieceFailedRequest {
                piece_number: Some(number),
                parent_id: parent_id.to_string(),
                temporary,
            },
        ));
    }

    /// Asks for a fresher parent set (no failure implied; the scheduler answers only when
    /// it has one).
    pub fn refresh(&self) {
        if self.alive && !self.back_to_source {
            self.send(Event::ReschedulePeerRequest(ReschedulePeerRequest {
                candidate_parents: Vec::new(),
                description: Some("refresh".into()),
            }));
        }
    }

    /// Asks for new parents, reporting the ones that failed us (they get blocklisted).
    /// One request at a time: the next parent set answers it.
    pub fn reschedule(&mut self, failed: Vec<String>, why: &str) {
        if !self.alive || self.waiting || self.back_to_source {
            return;
        }
        debug!(why, failed = failed.len(), "asking for new parents");
        let failed = failed
            .into_iter()
            .map(|id| Peer {
                id,
                ..Default::default()
            })
            .collect();
        self.send(Event::ReschedulePeerRequest(ReschedulePeerRequest {
            candidate_parents: failed,
            description: Some(why.to_string()),
        }));
        self.waiting = true;
    }

    /// Forgets an outstanding request (its parents stalled before they helped).
    pub fn stop_waiting(&mut self) {
        self.waiting = false;
    }
}
