//! Test fixtures shared by the end-to-end tests: an HTTP origin that counts the bytes it
//! serves (with or without Range support, optionally throttled), and a harness that runs the
//! real `dfdaemon` and `dfget` binaries on loopback with private ports and directories.

pub mod bench;
mod daemon;
pub mod hub;
pub mod manager;
mod origin;

pub mod netns;
pub mod rigs;
pub mod stores;
pub mod swarm;
pub mod webhdfs;
pub use daemon::{bin_path, free_port, Daemon, DaemonOptions, DaemonTls, Scheduler};
pub use manager::Manager;
pub use origin::{Origin, OriginOptions};
pub use swarm::Swarm;

/// Deterministic pseudo-random content of `len` bytes.
pub fn content(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}
