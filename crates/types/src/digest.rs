//! Digests in upstream's `<algorithm>:<encoded>` text form.
//!
//! Pieces carry `crc32:<decimal>` (CRC-32/IEEE). Whole files may be checked with `crc32`,
//! `sha256` or `sha512` (hex).

use sha2::Digest as _;
use std::fmt;
use std::str::FromStr;

/// A digest algorithm supported on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Crc32,
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "crc32",
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a digest string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("invalid digest {0:?}: expected <algorithm>:<value>, e.g. sha256:<64 hex chars>")]
    Malformed(String),
    #[error("unsupported digest algorithm {0:?}: use crc32, sha256 or sha512")]
    UnsupportedAlgorithm(String),
    #[error("invalid {algorithm} digest value {value:?}")]
    BadValue { algorithm: Algorithm, value: String },
}

/// A parsed digest; the encoded value is normalised (lowercase hex, decimal crc32).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Digest {
    algorithm: Algorithm,
    encoded: String,
}

impl Digest {
    /// The digest of a piece: `crc32:<decimal>`.
    pub fn crc32(value: u32) -> Self {
        Digest {
            algorithm: Algorithm::Crc32,
            encoded: value.to_string(),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn encoded(&self) -> &str {
        &self.encoded
    }

    /// Digest of a byte slice.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut hasher = Hasher::new(algorithm);
        hasher.update(data);
        hasher.finalize()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm, self.encoded)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algorithm, value) = s
            .split_once(':')
            .ok_or_else(|| DigestError::Malformed(s.to_string()))?;
        let algorithm = match algorithm.to_ascii_lowercase().as_str() {
            "crc32" => Algorithm::Crc32,
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(DigestError::UnsupportedAlgorithm(other.to_string())),
        };
        let bad = || DigestError::BadValue {
            algorithm,
            value: value.to_string(),
        };
        let encoded = match algorithm {
            Algorithm::Crc32 => value.parse::<u32>().map_err(|_| bad())?.to_string(),
            Algorithm::Sha256 | Algorithm::Sha512 => {
                let want = if algorithm == Algorithm::Sha256 {
                    64
                } else {
                    128
                };
                if value.len() != want || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad());
                }
                value.to_ascii_lowercase()
            }
        };
        Ok(Digest { algorithm, encoded })
    }
}

/// An incremental hasher for any supported algorithm.
pub enum Hasher {
    Crc32(crc32fast::Hasher),
    Sha256(Box<sha2::Sha256>),
    Sha512(Box<sha2::Sha512>),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Crc32 => Hasher::Crc32(crc32fast::Hasher::new()),
            Algorithm::Sha256 => Hasher::Sha256(Box::default()),
            Algorithm::Sha512 => Hasher::Sha512(Box::default()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Crc32(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finalize(self) -> Digest {
        match self {
            Hasher::Crc32(h) => Digest::crc32(h.finalize()),
            Hasher::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                encoded: hex::encode(h.finalize()),
            },
            Hasher::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                encoded: hex::encode(h.finalize()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_normalises() {
        let d: Digest = "SHA256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"
            .parse()
            .unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha256, b""));
        let d: Digest = "crc32:0".parse().unwrap();
        assert_eq!(d, Digest::of(Algorithm::Crc32, b""));
        assert_eq!(
            Digest::of(Algorithm::Crc32, b"hello").to_string(),
            "crc32:907060870"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let cases = [
            ("nocolon", "expected <algorithm>:<value>"),
            ("md5:abc", "unsupported digest algorithm"),
            ("sha256:abc", "invalid sha256 digest value"),
            ("crc32:-1", "invalid crc32 digest value"),
            ("sha512:zz", "invalid sha512 digest value"),
        ];
        for (input, message) in cases {
            let err = input.parse::<Digest>().unwrap_err().to_string();
            assert!(err.contains(message), "{input}: {err}");
        }
    }

    #[test]
    fn incremental_equals_one_shot() {
        for algorithm in [Algorithm::Crc32, Algorithm::Sha256, Algorithm::Sha512] {
            let mut h = Hasher::new(algorithm);
            h.update(b"hel");
            h.update(b"lo");
            assert_eq!(h.finalize(), Digest::of(algorithm, b"hello"));
        }
    }
}
