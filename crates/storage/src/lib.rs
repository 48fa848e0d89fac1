//! Peer-side task storage.
//!
//! Layout under `storage.dir` (as upstream): `content/tasks/<id[0..3]>/<id>` is one sparse file
//! per task with every piece written at its offset, and `metadata/` holds an embedded redb
//! database with a task record and one record per finished piece.
//!
//! **Invariant:** a piece record exists only after its bytes were written to the content file
//! and their CRC-32 computed, so any piece the metadata lists can be served as is. A task is
//! finished when its content length is known and every piece has a record.
//!
//! **Durability:** a record reaches the metadata store only after the content file was
//! synced ([`commit`]), and a task is marked finished only after its records did. Tasks
//! found at start-up are verified on first use this boot ([`Storage::verify_task`],
//! [`Storage::check_piece`]): a piece whose bytes do not match its CRC loses its record (the
//! task is downloaded again where it is missing), and is never served.
//!
//! Tasks in use hold a [`TaskLease`]; garbage collection never removes a leased task.

mod commit;
mod metadata;

pub use metadata::{PieceMeta, TaskMeta};

use commit::Committer;
use metadata::MetadataStore;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Storage failures, each naming what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage metadata error: {0}")]
    Metadata(String),
    #[error("storage i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("task {0} not found in local storage")]
    TaskNotFound(String),
    #[error("piece {number} of task {task_id} not found in local storage")]
    PieceNotFound { task_id: String, number: u32 },
    #[error("invalid task id {0:?}")]
    InvalidTaskId(String),
    #[error("storage worker failed: {0}")]
    Join(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Disk usage of the filesystem holding the storage directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub total: u64,
    pub available: u64,
}

impl DiskUsage {
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.available)
    }
}

struct Inner {
    dir: PathBuf,
    content_dir: PathBuf,
    metadata: Arc<MetadataStore>,
    committer: Arc<Committer>,
    /// Tasks found at start-up, with the pieces verified since: their bytes may not have
    /// survived a crash (or a disk that lied about a flush), so each is checked once.
    unverified: Mutex<HashMap<String, HashSet<u32>>>,
    /// task id -> number of live leases.
    leases: Mutex<HashMap<String, usize>>,
    /// task id -> last access (seconds), for accesses not worth a metadata write (piece uploads).
    touched: Mutex<HashMap<String, u64>>,
}

/// Task storage; cheap to clone.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

/// Keeps a task from being garbage collected while it is read or written.
pub struct TaskLease {
    inner: Arc<Inner>,
    task_id: String,
}

impl Drop for TaskLease {
    fn drop(&mut self) {
        let mut leases = self.inner.leases.lock().expect("lease lock");
        if let Some(count) = leases.get_mut(&self.task_id) {
            *count -= 1;
            if *count == 0 {
                leases.remove(&self.task_id);
            }
        }
    }
}

fn check_task_id(task_id: &str) -> Result<()> {
    let ok = task_id.len() >= 3
        && task_id.len() <= 128
        && task_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidTaskId(task_id.to_string()))
    }
}

impl Storage {
    /// Opens (creating if needed) the storage under `dir`. With `keep == false` every task
    /// left by an earlier run is removed first.
    pub fn open(dir: &Path, keep: bool) -> Result<Storage> {
        let content_dir = dir.join("content").join("tasks");
        let metadata_dir = dir.join("metadata");
        if !keep {
            for d in [&content_dir, &metadata_dir] {
                if d.exists() {
                    std::fs::remove_dir_all(d).map_err(io_err(d))?;
                }
            }
        }
        for d in [&content_dir, &metadata_dir] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        let metadata = Arc::new(MetadataStore::open(&metadata_dir.join("metadata.redb"))?);
        let unverified = metadata
            .list_tasks()?
            .into_iter()
            .map(|t| (t.id, HashSet::new()))
            .collect();
        let committer = Committer::start(metadata.clone());
        Ok(Storage {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                content_dir,
                metadata,
                committer,
                unverified: Mutex::new(unverified),
                leases: Mutex::default(),
                touched: Mutex::default(),
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Path of a task's content file.
    pub fn content_path(&self, task_id: &str) -> Result<PathBuf> {
        check_task_id(task_id)?;
        Ok(self.inner.content_dir.join(&task_id[..3]).join(task_id))
    }

    /// Takes a lease on a task (GC skips leased tasks).
    pub fn lease(&self, task_id: &str) -> TaskLease {
        *self
            .inner
            .leases
            .lock()
            .expect("lease lock")
            .entry(task_id.to_string())
            .or_default() += 1;
        TaskLease {
            inner: self.inner.clone(),
            task_id: task_id.to_string(),
        }
    }

    pub fn is_leased(&self, task_id: &str) -> bool {
        self.inner
            .leases
            .lock()
            .expect("lease lock")
            .contains_key(task_id)
    }

    /// Records an access that does not warrant a metadata write (a piece upload).
    pub fn touch(&self, task_id: &str) {
        self.inner
            .touched
            .lock()
            .expect("touch lock")
            .insert(task_id.to_string(), now_secs());
    }

    /// Last access of a task: the newer of its metadata and in-memory touches.
    pub fn last_access(&self, meta: &TaskMeta) -> u64 {
        let touched = self
            .inner
            .touched
            .lock()
            .expect("touch lock")
            .get(&meta.id)
            .copied()
            .unwrap_or_default();
        meta.accessed_at.max(touched)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StorageError::Join(e.to_string()))?
    }

    pub async fn task(&self, task_id: &str) -> Result<Option<TaskMeta>> {
        let id = task_id.to_string();
        self.blocking(move |inner| inner.metadata.task(&id)).await
    }

    /// Records a task; a finished task only after all its piece records are committed.
    pub async fn put_task(&self, meta: TaskMeta) -> Result<()> {
        check_task_id(&meta.id)?;
        self.blocking(move |inner| {
            if meta.is_finished() {
                inner.committer.flush(&inner.metadata, Some(&meta.id))?;
            }
            inner.metadata.put_task(&meta)
        })
        .await
    }

    /// Commits every queued piece record now (at shutdown).
    pub async fn flush_all(&self) -> Result<()> {
        self.blocking(|inner| inner.committer.flush(&inner.metadata, None))
            .await
    }

    /// Commits the task's piece records now (they are committed in batches otherwise).
    pub async fn flush(&self, task_id: &str) -> Result<()> {
        let id = task_id.to_string();
        self.blocking(move |inner| inner.committer.flush(&inner.metadata, Some(&id)))
            .await
    }

    /// Checks, once per boot, that the bytes of every piece of a task found at start-up
    /// match their CRCs. A piece that does not loses its record, and the task is no longer
    /// finished. Returns the pieces dropped.
    pub async fn verify_task(&self, task_id: &str) -> Result<Vec<u32>> {
        if !self.needs_verification(task_id) {
            return Ok(Vec::new());
        }
        let pieces = self.pieces(task_id).await?;
        let mut bad = Vec::new();
        for piece in &pieces {
            if !self.check_piece(task_id, piece).await? {
                bad.push(piece.number);
            }
        }
        self.inner
            .unverified
            .lock()
            .expect("verify lock")
            .remove(task_id);
        Ok(bad)
    }

    fn needs_verification(&self, task_id: &str) -> bool {
        self.inner
            .unverified
            .lock()
            .expect("verify lock")
            .contains_key(task_id)
    }

    /// Whether a piece's bytes can be served: always for pieces written since start-up;
    /// for older ones, once their bytes matched their CRC (checked at the first request).
    /// A piece that fails loses its record and un-finishes its task.
    pub async fn check_piece(&self, task_id: &str, piece: &PieceMeta) -> Result<bool> {
        let known_good = {
            let map = self.inner.unverified.lock().expect("verify lock");
            match map.get(task_id) {
                None => true,
                Some(done) => done.contains(&piece.number),
            }
        };
        if known_good {
            return Ok(true);
        }
        let path = self.content_path(task_id)?;
        let id = task_id.to_string();
        let piece = piece.clone();
        self.blocking(move |inner| {
            use std::os::unix::fs::FileExt;
            let expected = piece
                .digest
                .strip_prefix("crc32:")
                .and_then(|v| v.parse::<u32>().ok());
            let mut buf = vec![0u8; piece.length as usize];
            let matches = match std::fs::File::open(&path) {
                Ok(file) => match file.read_exact_at(&mut buf, piece.offset) {
                    Ok(()) => expected == Some(crc32fast::hash(&buf)),
                    Err(_) => false,
                },
                Err(_) => false,
            };
            if matches {
                if let Some(done) = inner.unverified.lock().expect("verify lock").get_mut(&id) {
                    done.insert(piece.number);
                }
                return Ok(true);
            }
            tracing::warn!(
                task_id = id,
                number = piece.number,
                "a stored piece no longer matches its CRC (lost in a crash?); dropping it"
            );
            inner.metadata.delete_piece(&id, piece.number)?;
            if let Some(mut meta) = inner.metadata.task(&id)? {
                if meta.finished_at.take().is_some() {
                    inner.metadata.put_task(&meta)?;
                }
            }
            Ok(false)
        })
        .await
    }

    pub async fn list_tasks(&self) -> Result<Vec<TaskMeta>> {
        self.blocking(|inner| inner.metadata.list_tasks()).await
    }

    /// Every piece record of a task, committed or not, by number.
    pub async fn pieces(&self, task_id: &str) -> Result<Vec<PieceMeta>> {
        let id = task_id.to_string();
        self.blocking(move |inner| {
            let mut by_number: std::collections::BTreeMap<u32, PieceMeta> = inner
                .metadata
                .pieces(&id)?
                .into_iter()
                .map(|p| (p.number, p))
                .collect();
            for p in inner.committer.all(&id) {
                by_number.insert(p.number, p);
            }
            Ok(by_number.into_values().collect())
        })
        .await
    }

    pub async fn piece(&self, task_id: &str, number: u32) -> Result<Option<PieceMeta>> {
        if let Some(p) = self.inner.committer.get(task_id, number) {
            return Ok(Some(p));
        }
        let id = task_id.to_string();
        self.blocking(move |inner| inner.metadata.piece(&id, number))
            .await
    }

    /// Records a finished piece. Call only after its bytes are in the content file. The
    /// record is visible at once and committed once the content file is synced.
    pub async fn put_piece(&self, task_id: &str, piece: PieceMeta) -> Result<()> {
        let content = self.content_path(task_id)?;
        if let Some(done) = self
            .inner
            .unverified
            .lock()
            .expect("verify lock")
            .get_mut(task_id)
        {
            done.insert(piece.number); // written this boot
        }
        self.inner.committer.add(task_id, content, piece);
        Ok(())
    }

    /// Forgets piece records (used when a task's layout must be rebuilt).
    pub async fn clear_pieces(&self, task_id: &str) -> Result<()> {
        let id = task_id.to_string();
        self.blocking(move |inner| {
            inner.committer.forget(&id);
            inner.metadata.clear_pieces(&id)
        })
        .await
    }

    /// Creates (or reopens) the content file of a task for positional writes.
    pub async fn open_content_for_write(&self, task_id: &str) -> Result<ContentWriter> {
        let path = self.content_path(task_id)?;
        self.blocking(move |_| {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            Ok(ContentWriter {
                file: Arc::new(file),
                path,
            })
        })
        .await
    }

    /// Opens the content file for reading at `offset`.
    pub async fn open_content_at(&self, task_id: &str, offset: u64) -> Result<tokio::fs::File> {
        use tokio::io::AsyncSeekExt;
        let path = self.content_path(task_id)?;
        let mut file = tokio::fs::File::open(&path).await.map_err(io_err(&path))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io_err(&path))?;
        Ok(file)
    }

    /// Deletes a task's content and metadata. Refuses nothing: callers check leases.
    pub async fn delete_task(&self, task_id: &str) -> Result<()> {
        let path = self.content_path(task_id)?;
        let id = task_id.to_string();
        self.blocking(move |inner| {
            inner.committer.forget(&id);
            inner.unverified.lock().expect("verify lock").remove(&id);
            inner.metadata.delete_task(&id)?;
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
            inner.touched.lock().expect("touch lock").remove(&id);
            Ok(())
        })
        .await
    }

    /// Bytes the task's content file occupies on disk.
    pub fn content_disk_usage(&self, task_id: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.content_path(task_id)
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.blocks() * 512)
            .unwrap_or_default()
    }

    /// Usage of the filesystem holding the storage directory.
    pub fn disk_usage(&self) -> Result<DiskUsage> {
        let stat = rustix::fs::statvfs(&self.inner.dir).map_err(|e| StorageError::Io {
            path: self.inner.dir.clone(),
            source: e.into(),
        })?;
        Ok(DiskUsage {
            total: stat.f_blocks * stat.f_frsize,
            available: stat.f_bavail * stat.f_frsize,
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(err) = self.committer.shutdown(&self.metadata) {
            tracing::warn!(%err, "committing piece records at shutdown failed");
        }
    }
}

/// A task's content file opened for positional writes from many pieces at once.
#[derive(Clone)]
pub struct ContentWriter {
    file: Arc<std::fs::File>,
    path: PathBuf,
}

impl ContentWriter {
    /// Writes `data` at `offset` on the blocking pool.
    pub async fn write_at(&self, offset: u64, data: bytes::Bytes) -> Result<()> {
        let file = self.file.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&data, offset).map_err(io_err(&path))
        })
        .await
        .map_err(|e| StorageError::Join(e.to_string()))?
    }

    /// Sets the file length (sparse) once the content length is known.
    pub async fn set_len(&self, len: u64) -> Result<()> {
        let file = self.file.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || file.set_len(len).map_err(io_err(&path)))
            .await
            .map_err(|e| StorageError::Join(e.to_string()))?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> TaskMeta {
        TaskMeta::new(id.to_string(), "http://x/y".into())
    }

    #[tokio::test]
    async fn pieces_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = "a".repeat(64);
        {
            let s = Storage::open(dir.path(), true).unwrap();
            let mut meta = task(&id);
            meta.content_length = Some(10);
            meta.piece_length = Some(4);
            s.put_task(meta).await.unwrap();
            let w = s.open_content_for_write(&id).await.unwrap();
            w.write_at(4, bytes::Bytes::from_static(b"4567"))
                .await
                .unwrap();
            s.put_piece(&id, PieceMeta::new(1, 4, 4, "crc32:1".into()))
                .await
                .unwrap();
        }
        let s = Storage::open(dir.path(), true).unwrap();
        let meta = s.task(&id).await.unwrap().unwrap();
        assert_eq!(meta.content_length, Some(10));
        let pieces = s.pieces(&id).await.unwrap();
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].number, 1);
        assert!(s.piece(&id, 0).await.unwrap().is_none());
        let on_disk = std::fs::read(s.content_path(&id).unwrap()).unwrap();
        assert_eq!(&on_disk[4..8], b"4567");

        // keep = false wipes
        drop(s);
        let s = Storage::open(dir.path(), false).unwrap();
        assert!(s.task(&id).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn delete_removes_everything_and_leases_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), true).unwrap();
        let id = "b".repeat(64);
        s.put_task(task(&id)).await.unwrap();
        s.open_content_for_write(&id).await.unwrap();
        s.put_piece(&id, PieceMeta::new(0, 0, 1, "crc32:0".into()))
            .await
            .unwrap();
        let l1 = s.lease(&id);
        let l2 = s.lease(&id);
        assert!(s.is_leased(&id));
        drop(l1);
        assert!(s.is_leased(&id));
        drop(l2);
        assert!(!s.is_leased(&id));
        s.delete_task(&id).await.unwrap();
        assert!(s.task(&id).await.unwrap().is_none());
        assert!(s.pieces(&id).await.unwrap().is_empty());
        assert!(!s.content_path(&id).unwrap().exists());
        assert!(s.disk_usage().unwrap().total > 0);
    }

    #[test]
    fn rejects_path_like_ids() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), true).unwrap();
        for bad in ["../../etc/passwd", "ab", "a/b/c/d", ""] {
            assert!(s.content_path(bad).is_err(), "{bad}");
        }
    }

    /// A task of two 4-byte pieces written and recorded, under `fault`.
    async fn write_task(s: &Storage, id: &str, fault: commit::Fault) {
        *s.inner.committer.fault.lock().unwrap() = fault;
        let mut meta = task(id);
        meta.content_length = Some(8);
        meta.piece_length = Some(4);
        s.put_task(meta.clone()).await.unwrap();
        let w = s.open_content_for_write(id).await.unwrap();
        for (n, bytes) in [(0u32, b"abcd"), (1, b"efgh")] {
            w.write_at(n as u64 * 4, bytes::Bytes::from_static(bytes))
                .await
                .unwrap();
            let crc = crc32fast::hash(bytes);
            s.put_piece(
                id,
                PieceMeta::new(n, n as u64 * 4, 4, format!("crc32:{crc}")),
            )
            .await
            .unwrap();
        }
        // Visible at once, before any commit.
        assert_eq!(s.pieces(id).await.unwrap().len(), 2);
        meta.finished_at = Some(now_secs());
        let _ = s.put_task(meta).await;
    }

    #[tokio::test]
    async fn a_crash_before_the_sync_commits_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let id = "e".repeat(64);
        {
            let s = Storage::open(dir.path(), true).unwrap();
            write_task(&s, &id, commit::Fault::CrashBeforeSync).await;
            // The process dies: nothing more is committed (the shutdown flush is the
            // crash's victim too).
            *s.inner.committer.fault.lock().unwrap() = commit::Fault::CrashBeforeSync;
        }
        let s = Storage::open(dir.path(), true).unwrap();
        assert!(
            s.pieces(&id).await.unwrap().is_empty(),
            "a record outlived its bytes' sync"
        );
        let meta = s.task(&id).await.unwrap().unwrap();
        assert!(!meta.is_finished(), "a task finished without its records");
    }

    #[tokio::test]
    async fn bytes_lost_behind_committed_records_are_caught_on_first_use() {
        let dir = tempfile::tempdir().unwrap();
        let id = "f".repeat(64);
        {
            let s = Storage::open(dir.path(), true).unwrap();
            write_task(&s, &id, commit::Fault::LoseBytesAfterCommit).await;
            *s.inner.committer.fault.lock().unwrap() = commit::Fault::None;
        }
        let s = Storage::open(dir.path(), true).unwrap();
        assert!(s.task(&id).await.unwrap().unwrap().is_finished());
        // A child asks for piece 0: its bytes are zeros, so it is not served.
        let piece = s.piece(&id, 0).await.unwrap().unwrap();
        assert!(!s.check_piece(&id, &piece).await.unwrap());
        assert!(s.piece(&id, 0).await.unwrap().is_none());
        assert!(!s.task(&id).await.unwrap().unwrap().is_finished());
        // The rest is checked on the task's first use.
        assert_eq!(s.verify_task(&id).await.unwrap(), vec![1]);
        assert!(s.pieces(&id).await.unwrap().is_empty());

        // A good task found at start-up passes, once.
        let good = "9".repeat(64);
        write_task(&s, &good, commit::Fault::None).await;
        drop(s);
        let s = Storage::open(dir.path(), true).unwrap();
        assert!(s.verify_task(&good).await.unwrap().is_empty());
        assert_eq!(s.pieces(&good).await.unwrap().len(), 2);
        assert!(s.task(&good).await.unwrap().unwrap().is_finished());
    }
}
