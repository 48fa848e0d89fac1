//! Prometheus metrics with upstream's names (`dragonfly_dfdaemon_*`).

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const NAMESPACE: &str = "dragonfly";
const SUBSYSTEM: &str = "dfdaemon";

/// All daemon metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// Label values seen per remote-chosen label (tag, application), bounded.
    seen_labels: std::sync::Mutex<
        std::collections::HashMap<&'static str, std::collections::HashSet<String>>,
    >,
    pub download_task_total: IntCounterVec,
    pub download_task_failure_total: IntCounterVec,
    pub concurrent_download_task_total: IntGaugeVec,
    pub download_task_duration_milliseconds: HistogramVec,
    pub download_traffic: IntCounterVec,
    pub upload_traffic: IntCounterVec,
    pub upload_piece_total: IntCounterVec,
    pub upload_piece_failure_total: IntCounterVec,
    pub concurrent_upload_piece_total: IntGauge,
    pub download_piece_total: IntCounterVec,
    pub download_piece_failure_total: IntCounterVec,
    pub download_piece_duration_milliseconds: HistogramVec,
    pub backend_request_total: IntCounterVec,
    pub backend_request_failure_total: IntCounterVec,
    pub stat_task_total: IntCounterVec,
    pub delete_task_total: IntCounterVec,
    pub list_local_tasks_total: IntCounterVec,
    pub disk_space_total: IntGauge,
    pub disk_usage_space_total: IntGauge,
    pub gc_task_total: IntCounterVec,
    pub proxy_request_total: IntCounter,
    pub proxy_request_failure_total: IntCounter,
    pub proxy_request_via_dfdaemon_total: IntCounter,
    pub proxy_request_via_dfdaemon_and_cache_hits_total: IntCounter,
    pub proxy_request_rate_limited_total: IntCounter,
    /// Body bytes the proxy sent its clients, by path (`p2p`: from a task; `direct`: passed
    /// through from the origin).
    pub proxy_traffic: IntCounterVec,
    pub version: IntGaugeVec,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
        .namespace(NAMESPACE)
        .subsystem(SUBSYSTEM)
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("unique metric");
                m
            }};
        }
        let ms_buckets = || exponential_buckets(1.0, 2.0, 24).expect("valid buckets");
        let m = Metrics {
            seen_labels: Default::default(),
            download_task_total: reg!(IntCounterVec::new(
                opts(
                    "download_task_total",
                    "Counter of the number of the download task."
                ),
                &["type", "tag", "app", "priority"]
            )),
            download_task_failure_total: reg!(IntCounterVec::new(
                opts(
                    "download_task_failure_total",
                    "Counter of the number of failed of the download task."
                ),
                &["type", "tag", "app", "priority"]
            )),
            concurrent_download_task_total: reg!(IntGaugeVec::new(
                opts(
                    "concurrent_download_task_total",
                    "Gauge of the number of concurrent of the download task."
                ),
                &["type", "tag", "app", "priority"]
            )),
            download_task_duration_milliseconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "download_task_duration_milliseconds",
                    "Histogram of the download task duration."
                )
                .namespace(NAMESPACE)
                .subsystem(SUBSYSTEM)
                .buckets(ms_buckets()),
                &["task_type", "task_size_level"]
            )),
            download_traffic: reg!(IntCounterVec::new(
                opts(
                    "download_traffic",
                    "Counter of the number of the download traffic."
                ),
                &["type", "task_type"]
            )),
            upload_traffic: reg!(IntCounterVec::new(
                opts(
                    "upload_traffic",
                    "Counter of the number of the upload traffic."
                ),
                &["task_type"]
            )),
            upload_piece_total: reg!(IntCounterVec::new(
                opts(
                    "upload_piece_total",
                    "Counter of the number of the upload piece."
                ),
                &["task_type"]
            )),
            upload_piece_failure_total: reg!(IntCounterVec::new(
                opts(
                    "upload_piece_failure_total",
                    "Counter of the number of failed of the upload piece."
                ),
                &["task_type"]
            )),
            concurrent_upload_piece_total: reg!(IntGauge::with_opts(opts(
                "concurrent_upload_piece_total",
                "Gauge of the number of concurrent of the upload piece."
            ))),
            download_piece_failure_total: reg!(IntCounterVec::new(
                opts(
                    "download_piece_failure_total",
                    "Counter of the number of failed pieces, by where they were fetched from."
                ),
                &["type"]
            )),
            download_piece_total: reg!(IntCounterVec::new(
                opts(
                    "download_piece_total",
                    "Counter of the number of the download piece."
                ),
                &["type"]
            )),
            download_piece_duration_milliseconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "download_piece_duration_milliseconds",
                    "Histogram of the download piece duration."
                )
                .namespace(NAMESPACE)
                .subsystem(SUBSYSTEM)
                .buckets(ms_buckets()),
                &["type"]
            )),
            backend_request_total: reg!(IntCounterVec::new(
                opts(
                    "backend_request_total",
                    "Counter of the number of the backend request."
                ),
                &["scheme", "method"]
            )),
            backend_request_failure_total: reg!(IntCounterVec::new(
                opts(
                    "backend_request_failure_total",
                    "Counter of the number of failed of the backend request."
                ),
                &["scheme", "method"]
            )),
            stat_task_total: reg!(IntCounterVec::new(
                opts("stat_task_total", "Counter of the number of the stat task."),
                &["type"]
            )),
            delete_task_total: reg!(IntCounterVec::new(
                opts(
                    "delete_task_total",
                    "Counter of the number of the delete task."
                ),
                &["type"]
            )),
            list_local_tasks_total: reg!(IntCounterVec::new(
                opts(
                    "list_local_tasks_total",
                    "Counter of the number of the list tasks."
                ),
                &["type"]
            )),
            disk_space_total: reg!(IntGauge::with_opts(opts(
                "disk_space_total",
                "Gauge of the disk space."
            ))),
            disk_usage_space_total: reg!(IntGauge::with_opts(opts(
                "disk_usage_space_total",
                "Gauge of the disk usage space."
            ))),
            gc_task_total: reg!(IntCounterVec::new(
                opts(
                    "gc_task_total",
                    "Counter of the number of tasks removed by garbage collection."
                ),
                &["reason"]
            )),
            proxy_request_total: reg!(IntCounter::with_opts(opts(
                "proxy_request_total",
                "Counter of the number of the proxy request."
            ))),
            proxy_request_failure_total: reg!(IntCounter::with_opts(opts(
                "proxy_request_failure_total",
                "Counter of the number of failed of the proxy request."
            ))),
            proxy_request_via_dfdaemon_total: reg!(IntCounter::with_opts(opts(
                "proxy_request_via_dfdaemon_total",
                "Counter of the number of the proxy request via dfdaemon."
            ))),
            proxy_request_via_dfdaemon_and_cache_hits_total: reg!(IntCounter::with_opts(opts(
                "proxy_request_via_dfdaemon_and_cache_hits_total",
                "Counter of the number of the proxy request via dfdaemon answered from the local cache."
            ))),
            proxy_request_rate_limited_total: reg!(IntCounter::with_opts(opts(
                "proxy_request_rate_limited_total",
                "Counter of the number of the proxy request refused by the rate limit."
            ))),
            proxy_traffic: reg!(IntCounterVec::new(
                opts(
                    "proxy_traffic",
                    "Counter of the body bytes the proxy sent its clients."
                ),
                &["type"]
            )),
            version: reg!(IntGaugeVec::new(
                opts("version", "Version info of the service."),
                &["git_version", "git_commit", "platform", "build_time"]
            )),
            registry,
        };
        m.version
            .with_label_values(&[env!("CARGO_PKG_VERSION"), "", std::env::consts::ARCH, ""])
            .set(1);
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Distinct values a label that a remote request chooses (tag, application) may take; the
/// rest are counted as `other`, so a stranger cannot grow the metrics without bound.
pub const MAX_LABEL_VALUES: usize = 64;
/// The longest label value kept as is.
pub const MAX_LABEL_LEN: usize = 64;

impl Metrics {
    /// `value` as a label of kind `kind`: itself while the label has fewer than
    /// [`MAX_LABEL_VALUES`] distinct values and it is short and printable, else `other`.
    pub fn bounded_label(&self, kind: &'static str, value: &str) -> String {
        if value.is_empty() {
            return String::new(); // the common case: no tag, no application
        }
        if value.len() > MAX_LABEL_LEN || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return "other".into();
        }
        let mut seen = self.seen_labels.lock().unwrap_or_else(|e| e.into_inner());
        let values = seen.entry(kind).or_default();
        if values.contains(value) || values.len() < MAX_LABEL_VALUES {
            values.insert(value.to_string());
            value.to_string()
        } else {
            "other".into()
        }
    }
}

pub use d7y_types::priority_label;

/// Upstream's task size buckets for duration histograms.
pub fn task_size_level(content_length: u64) -> &'static str {
    const MIB: u64 = 1024 * 1024;
    match content_length {
        n if n <= 10 * MIB => "level1",
        n if n <= 100 * MIB => "level2",
        n if n <= 1024 * MIB => "level3",
        n if n <= 10 * 1024 * MIB => "level4",
        _ => "level5",
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn remote_labels_are_bounded() {
        let m = Metrics::new();
        assert_eq!(m.bounded_label("tag", ""), "");
        for i in 0..1000 {
            let label = m.bounded_label("tag", &format!("t{i}"));
            assert_eq!(label == "other", i >= MAX_LABEL_VALUES, "{i}: {label}");
        }
        assert_eq!(m.bounded_label("tag", "t3"), "t3");
        assert_eq!(m.bounded_label("application", &"x".repeat(65)), "other");
        assert_eq!(m.bounded_label("application", "with space"), "other");
        assert_eq!(priority_label(6), "6");
        assert_eq!(priority_label(-1), "invalid");
        assert_eq!(priority_label(1 << 20), "invalid");
    }
}
