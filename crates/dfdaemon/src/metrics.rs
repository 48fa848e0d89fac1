//! Prometheus metrics with upstream's names (`dragonfly_dfdaemon_*`).

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

const NAMESPACE: &str = "dragonfly";
const SUBSYSTEM: &str = "dfdaemon";

/// All daemon metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
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
