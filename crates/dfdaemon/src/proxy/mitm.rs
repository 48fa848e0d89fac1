//! HTTPS interception for the hosts `proxy.hijackHTTPS` names: the proxy terminates the
//! client's TLS with a leaf certificate for the host, signed by a CA the client trusts.
//!
//! The CA is `proxy.server.caCert`/`caKey` when configured; otherwise one is generated on
//! first use and kept in `<storage.dir>/proxy-ca/` (`ca.crt`, and `ca.key` readable by its
//! owner only), so a client trusts it once, not after every restart.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio_rustls::TlsAcceptor;

/// Leaf configurations kept at most (one per intercepted host name).
const MAX_LEAVES: usize = 1024;

/// Why interception cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum MitmError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable CA {what}: {reason}")]
    BadCa {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("cannot make a certificate for {host}: {reason}")]
    Leaf { host: String, reason: String },
}

/// The interception CA and the leaves it signed.
pub struct Mitm {
    issuer: Issuer<'static, KeyPair>,
    /// Where the CA certificate is, for the user to trust.
    pub ca_path: PathBuf,
    leaves: Mutex<HashMap<String, TlsAcceptor>>,
}

impl std::fmt::Debug for Mitm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mitm")
            .field("ca_path", &self.ca_path)
            .finish()
    }
}

impl Mitm {
    /// Uses the configured CA.
    pub fn load(cert: &Path, key: &Path) -> Result<Mitm, MitmError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| MitmError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let key_pair = KeyPair::from_pem(&read(key)?).map_err(|e| MitmError::BadCa {
            path: key.to_path_buf(),
            what: "key (PKCS#8 PEM, ECDSA, Ed25519 or RSA)",
            reason: e.to_string(),
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&read(cert)?, key_pair).map_err(|e| MitmError::BadCa {
                path: cert.to_path_buf(),
                what: "certificate (PEM)",
                reason: e.to_string(),
            })?;
        Ok(Mitm {
            issuer,
            ca_path: cert.to_path_buf(),
            leaves: Mutex::default(),
        })
    }

    /// Uses the CA kept in `dir`, generating it on first use. Returns whether it was made now.
    pub fn load_or_generate(dir: &Path) -> Result<(Mitm, bool), MitmError> {
        let cert = dir.join("ca.crt");
        let key = dir.join("ca.key");
        if cert.exists() && key.exists() {
            return Ok((Mitm::load(&cert, &key)?, false));
        }
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| MitmError::Write { path, source }
        };
        std::fs::create_dir_all(dir).map_err(write_err(dir))?;
        let key_pair = KeyPair::generate().map_err(|e| MitmError::Leaf {
            host: "the CA".into(),
            reason: e.to_string(),
        })?;
        let params = ca_params();
        let ca = params.self_signed(&key_pair).map_err(|e| MitmError::Leaf {
            host: "the CA".into(),
            reason: e.to_string(),
        })?;
        // The key first, private from the start; the certificate last marks it complete.
        write_private(&key, key_pair.serialize_pem().as_bytes()).map_err(write_err(&key))?;
        std::fs::write(&cert, ca.pem()).map_err(write_err(&cert))?;
        Ok((
            Mitm {
                issuer: Issuer::new(params, key_pair),
                ca_path: cert,
                leaves: Mutex::default(),
            },
            true,
        ))
    }

    /// A TLS acceptor presenting a leaf for `host` (a name or an IP address).
    pub fn acceptor(&self, host: &str) -> Result<TlsAcceptor, MitmError> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if let Some(acceptor) = self.leaves.lock().expect("leaves").get(&host) {
            return Ok(acceptor.clone());
        }
        let err = |reason: String| MitmError::Leaf {
            host: host.clone(),
            reason,
        };
        let key = KeyPair::generate().map_err(|e| err(e.to_string()))?;
        let mut params =
            CertificateParams::new(vec![host.clone()]).map_err(|e| err(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, host.clone());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let leaf = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| err(e.to_string()))?;
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| err(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key_der)
        .map_err(|e| err(e.to_string()))?;
        // The tunnel speaks HTTP/1.1 to the client whatever the origin speaks.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let mut leaves = self.leaves.lock().expect("leaves");
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(host, acceptor.clone());
        Ok(acceptor)
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, "Dragonfly dfdaemon proxy CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Dragonfly");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn generated_ca_is_kept_and_signs_leaves_a_client_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let (mitm, generated) = Mitm::load_or_generate(&dir.path().join("ca")).unwrap();
        assert!(generated);
        let mode = std::fs::metadata(dir.path().join("ca/ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let (again, generated) = Mitm::load_or_generate(&dir.path().join("ca")).unwrap();
        assert!(!generated, "the CA is reused, not made again");
        drop(mitm);

        // A TLS client trusting only the CA file accepts the leaf for the host it asked.
        let acceptor = again.acceptor("registry.test").unwrap();
        let ca_pem = std::fs::read(&again.ca_path).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&ca_pem) {
            roots.add(cert).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut tls = acceptor.accept(a).await?;
            tls.write_all(b"hello").await?;
            tls.shutdown().await
        });
        let name = rustls::pki_types::ServerName::try_from("registry.test").unwrap();
        let mut tls = connector
            .connect(name, b)
            .await
            .expect("client trusts the leaf");
        let mut got = Vec::new();
        use tokio::io::AsyncReadExt;
        tls.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        server.await.unwrap().unwrap();

        // A leaf for an IP address too.
        again.acceptor("127.0.0.1").unwrap();
    }

    #[test]
    fn a_bad_configured_ca_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "not a cert").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let err = Mitm::load(&cert, &key).unwrap_err().to_string();
        assert!(err.contains("k.pem"), "{err}");
        let err = Mitm::load(&cert, &dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }

    fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(pem)
            .map(|c| c.unwrap())
            .collect()
    }
}
