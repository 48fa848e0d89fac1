//! The dfdaemon's view of its schedulers: which one owns a task (consistent hashing of the
//! task ID, failing over along the ring), host announcements, and one AnnouncePeer stream
//! per download.

use crate::host::{host_proto, HostInfo, Traffic};
use d7y_types::HashRing;
use dragonfly_api::common::v2::Download;
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Event;
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::*;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests buffered towards the scheduler on one stream.
const ANNOUNCE_BUFFER: usize = 1024;

/// Why talking to a scheduler failed.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("no scheduler is reachable (tried {0})")]
    Unreachable(String),
    #[error("scheduler {addr} refused: {message}")]
    Refused { addr: String, message: String },
}

/// The schedulers: configured once, or followed from the manager (see [`crate::dynconfig`]).
pub struct Schedulers {
    ring: std::sync::RwLock<HashRing<String>>,
    host: Arc<HostInfo>,
    traffic: Arc<Traffic>,
    channels: Mutex<HashMap<String, Channel>>,
    announced: Mutex<HashSet<String>>,
    /// Mutual TLS with the schedulers (`scheduler.caCert/cert/key`), when configured.
    tls: Option<Arc<d7y_net::ClientTls>>,
    /// The longest wait for a scheduler's first answer to a registration.
    schedule_timeout: Duration,
}

impl Schedulers {
    pub fn new(addrs: Vec<String>, host: Arc<HostInfo>, traffic: Arc<Traffic>) -> Schedulers {
        Schedulers {
            ring: std::sync::RwLock::new(HashRing::new(addrs)),
            host,
            traffic,
            channels: Mutex::default(),
            announced: Mutex::default(),
            tls: None,
            schedule_timeout: Duration::from_secs(3 * 3600),
        }
    }

    /// Talks to the schedulers over mutual TLS.
    pub fn with_tls(mut self, tls: Option<Arc<d7y_net::ClientTls>>) -> Schedulers {
        self.tls = tls;
        self
    }

    /// Waits at most `timeout` for a scheduler's first answer (`scheduler.scheduleTimeout`).
    pub fn with_schedule_timeout(mut self, timeout: Duration) -> Schedulers {
        self.schedule_timeout = timeout;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ring.read().expect("ring").is_empty()
    }

    /// The schedulers in the order they are tried for `key` (a task ID).
    fn order(&self, key: &str) -> Vec<String> {
        self.ring
            .read()
            .expect("ring")
            .successors(key)
            .cloned()
            .collect()
    }

    /// Every scheduler address (`host:port`).
    pub fn addrs(&self) -> Vec<String> {
        let mut all = self.order("");
        all.sort();
        all
    }

    /// Replaces the schedulers (the manager's answer changed); connections to ones no
    /// longer listed are dropped. Returns whether the set changed.
    pub fn set_addrs(&self, mut addrs: Vec<String>) -> bool {
        addrs.sort();
        addrs.dedup();
        if addrs == self.addrs() {
            return false;
        }
        *self.ring.write().expect("ring") = HashRing::new(addrs.clone());
        self.channels
            .lock()
            .expect("channels")
            .retain(|a, _| addrs.contains(a));
        self.announced
            .lock()
            .expect("announced")
            .retain(|a| addrs.contains(a));
        true
    }

    pub fn host(&self) -> &Arc<HostInfo> {
        &self.host
    }

    async fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        if let Some(c) = self.channels.lock().expect("channels").get(addr) {
            return Ok(c.clone());
        }
        // Only bind the source when it can reach the target's address family.
        let source = self.host.source_ip.filter(|ip| {
            addr.parse::<std::net::SocketAddr>()
                .map_or(true, |target| target.is_ipv4() == ip.is_ipv4())
        });
        let channel = d7y_net::channel(
            addr,
            &d7y_net::ChannelOptions {
                tls: self.tls.clone(),
                local: source,
                connect_timeout: Some(CONNECT_TIMEOUT),
                keepalive: Some((Duration::from_secs(10), Duration::from_secs(5))),
            },
        )
        .await?;
        self.channels
            .lock()
            .expect("channels")
            .insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    fn forget(&self, addr: &str) {
        self.channels.lock().expect("channels").remove(addr);
        self.announced.lock().expect("announced").remove(addr);
    }

    async fn announce_to(&self, addr: &str) -> Result<(), tonic::Status> {
        let channel = self
            .channel(addr)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(AnnounceHostRequest {
            host: Some(host_proto(&self.host, &self.traffic)),
            interval: None,
        });
        request.set_timeout(REQUEST_TIMEOUT);
        SchedulerClient::new(channel).announce_host(request).await?;
        self.announced
            .lock()
            .expect("announced")
            .insert(addr.to_string());
        Ok(())
    }

    /// Announces this host to the schedulers it has not announced itself to yet (new ones
    /// from the manager), so they know it before its first download there.
    pub async fn announce_new(&self) {
        let fresh: Vec<String> = {
            let announced = self.announced.lock().expect("announced");
            self.order("")
                .into_iter()
                .filter(|a| !announced.contains(a))
                .collect()
        };
        for addr in fresh {
            if let Err(status) = self.announce_to(&addr).await {
                debug!(addr, error = status.message(), "announce host failed");
                self.forget(&addr);
            }
        }
    }

    /// Announces this host to every scheduler, every `interval`, forever.
    pub async fn announce_loop(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval.max(Duration::from_secs(1)));
        loop {
            ticker.tick().await;
            for addr in self.order("") {
                let addr = addr.as_str();
                if let Err(status) = self.announce_to(addr).await {
                    debug!(addr, error = status.message(), "announce host failed");
                    self.forget(addr);
                }
            }
        }
    }

    /// Registers on one scheduler and waits for its first answer. A scheduler that lost
    /// this host (it restarted) gets the host announced again and the registration retried.
    async fn try_register(
        &self,
        addr: &str,
        task_id: &str,
        peer_id: &str,
        download: Download,
    ) -> Result<AnnounceStream, RegisterFailure> {
        let unavailable = |e: String| RegisterFailure::Unavailable(e);
        let mut reannounced = false;
        loop {
            let announced = self.announced.lock().expect("announced").contains(addr);
            if !announced {
                self.announce_to(addr)
                    .await
                    .map_err(|s| unavailable(s.message().to_string()))?;
            }
            let channel = self
                .channel(addr)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let (tx, rx) = mpsc::channel(ANNOUNCE_BUFFER);
            let announce = Announce {
                addr: addr.to_string(),
                host_id: self.host.host_id.clone(),
                task_id: task_id.to_string(),
                peer_id: peer_id.to_string(),
                tx,
            };
            announce.send(Event::RegisterPeerRequest(RegisterPeerRequest {
                download: Some(download.clone()),
            }));
            let mut client = SchedulerClient::new(channel).max_decoding_message_size(64 << 20);
            let first = match client
                .announce_peer(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(r) => {
                    let mut responses = r.into_inner();
                    match tokio::time::timeout(self.schedule_timeout, responses.message()).await {
                        Ok(Ok(Some(m))) => Ok((m.response, responses)),
                        Ok(Ok(None)) => Err(tonic::Status::unavailable("stream closed at once")),
                        Ok(Err(status)) => Err(status),
                        Err(_) => Err(tonic::Status::unavailable(format!(
                            "no answer within scheduler.scheduleTimeout ({:?})",
                            self.schedule_timeout
                        ))),
                    }
                }
                Err(status) => Err(status),
            };
            match first {
                Ok((first, responses)) => {
                    info!(addr, task_id, peer_id, "registered with scheduler");
                    return Ok(AnnounceStream {
                        announce,
                        first,
                        responses,
                    });
                }
                Err(status) if status.code() == tonic::Code::NotFound && !reannounced => {
                    debug!(addr, "scheduler does not know this host; announcing again");
                    self.announced.lock().expect("announced").remove(addr);
                    reannounced = true;
                }
                Err(status) if is_refusal(&status) => {
                    return Err(RegisterFailure::Refused(status.message().to_string()))
                }
                Err(status) => return Err(unavailable(status.message().to_string())),
            }
        }
    }
}

/// Whether a scheduler's error refuses this download (as opposed to the scheduler being
/// unavailable, where the download goes on without it).
pub(crate) fn is_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
    )
}

enum RegisterFailure {
    Unavailable(String),
    Refused(String),
}

/// The sending half of one AnnouncePeer stream.
#[derive(Clone)]
pub struct Announce {
    pub addr: String,
    host_id: String,
    task_id: String,
    peer_id: String,
    tx: mpsc::Sender<AnnouncePeerRequest>,
}

/// An AnnouncePeer stream: send events, receive responses.
pub struct AnnounceStream {
    pub announce: Announce,
    /// The scheduler's first answer.
    pub first: Option<announce_peer_response::Response>,
    pub responses: tonic::Streaming<AnnouncePeerResponse>,
}

impl Announce {
    /// Queues an event; a full or closed stream drops it (the scheduler is gone or slow,
    /// and the download goes on without it).
    pub fn send(&self, event: Event) {
        let request = AnnouncePeerRequest {
            host_id: self.host_id.clone(),
            task_id: self.task_id.clone(),
            peer_id: self.peer_id.clone(),
            request: Some(event),
        };
        if self.tx.try_send(request).is_err() {
            debug!(
                addr = self.addr,
                "announce stream is closed or full; event dropped"
            );
        }
    }
}

impl Schedulers {
    /// What the task's scheduler knows of `task_id`, if it answers quickly.
    pub async fn stat_task(&self, task_id: &str) -> Option<dragonfly_api::common::v2::Task> {
        let addr = self.order(task_id).into_iter().next()?;
        let channel = self.channel(&addr).await.ok()?;
        let mut request = tonic::Request::new(StatTaskRequest {
            host_id: self.host.host_id.clone(),
            task_id: task_id.to_string(),
        });
        request.set_timeout(Duration::from_secs(2));
        SchedulerClient::new(channel)
            .stat_task(request)
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Tells the task's scheduler that this host no longer holds `task_id` (removed by GC or
    /// on request), so it stops offering this host as a parent for it. Best effort: the
    /// scheduler also forgets the peer by its TTL, and a child offered a peer without the
    /// task reschedules. The first scheduler on the ring that answers is told.
    pub async fn forget_task(&self, task_id: &str) -> Result<(), SchedulerError> {
        let mut tried = Vec::new();
        for addr in self.order(task_id) {
            tried.push(addr.clone());
            let addr = &addr;
            let channel = match self.channel(addr).await {
                Ok(channel) => channel,
                Err(err) => {
                    debug!(addr, %err, "scheduler unreachable for delete task");
                    self.forget(addr);
                    continue;
                }
            };
            let mut request = tonic::Request::new(DeleteTaskRequest {
                host_id: self.host.host_id.clone(),
                task_id: task_id.to_string(),
            });
            request.set_timeout(REQUEST_TIMEOUT);
            match SchedulerClient::new(channel).delete_task(request).await {
                // Not found: the scheduler already forgot it (restart, TTL).
                Ok(_) => return Ok(()),
                Err(status) if status.code() == tonic::Code::NotFound => return Ok(()),
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    self.forget(addr);
                }
                Err(status) => {
                    return Err(SchedulerError::Refused {
                        addr: addr.clone(),
                        message: status.message().to_string(),
                    })
                }
            }
        }
        Err(SchedulerError::Unreachable(tried.join(", ")))
    }

    /// Registers a peer of `task_id` with the task's scheduler (failing over along the
    /// ring to the next one that answers) and returns the open announce stream.
    pub async fn open(
        &self,
        task_id: &str,
        peer_id: &str,
        download: Download,
    ) -> Result<AnnounceStream, SchedulerError> {
        let mut tried = Vec::new();
        for addr in self.order(task_id) {
            tried.push(addr.clone());
            let addr = &addr;
            match self
                .try_register(addr, task_id, peer_id, download.clone())
                .await
            {
                Ok(a) => return Ok(a),
                Err(RegisterFailure::Unavailable(reason)) => {
                    warn!(addr, reason, "scheduler unavailable, trying the next one");
                    self.forget(addr);
                }
                Err(RegisterFailure::Refused(message)) => {
                    return Err(SchedulerError::Refused {
                        addr: addr.clone(),
                        message,
                    })
                }
            }
        }
        Err(SchedulerError::Unreachable(tried.join(", ")))
    }
}
