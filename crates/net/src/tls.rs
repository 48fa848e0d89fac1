//! TLS configs from PEM files (a CA, a certificate chain and its key), reloaded when the
//! files change. A server with a CA requires every client to present a certificate the CA
//! signed (mutual TLS); a client verifies the server against its CA, by the address it
//! connects to, and presents its own certificate when it has one.
//!
//! A reload that fails (a half-written file, a key that does not match) keeps the last good
//! config and logs why; the next change is tried again.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, SystemTime};
use tracing::{info, warn};

/// Why TLS could not be set up; names the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("invalid TLS setup: {0}")]
    Config(String),
}

/// The files of one TLS identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Verifies the other side (clients of a server, the server of a client).
    pub ca_cert: Option<PathBuf>,
    /// This side's certificate chain (PEM) and key; a client may go without.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        [&self.ca_cert, &self.cert, &self.key]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect()
    }

    fn stamp(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .into_iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read {
            what,
            path: path.into(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            what,
            path: path.into(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.into(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "key",
        path: path.into(),
        reason: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs("CA certificate", path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Config(format!("CA certificate {}: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

fn build_server(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let (Some(cert), Some(key)) = (&files.cert, &files.key) else {
        return Err(TlsError::Config(
            "a TLS server needs both cert and key".into(),
        ));
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &files.ca_cert {
        Some(ca) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                    .build()
                    .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(read_certs("certificate", cert)?, read_key(key)?)
        .map_err(|e| {
            TlsError::Config(format!(
                "certificate {} and key {}: {e}",
                cert.display(),
                key.display()
            ))
        })
}

fn build_client(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let Some(ca) = &files.ca_cert else {
        return Err(TlsError::Config(
            "a TLS client needs caCert to verify the server".into(),
        ));
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs("certificate", cert)?, read_key(key)?)
            .map_err(|e| {
                TlsError::Config(format!(
                    "certificate {} and key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            }),
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(TlsError::Config("set both cert and key, or neither".into())),
    }
}

/// A config that follows its files.
struct Reloading<C> {
    files: TlsFiles,
    current: RwLock<(Arc<C>, Vec<Option<SystemTime>>)>,
    build: fn(&TlsFiles) -> Result<C, TlsError>,
}

impl<C: Send + Sync + 'static> Reloading<C> {
    fn load(
        files: TlsFiles,
        build: fn(&TlsFiles) -> Result<C, TlsError>,
    ) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let config = build(&files)?;
        Ok(Reloading {
            files,
            current: RwLock::new((Arc::new(config), stamp)),
            build,
        })
    }

    fn get(&self) -> Arc<C> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Reloads when a file changed; returns whether a new config is in use.
    fn check(&self) -> bool {
        let stamp = self.files.stamp();
        if self.current.read().unwrap_or_else(|e| e.into_inner()).1 == stamp {
            return false;
        }
        match (self.build)(&self.files) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    (Arc::new(config), stamp);
                info!(files = ?self.files.paths(), "TLS certificates reloaded");
                true
            }
            Err(err) => {
                warn!(%err, "TLS files changed but do not load; keeping the previous certificates");
                // Remember the stamp so the same broken state is not retried every tick.
                self.current.write().unwrap_or_else(|e| e.into_inner()).1 = stamp;
                false
            }
        }
    }
}

/// Polls the files every `interval` while `target` lives.
fn watch<T: Send + Sync + 'static>(target: Weak<T>, interval: Duration, check: fn(&T) -> bool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(target) = target.upgrade() else {
                return;
            };
            check(&target);
        }
    });
}

/// The server side of a TLS identity.
pub struct ServerTls {
    config: Reloading<rustls::ServerConfig>,
}

impl ServerTls {
    /// Loads the files; with `reload`, checks them for changes at that interval (needs a
    /// tokio runtime).
    pub fn load(files: TlsFiles, reload: Option<Duration>) -> Result<Arc<ServerTls>, TlsError> {
        let tls = Arc::new(ServerTls {
            config: Reloading::load(files, build_server)?,
        });
        if let Some(interval) = reload {
            watch(Arc::downgrade(&tls), interval, |t: &ServerTls| {
                t.config.check()
            });
        }
        Ok(tls)
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.config.files.ca_cert.is_some()
    }

    /// An acceptor for the current certificates, offering `alpn`.
    pub fn acceptor(&self, alpn: &[Vec<u8>]) -> tokio_rustls::TlsAcceptor {
        let mut config = (*self.config.get()).clone();
        config.alpn_protocols = alpn.to_vec();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// Reloads now if the files changed (the watcher does this periodically).
    pub fn reload_if_changed(&self) -> bool {
        self.config.check()
    }
}

/// The client side of a TLS identity.
pub struct ClientTls {
    config: Reloading<rustls::ClientConfig>,
}

impl ClientTls {
    /// Loads the files; with `reload`, checks them for changes at that interval.
    pub fn load(files: TlsFiles, reload: Option<Duration>) -> Result<Arc<ClientTls>, TlsError> {
        let tls = Arc::new(ClientTls {
            config: Reloading::load(files, build_client)?,
        });
        if let Some(interval) = reload {
            watch(Arc::downgrade(&tls), interval, |t: &ClientTls| {
                t.config.check()
            });
        }
        Ok(tls)
    }

    /// A connector for the current certificates, asking for `alpn`.
    pub fn connector(&self, alpn: &[Vec<u8>]) -> tokio_rustls::TlsConnector {
        let mut config = (*self.config.get()).clone();
        config.alpn_protocols = alpn.to_vec();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    pub fn reload_if_changed(&self) -> bool {
        self.config.check()
    }
}
