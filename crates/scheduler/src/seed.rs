//! Seed peers: which one serves a task (consistent hashing of the task ID over the seed
//! peers), and how it is told to fetch the task (its DfdaemonUpload.DownloadTask).

use d7y_types::HashRing;
use dragonfly_api::common::v2::Download;
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::{download_task_response, DownloadTaskRequest};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a seed peer may take for one task (upstream: 10 h).
pub const SEED_DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(10 * 3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The configured seed peers.
#[derive(Clone)]
pub struct SeedPeers {
    ring: HashRing<String>,
    /// Mutual TLS towards the seed peers (the scheduler's own identity, `server.tls`).
    tls: Option<std::sync::Arc<d7y_net::ClientTls>>,
}

/// Why a trigger failed.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("no seed peer is configured")]
    NoSeedPeer,
    #[error("seed peer {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("seed peer {addr} failed the download: {reason}")]
    Failed { addr: String, reason: String },
}

impl SeedPeers {
    /// `addrs` are `host:port` of the seed peers' upload services.
    pub fn new(addrs: Vec<String>) -> SeedPeers {
        SeedPeers {
            ring: HashRing::new(addrs),
            tls: None,
        }
    }

    /// Talks to the seed peers over mutual TLS.
    pub fn with_tls(mut self, tls: Option<std::sync::Arc<d7y_net::ClientTls>>) -> SeedPeers {
        self.tls = tls;
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The seed peers in the order they are tried for a task.
    pub fn for_task(&self, task_id: &str) -> Vec<String> {
        self.ring.successors(task_id).cloned().collect()
    }

    /// Asks the task's seed peer (or the next one on the ring if it is unreachable) to
    /// download it from the origin, and waits until that download ends. The download runs
    /// while this future runs; the seed peer registers with us like any peer, so its pieces
    /// are offered to others as soon as it reports them.
    pub async fn trigger(
        &self,
        task_id: &str,
        mut download: Download,
    ) -> Result<String, TriggerError> {
        download.need_back_to_source = true;
        // The first registrant's local-only options mean nothing to the seed peer, which
        // refuses them from the network.
        download.output_path = None;
        download.overwrite = false;
        download.force_hard_link = false;
        download.need_piece_content = false;
        let mut last = TriggerError::NoSeedPeer;
        for addr in self.for_task(task_id) {
            let options = d7y_net::ChannelOptions {
                tls: self.tls.clone(),
                local: None,
                connect_timeout: Some(CONNECT_TIMEOUT),
                keepalive: Some((Duration::from_secs(10), Duration::from_secs(5))),
            };
            let channel = match d7y_net::channel(&addr, &options).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(task_id, addr, error = %e, "seed peer unreachable, trying the next one");
                    last = TriggerError::Unreachable {
                        addr: addr.clone(),
                        reason: e.to_string(),
                    };
                    continue;
                }
            };
            info!(task_id, addr, "triggering seed peer");
            let mut client =
                DfdaemonUploadClient::new(channel).max_decoding_message_size(usize::MAX);
            let mut request = tonic::Request::new(DownloadTaskRequest {
                download: Some(download.clone()),
            });
            request.set_timeout(SEED_DOWNLOAD_TIMEOUT);
            let mut stream = match client.download_task(request).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    return Err(TriggerError::Failed {
                        addr,
                        reason: status.message().to_string(),
                    })
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        if let Some(
                            download_task_response::Response::DownloadTaskStartedResponse(_),
                        ) = msg.response
                        {
                            debug!(task_id, addr, "seed peer started");
                        }
                    }
                    Ok(None) => return Ok(addr),
                    Err(status) => {
                        return Err(TriggerError::Failed {
                            addr,
                            reason: status.message().to_string(),
                        })
                    }
                }
            }
        }
        Err(last)
    }
}
