//! Identifiers, piece arithmetic and digests shared by every Dragonfly component.
//!
//! This crate is the bottom of the crate graph: it performs no I/O, knows nothing about tokio,
//! gRPC or storage, and every function in it is deterministic. Wire compatibility with upstream
//! Dragonfly lives here: a task ID computed by this crate is bit-for-bit the ID an upstream peer
//! computes for the same request.

pub mod digest;
pub mod hashring;
pub mod id;
pub mod piece;

/// The metric label of a priority number from the wire: only the values of upstream's
/// `Priority` enum (LEVEL0..LEVEL6), so remote input cannot grow a label set.
pub fn priority_label(priority: i32) -> &'static str {
    const LABELS: [&str; 7] = ["0", "1", "2", "3", "4", "5", "6"];
    usize::try_from(priority)
        .ok()
        .and_then(|i| LABELS.get(i).copied())
        .unwrap_or("invalid")
}

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use hashring::HashRing;
pub use id::{is_task_id, HostIdentity, IdError, TaskIdParams, TASK_ID_LEN};
pub use piece::{PieceError, PieceLayout};
