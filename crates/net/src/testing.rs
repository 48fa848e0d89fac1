//! Certificates for tests: a CA, and leaves it signs for 127.0.0.1 (compiled only with the
//! `test-certs` feature; never part of a binary).

use crate::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::path::{Path, PathBuf};

/// A test CA that signs leaves into a directory.
pub struct TestCa {
    name: String,
    params: CertificateParams,
    key: KeyPair,
    dir: PathBuf,
}

impl TestCa {
    /// A new CA named `name`; its certificate is written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("ca cert");
        std::fs::create_dir_all(dir).expect("cert dir");
        std::fs::write(dir.join(format!("{name}-ca.pem")), cert.pem()).expect("write ca");
        TestCa {
            name: name.to_string(),
            params,
            key,
            dir: dir.to_path_buf(),
        }
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A leaf for `sans` (IP addresses or names) named `leaf`, written beside the CA;
    /// returns its files with this CA as `ca_cert`.
    pub fn leaf(&self, leaf: &str, sans: &[&str]) -> TlsFiles {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, leaf);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        let cert_path = self.dir.join(format!("{}-{leaf}.pem", self.name));
        let key_path = self.dir.join(format!("{}-{leaf}-key.pem", self.name));
        std::fs::write(&cert_path, cert.pem()).expect("write leaf");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        TlsFiles {
            ca_cert: Some(self.cert_path()),
            cert: Some(cert_path),
            key: Some(key_path),
        }
    }
}
