//! What the scheduler accepts from the network, and how much memory a peer can make it
//! spend. Every number a peer sends is checked against what the scheduler already knows
//! before it touches the swarm model; everything here is pure and tested by tables.
//!
//! Memory, worst case (also in SECURITY.md):
//! - a host: its announcement (at most [`MAX_HOST_BYTES`] encoded) and its peer set;
//!   at most [`MAX_HOSTS`] hosts, [`MAX_HOSTS_PER_IP`] per source address;
//! - a task: its first registration (at most [`MAX_DOWNLOAD_BYTES`] encoded) and 8 bytes
//!   per piece for its digest book;
//! - a peer: about 1 KiB plus one bit per piece of its task (reserved at registration
//!   against [`MAX_PIECE_BITS`] for all peers together), a blocklist of at most
//!   [`MAX_BLOCKLIST`] parents and [`crate::evaluator::COST_WINDOW`] costs; at most
//!   [`MAX_PEERS`] peers, [`MAX_PEERS_PER_HOST`] per host (a host's oldest finished peer
//!   makes room for a new one).

use d7y_types::piece::{MAX_PIECE_LENGTH, MIN_PIECE_LENGTH};
use d7y_types::PieceLayout;
use dragonfly_api::common::v2 as common;
use prost::Message;

/// Hosts known at once.
pub const MAX_HOSTS: usize = 100_000;
/// Hosts announced from one source address (containers sharing a node's address).
pub const MAX_HOSTS_PER_IP: usize = 64;
/// Peers known at once.
pub const MAX_PEERS: usize = 1_000_000;
/// Peers of one host; beyond it, the host's least recently active finished peer goes.
pub const MAX_PEERS_PER_HOST: usize = 20_000;
/// Piece bits reserved by all peers together (1 GiB of bitsets).
pub const MAX_PIECE_BITS: u64 = 8 << 30;
/// Parents one peer may have blocklisted.
pub const MAX_BLOCKLIST: usize = 256;
/// Host and peer IDs: upstream's are `<ip>-<hostname>[-<uuid>][-seed]`.
pub const MAX_ID_LEN: usize = 512;
/// An encoded `common.v2.Download` of a registration (URL, headers, ...).
pub const MAX_DOWNLOAD_BYTES: usize = 64 * 1024;
/// An encoded `common.v2.Host` of an announcement.
pub const MAX_HOST_BYTES: usize = 16 * 1024;
/// The largest piece cost taken into account (one hour).
pub const MAX_COST_MS: u64 = 3_600_000;
/// Bandwidth figures are clamped to this (bits or bytes per second alike: 1 Pbit/s).
pub const MAX_BANDWIDTH: u64 = 1 << 50;
/// Candidate parents read from one reschedule request.
pub const MAX_RESCHEDULE_PARENTS: usize = 64;

/// Why a message was refused; the text names the field and the bound.
pub type Refusal = String;

/// Checks the IDs an announce message carries.
pub fn check_ids(host_id: &str, task_id: &str, peer_id: &str) -> Result<(), Refusal> {
    check_id("host_id", host_id)?;
    check_id("peer_id", peer_id)?;
    if !d7y_types::is_task_id(task_id) {
        return Err(format!(
            "task_id {:?} is not a task ID (64 lowercase hex characters)",
            truncate(task_id)
        ));
    }
    Ok(())
}

/// An ID is printable ASCII without spaces, at most [`MAX_ID_LEN`] bytes.
pub fn check_id(field: &str, id: &str) -> Result<(), Refusal> {
    if id.is_empty() {
        return Err(format!("{field} is required"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "{field} is {} bytes long; at most {MAX_ID_LEN} are accepted",
            id.len()
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{field} {:?} has characters outside printable ASCII",
            truncate(id)
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A task's layout as a registration states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Layout {
    pub content_length: Option<u64>,
    pub piece_length: Option<u64>,
    pub piece_count: Option<u32>,
}

impl Layout {
    /// Fills in the piece count from the two lengths.
    fn complete(mut self) -> Layout {
        if self.piece_count.is_none() {
            if let (Some(len), Some(pl)) = (self.content_length, self.piece_length) {
                self.piece_count = Some(PieceLayout::new(len, Some(pl)).piece_count());
            }
        }
        self
    }

    /// The first field two layouts disagree on, with both values.
    pub fn conflict(&self, other: &Layout) -> Option<String> {
        let pairs = [
            ("content length", self.content_length, other.content_length),
            ("piece length", self.piece_length, other.piece_length),
            (
                "piece count",
                self.piece_count.map(u64::from),
                other.piece_count.map(u64::from),
            ),
        ];
        pairs.into_iter().find_map(|(what, a, b)| match (a, b) {
            (Some(a), Some(b)) if a != b => Some(format!("{what} {b} differs from the task's {a}")),
            _ => None,
        })
    }
}

/// Validates the sizes of a registration and its encoded size.
pub fn check_download(
    download: &common::Download,
    max_content_length: u64,
) -> Result<Layout, Refusal> {
    let size = download.encoded_len();
    if size > MAX_DOWNLOAD_BYTES {
        return Err(format!(
            "the download is {size} bytes encoded (URL and headers); at most {MAX_DOWNLOAD_BYTES} are accepted"
        ));
    }
    let max_pieces = max_content_length.div_ceil(MIN_PIECE_LENGTH).max(1);
    let content_length = download.actual_content_length;
    if let Some(len) = content_length {
        if len > max_content_length {
            return Err(format!(
                "content length {len} exceeds this scheduler's limit of {max_content_length} bytes (scheduler.maxContentLength)"
            ));
        }
    }
    let piece_length = download.actual_piece_length.or(download.piece_length);
    if let Some(pl) = piece_length {
        if !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&pl) {
            return Err(format!(
                "piece length {pl} is outside {MIN_PIECE_LENGTH}..={MAX_PIECE_LENGTH}"
            ));
        }
    }
    let piece_count = match download.actual_piece_count {
        Some(count) if count > max_pieces => {
            return Err(format!(
                "piece count {count} exceeds the {max_pieces} pieces of the largest task this scheduler accepts"
            ))
        }
        Some(count) => Some(count as u32),
        None => None,
    };
    let layout = Layout {
        content_length,
        piece_length,
        piece_count,
    };
    let derived = Layout {
        piece_count: None,
        ..layout
    }
    .complete();
    if let Some(why) = derived.conflict(&layout) {
        return Err(format!("inconsistent sizes: {why}"));
    }
    Ok(layout.complete())
}

/// The CRC of a piece digest (`crc32:<decimal>`); an empty digest is `None`.
pub fn piece_crc(digest: &str) -> Result<Option<u32>, Refusal> {
    if digest.is_empty() {
        return Ok(None);
    }
    digest
        .strip_prefix("crc32:")
        .and_then(|v| v.parse::<u32>().ok())
        .map(Some)
        .ok_or_else(|| format!("piece digest {:?} is not crc32:<decimal>", truncate(digest)))
}

/// A piece report checked against the task's layout.
pub fn check_piece(piece: &common::Piece, layout: &Layout) -> Result<Option<u32>, Refusal> {
    let count = layout
        .piece_count
        .ok_or_else(|| "a piece was reported for a task whose size is unknown".to_string())?;
    if piece.number >= count {
        return Err(format!(
            "piece {} is out of range: the task has {count} pieces",
            piece.number
        ));
    }
    if let Some(pl) = layout.piece_length {
        if piece.length > pl {
            return Err(format!(
                "piece {} is {} bytes long, longer than the task's piece length {pl}",
                piece.number, piece.length
            ));
        }
    }
    piece_crc(&piece.digest)
}

/// A piece cost in milliseconds, clamped to [`MAX_COST_MS`].
pub fn cost_ms(cost: &prost_wkt_types::Duration) -> u64 {
    let millis = (cost.seconds.max(0) as u64)
        .saturating_mul(1000)
        .saturating_add(cost.nanos.max(0) as u64 / 1_000_000);
    millis.min(MAX_COST_MS)
}

/// Checks an announced host and clamps its figures.
pub fn check_host(host: &mut common::Host) -> Result<(), Refusal> {
    check_id("host.id", &host.id)?;
    let size = host.encoded_len();
    if size > MAX_HOST_BYTES {
        return Err(format!(
            "the host announcement is {size} bytes encoded; at most {MAX_HOST_BYTES} are accepted"
        ));
    }
    if host.ip.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "host.ip {:?} is not an IP address",
            truncate(&host.ip)
        ));
    }
    for (port, field) in [
        (host.port, "host.port"),
        (host.download_port, "host.download_port"),
    ] {
        if !(0..=65535).contains(&port) {
            return Err(format!("{field} {port} is not a port"));
        }
    }
    if let Some(net) = host.network.as_mut() {
        net.max_rx_bandwidth = net.max_rx_bandwidth.min(MAX_BANDWIDTH);
        net.max_tx_bandwidth = net.max_tx_bandwidth.min(MAX_BANDWIDTH);
        net.rx_bandwidth = net.rx_bandwidth.map(|b| b.min(MAX_BANDWIDTH));
        net.tx_bandwidth = net.tx_bandwidth.map(|b| b.min(MAX_BANDWIDTH));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIB: u64 = 1 << 40;
    const MIB: u64 = 1 << 20;

    fn dl(len: Option<u64>, pl: Option<u64>, count: Option<u64>) -> common::Download {
        common::Download {
            url: "http://o/f".into(),
            actual_content_length: len,
            actual_piece_length: pl,
            actual_piece_count: count,
            ..Default::default()
        }
    }

    #[test]
    fn registrations_table() {
        let max = 10 * TIB;
        let cases: [(common::Download, Result<Option<u32>, &str>); 9] = [
            (dl(Some(10 * MIB), Some(4 * MIB), Some(3)), Ok(Some(3))),
            (dl(Some(10 * MIB), Some(4 * MIB), None), Ok(Some(3))),
            (dl(None, None, None), Ok(None)),
            (dl(Some(0), Some(4 * MIB), Some(0)), Ok(Some(0))),
            (
                dl(Some(10 * MIB), Some(4 * MIB), Some(4)),
                Err("inconsistent"),
            ),
            (
                dl(Some(11 * TIB), Some(64 * MIB), None),
                Err("maxContentLength"),
            ),
            (dl(Some(10 * MIB), Some(1), None), Err("piece length 1")),
            (dl(None, None, Some(1 << 40)), Err("piece count")),
            (
                common::Download {
                    url: "x".repeat(MAX_DOWNLOAD_BYTES),
                    ..Default::default()
                },
                Err("encoded"),
            ),
        ];
        for (download, want) in cases {
            let got = check_download(&download, max).map(|l| l.piece_count);
            match (&got, want) {
                (Ok(a), Ok(b)) => assert_eq!(*a, b, "{download:?}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{e} lacks {needle}"),
                _ => panic!("{:?} -> {got:?}", download.actual_piece_count),
            }
        }
    }

    #[test]
    fn pieces_table() {
        let layout = Layout {
            content_length: Some(10 * MIB),
            piece_length: Some(4 * MIB),
            piece_count: Some(3),
        };
        let piece = |number, length, digest: &str| common::Piece {
            number,
            length,
            digest: digest.into(),
            ..Default::default()
        };
        assert_eq!(
            check_piece(&piece(2, 2 * MIB, "crc32:7"), &layout),
            Ok(Some(7))
        );
        assert_eq!(check_piece(&piece(0, 4 * MIB, ""), &layout), Ok(None));
        for (p, needle) in [
            (piece(3, 1, ""), "out of range"),
            (piece(u32::MAX, 1, ""), "out of range"),
            (piece(0, 5 * MIB, ""), "longer"),
            (piece(0, 1, "sha256:ab"), "crc32"),
            (piece(0, 1, "crc32:99999999999"), "crc32"),
        ] {
            let err = check_piece(&p, &layout).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        assert!(check_piece(&piece(0, 1, ""), &Layout::default())
            .unwrap_err()
            .contains("unknown"));
    }

    #[test]
    fn ids_costs_and_hosts() {
        let task = "ab".repeat(32);
        assert!(check_ids("127.0.0.1-h", &task, "127.0.0.1-h-1").is_ok());
        for (h, t, p) in [
            ("", task.as_str(), "p"),
            ("h", "t", "p"),
            ("h", task.as_str(), "with space"),
            (&"h".repeat(MAX_ID_LEN + 1), task.as_str(), "p"),
        ] {
            assert!(check_ids(h, t, p).is_err(), "{h:?} {t:?} {p:?}");
        }
        let huge = prost_wkt_types::Duration {
            seconds: i64::MAX,
            nanos: i32::MAX,
        };
        assert_eq!(cost_ms(&huge), MAX_COST_MS);
        let negative = prost_wkt_types::Duration {
            seconds: -5,
            nanos: -1,
        };
        assert_eq!(cost_ms(&negative), 0);

        let mut host = common::Host {
            id: "127.0.0.1-h".into(),
            ip: "127.0.0.1".into(),
            network: Some(common::Network {
                max_tx_bandwidth: u64::MAX,
                tx_bandwidth: Some(u64::MAX),
                ..Default::default()
            }),
            ..Default::default()
        };
        check_host(&mut host).unwrap();
        assert_eq!(
            host.network.as_ref().unwrap().max_tx_bandwidth,
            MAX_BANDWIDTH
        );
        host.ip = "not-an-ip".into();
        assert!(check_host(&mut host).unwrap_err().contains("host.ip"));
        host.ip = "127.0.0.1".into();
        host.port = 70000;
        assert!(check_host(&mut host).unwrap_err().contains("host.port"));
    }
}
