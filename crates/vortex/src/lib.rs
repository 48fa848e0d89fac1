//! The Vortex piece-transfer protocol over TCP, built on the official `vortex-protocol` codec.
//!
//! A request is one `DownloadPiece` packet (task ID + piece number). The answer is either an
//! `Error` packet or a `PieceContent` packet carrying the piece metadata, followed on the same
//! connection by exactly `metadata.length` raw bytes. A connection carries any number of
//! request/answer rounds, one at a time, until either side closes it or sends `Close`.
//!
//! This crate knows nothing about storage: the server asks a [`PieceProvider`] for pieces.

mod client;
mod frame;
mod server;

pub use client::{encode_request, Client};
pub use frame::{read_packet, MAX_CONTROL_VALUE_LEN};
pub use server::{serve, OpenedPiece, PieceProvider, ServeError, ServerLimits};
pub use vortex_protocol::tlv::error::Code;
pub use vortex_protocol::tlv::piece_metadata::PieceMetadata;

/// Vortex transport failures.
#[derive(Debug, thiserror::Error)]
pub enum VortexError {
    #[error("vortex i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed vortex packet: {0}")]
    Protocol(String),
    #[error("peer answered {code:?}: {message}")]
    Remote { code: Code, message: String },
    #[error("peer closed the connection")]
    Closed,
}

impl VortexError {
    /// True when the parent said it does not have the piece (another parent may).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            VortexError::Remote {
                code: Code::NotFound,
                ..
            }
        )
    }
}
