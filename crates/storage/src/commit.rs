//! Durable piece records: a piece record is committed to the metadata store only after the
//! content file's bytes are synced to disk (fdatasync), so a power loss cannot leave a
//! record whose bytes never reached the disk. Records wait in memory (where they are
//! already visible, so pieces are served at once) and are committed in batches: one sync
//! per task and one metadata transaction per round, every [`COMMIT_INTERVAL`] or on
//! [`Committer::flush`].

use crate::metadata::{MetadataStore, PieceMeta};
use crate::{Result, StorageError};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tracing::warn;

/// How long records wait to be batched.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(200);

/// Faults a test can inject (compiled only into tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Fault {
    #[default]
    None,
    /// The process dies between writing the bytes and syncing them: nothing is committed.
    CrashBeforeSync,
    /// The disk loses unsynced bytes although the records are committed (what a disk that
    /// lies about flushes does): the content is zeroed behind the records' back.
    LoseBytesAfterCommit,
}

#[derive(Default)]
struct Pending {
    /// task -> piece number -> record, with the content file to sync first.
    tasks: HashMap<String, (PathBuf, BTreeMap<u32, PieceMeta>)>,
    shutdown: bool,
}

pub(crate) struct Committer {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Held for a whole commit round, so a flush sees every earlier record committed.
    round: Mutex<()>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    #[cfg(test)]
    pub(crate) fault: Mutex<Fault>,
}

impl Committer {
    pub(crate) fn start(metadata: Arc<MetadataStore>) -> Arc<Committer> {
        let committer = Arc::new(Committer {
            pending: Mutex::default(),
            wake: Condvar::new(),
            round: Mutex::new(()),
            thread: Mutex::new(None),
            #[cfg(test)]
            fault: Mutex::default(),
        });
        let weak = Arc::downgrade(&committer);
        let handle = std::thread::Builder::new()
            .name("storage-commit".into())
            .spawn(move || loop {
                let Some(c) = weak.upgrade() else { return };
                {
                    let guard = c.pending.lock().unwrap_or_else(|e| e.into_inner());
                    let (guard, _) = c
                        .wake
                        .wait_timeout_while(guard, Duration::from_secs(1), |p| {
                            p.tasks.is_empty() && !p.shutdown
                        })
                        .unwrap_or_else(|e| e.into_inner());
                    if guard.shutdown {
                        return; // the shutdown flushed what there was
                    }
                }
                // Gather what arrives meanwhile into the same round.
                std::thread::sleep(COMMIT_INTERVAL);
                if let Err(err) = c.commit_round(&metadata, None) {
                    warn!(%err, "committing piece records failed; retrying");
                }
            })
            .expect("spawn the storage commit thread");
        *committer.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        committer
    }

    /// Queues a record of a piece whose bytes are in `content`.
    pub(crate) fn add(&self, task_id: &str, content: PathBuf, piece: PieceMeta) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.tasks
            .entry(task_id.to_string())
            .or_insert_with(|| (content, BTreeMap::new()))
            .1
            .insert(piece.number, piece);
        self.wake.notify_one();
    }

    /// A record not yet committed.
    pub(crate) fn get(&self, task_id: &str, number: u32) -> Option<PieceMeta> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.tasks.get(task_id)?.1.get(&number).cloned()
    }

    /// Records of a task not yet committed.
    pub(crate) fn all(&self, task_id: &str) -> Vec<PieceMeta> {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.tasks
            .get(task_id)
            .map(|(_, m)| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets a task's uncommitted records (it is deleted or rebuilt).
    pub(crate) fn forget(&self, task_id: &str) {
        let _round = self.round.lock().unwrap_or_else(|e| e.into_inner());
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tasks
            .remove(task_id);
    }

    /// Commits every record of `task_id` queued so far (all tasks when `None`).
    pub(crate) fn flush(&self, metadata: &MetadataStore, task_id: Option<&str>) -> Result<()> {
        self.commit_round(metadata, task_id)
    }

    fn commit_round(&self, metadata: &MetadataStore, only: Option<&str>) -> Result<()> {
        let _round = self.round.lock().unwrap_or_else(|e| e.into_inner());
        let batch: Vec<(String, PathBuf, Vec<PieceMeta>)> = {
            let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let ids: Vec<String> = match only {
                Some(id) => p
                    .tasks
                    .contains_key(id)
                    .then(|| id.to_string())
                    .into_iter()
                    .collect(),
                None => p.tasks.keys().cloned().collect(),
            };
            // Taken out only once committed: until then they stay visible.
            ids.into_iter()
                .filter_map(|id| {
                    let (path, records) = p.tasks.get(&id)?;
                    Some((id, path.clone(), records.values().cloned().collect()))
                })
                .collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        let fault = *self.fault.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(test)]
        if fault == Fault::CrashBeforeSync {
            // The "process" dies here: nothing reaches the metadata, nothing after runs.
            return Err(StorageError::Metadata("simulated crash before sync".into()));
        }
        let mut synced = Vec::new();
        for (id, path, records) in batch {
            match std::fs::File::open(&path).and_then(|f| f.sync_data()) {
                Ok(()) => synced.push((id, records)),
                // A task deleted meanwhile has no file: its records are dropped below.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => synced.push((id, Vec::new())),
                Err(source) => return Err(StorageError::Io { path, source }),
            }
        }
        let records: Vec<(&str, &PieceMeta)> = synced
            .iter()
            .flat_map(|(id, rs)| rs.iter().map(move |r| (id.as_str(), r)))
            .collect();
        metadata.put_pieces(&records)?;
        #[cfg(test)]
        if fault == Fault::LoseBytesAfterCommit {
            for (id, rs) in &synced {
                let path = {
                    let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.tasks.get(id).map(|(path, _)| path.clone())
                };
                if let Some(path) = path {
                    zero_ranges(&path, rs);
                }
            }
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (id, rs) in synced {
            if let Some((_, records)) = p.tasks.get_mut(&id) {
                for r in rs {
                    // A newer record of the same piece queued meanwhile stays queued.
                    if records.get(&r.number) == Some(&r) {
                        records.remove(&r.number);
                    }
                }
                if records.is_empty() {
                    p.tasks.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// Commits everything and stops the thread (waiting for it, so that the metadata
    /// store is closed when this returns).
    pub(crate) fn shutdown(&self, metadata: &MetadataStore) -> Result<()> {
        let result = self.flush(metadata, None);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown = true;
        self.wake.notify_one();
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle {
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
        result
    }
}

#[cfg(test)]
fn zero_ranges(path: &std::path::Path, records: &[PieceMeta]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for r in records {
        file.write_all_at(&vec![0u8; r.length as usize], r.offset)
            .unwrap();
    }
}
