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

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use hashring::HashRing;
pub use id::{HostIdentity, IdError, TaskIdParams};
pub use piece::{PieceError, PieceLayout};
