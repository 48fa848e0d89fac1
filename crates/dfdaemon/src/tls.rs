//! The daemon's TLS identities, from its config (upstream's keys): `upload.server` for its
//! upload gRPC and piece (Vortex) servers, `upload.client` towards other peers,
//! `scheduler` towards the schedulers and `manager` towards the manager. Each is optional; files are re-read when they change.

use crate::DaemonError;
use d7y_config::dfdaemon::Config;
use d7y_net::{ClientTls, ServerTls, TlsFiles};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How often certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(10);

pub(crate) struct Identities {
    pub server: Option<Arc<ServerTls>>,
    pub peers: Option<Arc<ClientTls>>,
    pub scheduler: Option<Arc<ClientTls>>,
    pub manager: Option<Arc<ClientTls>>,
}

fn files(
    ca_cert: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Option<TlsFiles> {
    (ca_cert.is_some() || cert.is_some() || key.is_some()).then(|| TlsFiles {
        ca_cert: ca_cert.clone(),
        cert: cert.clone(),
        key: key.clone(),
    })
}

impl Identities {
    pub(crate) fn load(config: &Config) -> Result<Identities, DaemonError> {
        let fail = |key: &str, e: d7y_net::TlsError| DaemonError::Setup(format!("{key}: {e}"));
        let server = &config.upload.server;
        let client = &config.upload.client;
        let scheduler = &config.scheduler;
        let manager = &config.manager;
        Ok(Identities {
            manager: files(&manager.ca_cert, &manager.cert, &manager.key)
                .map(|f| ClientTls::load(f, Some(RELOAD_INTERVAL)))
                .transpose()
                .map_err(|e| fail("manager", e))?,
            server: files(&server.ca_cert, &server.cert, &server.key)
                .map(|f| ServerTls::load(f, Some(RELOAD_INTERVAL)))
                .transpose()
                .map_err(|e| fail("upload.server", e))?,
            peers: files(&client.ca_cert, &client.cert, &client.key)
                .map(|f| ClientTls::load(f, Some(RELOAD_INTERVAL)))
                .transpose()
                .map_err(|e| fail("upload.client", e))?,
            scheduler: files(&scheduler.ca_cert, &scheduler.cert, &scheduler.key)
                .map(|f| ClientTls::load(f, Some(RELOAD_INTERVAL)))
                .transpose()
                .map_err(|e| fail("scheduler", e))?,
        })
    }
}
