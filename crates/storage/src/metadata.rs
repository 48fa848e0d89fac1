//! Task and piece records in redb. Values are JSON so that the format is inspectable and
//! can gain fields without a migration (unknown fields default).

use crate::{now_secs, Result, StorageError};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::Path;

const TASKS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("tasks");
const PIECES: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("pieces");

/// A task as stored on this peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskMeta {
    pub id: String,
    pub url: String,
    pub piece_length: Option<u64>,
    pub content_length: Option<u64>,
    pub response_header: Vec<(String, String)>,
    pub created_at: u64,
    pub accessed_at: u64,
    pub finished_at: Option<u64>,
}

impl Default for TaskMeta {
    fn default() -> Self {
        TaskMeta::new(String::new(), String::new())
    }
}

impl TaskMeta {
    pub fn new(id: String, url: String) -> Self {
        let now = now_secs();
        TaskMeta {
            id,
            url,
            piece_length: None,
            content_length: None,
            response_header: Vec::new(),
            created_at: now,
            accessed_at: now,
            finished_at: None,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished_at.is_some()
    }
}

/// A finished piece: its bytes are in the content file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PieceMeta {
    pub number: u32,
    pub offset: u64,
    pub length: u64,
    /// `crc32:<decimal>`.
    pub digest: String,
    /// The parent peer it came from; `None` for back-to-source.
    pub parent_id: Option<String>,
    /// `common.v2.TrafficType` value.
    pub traffic_type: i32,
    pub cost_millis: u64,
    pub created_at: u64,
}

impl Default for PieceMeta {
    fn default() -> Self {
        PieceMeta::new(0, 0, 0, String::new())
    }
}

impl PieceMeta {
    pub fn new(number: u32, offset: u64, length: u64, digest: String) -> Self {
        PieceMeta {
            number,
            offset,
            length,
            digest,
            parent_id: None,
            traffic_type: 0,
            cost_millis: 0,
            created_at: now_secs(),
        }
    }
}

fn db_err(e: impl std::fmt::Display) -> StorageError {
    StorageError::Metadata(e.to_string())
}

pub(crate) struct MetadataStore {
    db: Database,
}

impl MetadataStore {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let db = Database::create(path)
            .map_err(|e| StorageError::Metadata(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(TASKS).map_err(db_err)?;
        txn.open_table(PIECES).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(MetadataStore { db })
    }

    pub(crate) fn task(&self, id: &str) -> Result<Option<TaskMeta>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TASKS).map_err(db_err)?;
        match table.get(id).map_err(db_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(db_err)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn put_task(&self, meta: &TaskMeta) -> Result<()> {
        let value = serde_json::to_vec(meta).map_err(db_err)?;
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(TASKS).map_err(db_err)?;
            table
                .insert(meta.id.as_str(), value.as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub(crate) fn list_tasks(&self) -> Result<Vec<TaskMeta>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TASKS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(db_err)?);
        }
        Ok(out)
    }

    pub(crate) fn pieces(&self, id: &str) -> Result<Vec<PieceMeta>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PIECES).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.range((id, 0u32)..=(id, u32::MAX)).map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            out.push(serde_json::from_slice(v.value()).map_err(db_err)?);
        }
        Ok(out)
    }

    pub(crate) fn piece(&self, id: &str, number: u32) -> Result<Option<PieceMeta>> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(PIECES).map_err(db_err)?;
        match table.get((id, number)).map_err(db_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(db_err)?)),
            None => Ok(None),
        }
    }

    /// Records many pieces in one transaction.
    pub(crate) fn put_pieces(&self, pieces: &[(&str, &PieceMeta)]) -> Result<()> {
        if pieces.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PIECES).map_err(db_err)?;
            for (id, piece) in pieces {
                let value = serde_json::to_vec(piece).map_err(db_err)?;
                table
                    .insert((*id, piece.number), value.as_slice())
                    .map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    pub(crate) fn delete_piece(&self, id: &str, number: u32) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PIECES).map_err(db_err)?;
            table.remove((id, number)).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub(crate) fn clear_pieces(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PIECES).map_err(db_err)?;
            table
                .retain_in((id, 0u32)..=(id, u32::MAX), |_, _| false)
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub(crate) fn delete_task(&self, id: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(PIECES).map_err(db_err)?;
            table
                .retain_in((id, 0u32)..=(id, u32::MAX), |_, _| false)
                .map_err(db_err)?;
            let mut tasks = txn.open_table(TASKS).map_err(db_err)?;
            tasks.remove(id).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }
}
