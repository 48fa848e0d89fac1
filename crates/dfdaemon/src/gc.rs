//! Garbage collection of tasks: by TTL since last access, and by disk watermarks (least
//! recently used first). Leased tasks (being downloaded or uploaded) are never removed.

use crate::metrics::Metrics;
use crate::scheduler::Schedulers;
use d7y_config::dfdaemon::GcPolicy;
use d7y_storage::{now_secs, Storage, TaskMeta};
use std::sync::Arc;
use tracing::{info, warn};

/// One GC pass; returns the IDs it removed.
pub async fn collect(storage: &Storage, policy: &GcPolicy, metrics: &Metrics) -> Vec<String> {
    let mut removed = Vec::new();
    let tasks = match storage.list_tasks().await {
        Ok(tasks) => tasks,
        Err(err) => {
            warn!(%err, "gc cannot list tasks");
            return removed;
        }
    };
    let now = now_secs();
    let ttl = policy.task_ttl.as_secs();
    let mut survivors: Vec<(u64, TaskMeta)> = Vec::new();
    for meta in tasks {
        let last = storage.last_access(&meta);
        if now.saturating_sub(last) > ttl && !storage.is_leased(&meta.id) {
            if remove(storage, &meta.id, "ttl", metrics).await {
                removed.push(meta.id);
            }
        } else {
            survivors.push((last, meta));
        }
    }

    // Disk watermarks. With diskThreshold set, the percentages apply to that capacity and
    // only our own content counts; otherwise to the whole filesystem.
    let usage = |survivors: &[(u64, TaskMeta)]| -> Option<(u64, u64)> {
        if policy.disk_threshold.as_u64() > 0 {
            let own: u64 = survivors
                .iter()
                .map(|(_, m)| storage.content_disk_usage(&m.id))
                .sum();
            Some((own, policy.disk_threshold.as_u64()))
        } else {
            let disk = storage.disk_usage().ok()?;
            Some((disk.used(), disk.total))
        }
    };
    let Some((used, capacity)) = usage(&survivors) else {
        return removed;
    };
    metrics.disk_space_total.set(capacity as i64);
    metrics.disk_usage_space_total.set(used as i64);
    let high = capacity / 100 * policy.disk_high_threshold_percent as u64;
    let low = capacity / 100 * policy.disk_low_threshold_percent as u64;
    if used <= high {
        return removed;
    }
    info!(
        used,
        high, low, "disk usage above the high watermark, removing least recently used tasks"
    );
    survivors.sort_by_key(|(last, _)| *last);
    let mut used = used;
    for (_, meta) in survivors {
        if used <= low {
            break;
        }
        if storage.is_leased(&meta.id) {
            continue;
        }
        let size = storage.content_disk_usage(&meta.id);
        if remove(storage, &meta.id, "disk", metrics).await {
            used = used.saturating_sub(size);
            removed.push(meta.id);
        }
    }
    removed
}

async fn remove(storage: &Storage, task_id: &str, reason: &str, metrics: &Metrics) -> bool {
    match storage.delete_task(task_id).await {
        Ok(()) => {
            info!(task_id, reason, "gc removed task");
            metrics.gc_task_total.with_label_values(&[reason]).inc();
            true
        }
        Err(err) => {
            warn!(task_id, %err, "gc failed to remove task");
            false
        }
    }
}

/// Runs a GC pass every `interval`, forever, telling the schedulers (when there are any)
/// which tasks this host no longer holds.
pub async fn run(
    storage: Storage,
    policy: GcPolicy,
    interval: std::time::Duration,
    metrics: Arc<Metrics>,
    schedulers: Option<Arc<Schedulers>>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let removed = collect(&storage, &policy, &metrics).await;
        if let Some(schedulers) = &schedulers {
            for task_id in removed {
                if let Err(err) = schedulers.forget_task(&task_id).await {
                    warn!(task_id, %err, "could not tell the scheduler a task was removed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytesize::ByteSize;
    use d7y_storage::TaskMeta;
    use std::time::Duration;

    async fn add(storage: &Storage, id: &str, size: usize, accessed: u64) {
        let mut meta = TaskMeta::new(id.to_string(), "http://x".into());
        meta.accessed_at = accessed;
        meta.finished_at = Some(accessed);
        storage.put_task(meta).await.unwrap();
        let w = storage.open_content_for_write(id).await.unwrap();
        w.write_at(0, bytes::Bytes::from(vec![7u8; size]))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn ttl_and_watermarks_respect_leases() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), true).unwrap();
        let metrics = Metrics::new();
        let now = now_secs();
        let (a, b, c, d) = (
            "a".repeat(64),
            "b".repeat(64),
            "c".repeat(64),
            "d".repeat(64),
        );
        add(&storage, &a, 4096, now - 7200).await; // expired
        add(&storage, &b, 4096, now - 7200).await; // expired but leased
        add(&storage, &c, 1 << 20, now - 100).await; // oldest survivor
        add(&storage, &d, 1 << 20, now - 10).await;
        let lease = storage.lease(&b);
        let policy = GcPolicy {
            task_ttl: Duration::from_secs(3600),
            disk_threshold: ByteSize::mib(2),
            disk_high_threshold_percent: 80,
            disk_low_threshold_percent: 60,
            ..GcPolicy::default()
        };
        let removed = collect(&storage, &policy, &metrics).await;
        // a by ttl; then own usage ~2 MiB > 1.6 MiB high: c goes (oldest), b is leased
        assert_eq!(removed, vec![a.clone(), c.clone()]);
        assert!(storage.task(&b).await.unwrap().is_some());
        assert!(storage.task(&d).await.unwrap().is_some());
        drop(lease);
        let removed = collect(&storage, &policy, &metrics).await;
        assert_eq!(removed, vec![b]);
    }
}
