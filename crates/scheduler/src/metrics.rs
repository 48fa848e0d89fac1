//! Prometheus metrics with upstream's names (`dragonfly_scheduler_*`).

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
        .namespace("dragonfly")
        .subsystem("scheduler")
}

/// All scheduler metrics, in their own registry.
pub struct Metrics {
    registry: Registry,
    pub register_peer_total: IntCounterVec,
    pub register_peer_failure_total: IntCounterVec,
    pub download_peer_started_total: IntCounterVec,
    pub download_peer_back_to_source_started_total: IntCounterVec,
    pub download_peer_finished_total: IntCounterVec,
    pub download_peer_finished_failure_total: IntCounterVec,
    pub download_peer_back_to_source_finished_total: IntCounterVec,
    pub download_peer_back_to_source_finished_failure_total: IntCounterVec,
    pub download_piece_finished_total: IntCounterVec,
    pub download_piece_finished_failure_total: IntCounterVec,
    pub download_piece_back_to_source_finished_total: IntCounterVec,
    pub download_piece_back_to_source_finished_failure_total: IntCounterVec,
    pub traffic: IntCounterVec,
    pub announce_host_total: IntCounter,
    pub announce_host_failure_total: IntCounter,
    pub stat_peer_total: IntCounter,
    pub delete_peer_total: IntCounter,
    pub stat_task_total: IntCounter,
    pub delete_task_total: IntCounter,
    pub list_hosts_total: IntCounter,
    pub delete_host_total: IntCounter,
    pub reschedule_total: IntCounterVec,
    pub trigger_seed_peer_total: IntCounterVec,
    pub schedule_duration_milliseconds: HistogramVec,
    pub hosts: IntGauge,
    pub tasks: IntGauge,
    pub peers: IntGaugeVec,
    pub version: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
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
        let by_priority = ["priority", "task_type", "host_type"];
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| IntCounterVec::new(opts(name, help), labels);
        let m = Metrics {
            register_peer_total: reg!(counter_vec(
                "register_peer_total",
                "Counter of the number of the register peer.",
                &by_priority
            )),
            register_peer_failure_total: reg!(counter_vec(
                "register_peer_failure_total",
                "Counter of the number of failed of the register peer.",
                &by_priority
            )),
            download_peer_started_total: reg!(counter_vec(
                "download_peer_started_total",
                "Counter of the number of the download peer started.",
                &by_priority
            )),
            download_peer_back_to_source_started_total: reg!(counter_vec(
                "download_peer_back_to_source_started_total",
                "Counter of the number of the download peer back-to-source started.",
                &by_priority
            )),
            download_peer_finished_total: reg!(counter_vec(
                "download_peer_finished_total",
                "Counter of the number of the download peer.",
                &by_priority
            )),
            download_peer_finished_failure_total: reg!(counter_vec(
                "download_peer_finished_failure_total",
                "Counter of the number of failed of the download peer.",
                &by_priority
            )),
            download_peer_back_to_source_finished_total: reg!(counter_vec(
                "download_peer_back_to_source_finished_total",
                "Counter of the number of the download peer back-to-source.",
                &by_priority
            )),
            download_peer_back_to_source_finished_failure_total: reg!(counter_vec(
                "download_peer_back_to_source_finished_failure_total",
                "Counter of the number of failed of the download peer back-to-source.",
                &by_priority
            )),
            download_piece_finished_total: reg!(counter_vec(
                "download_piece_finished_total",
                "Counter of the number of the download piece.",
                &["traffic_type", "task_type", "host_type"]
            )),
            download_piece_finished_failure_total: reg!(counter_vec(
                "download_piece_finished_failure_total",
                "Counter of the number of failed of the download piece.",
                &["task_type", "host_type"]
            )),
            download_piece_back_to_source_finished_total: reg!(counter_vec(
                "download_piece_back_to_source_finished_total",
                "Counter of the number of the download piece back-to-source.",
                &["task_type", "host_type"]
            )),
            download_piece_back_to_source_finished_failure_total: reg!(counter_vec(
                "download_piece_back_to_source_finished_failure_total",
                "Counter of the number of failed of the download piece back-to-source.",
                &["task_type", "host_type"]
            )),
            traffic: reg!(counter_vec(
                "traffic",
                "Counter of the number of traffic.",
                &["type", "task_type", "host_type"]
            )),
            announce_host_total: reg!(IntCounter::with_opts(opts(
                "announce_host_total",
                "Counter of the number of the announce host."
            ))),
            announce_host_failure_total: reg!(IntCounter::with_opts(opts(
                "announce_host_failure_total",
                "Counter of the number of failed of the announce host."
            ))),
            stat_peer_total: reg!(IntCounter::with_opts(opts(
                "stat_peer_total",
                "Counter of the number of the stat peer."
            ))),
            delete_peer_total: reg!(IntCounter::with_opts(opts(
                "leave_peer_total",
                "Counter of the number of the leaving peer."
            ))),
            stat_task_total: reg!(IntCounter::with_opts(opts(
                "stat_task_total",
                "Counter of the number of the stat task."
            ))),
            delete_task_total: reg!(IntCounter::with_opts(opts(
                "delete_task_total",
                "Counter of the number of the delete task."
            ))),
            list_hosts_total: reg!(IntCounter::with_opts(opts(
                "list_hosts_total",
                "Counter of the number of the list hosts."
            ))),
            delete_host_total: reg!(IntCounter::with_opts(opts(
                "leave_host_total",
                "Counter of the number of the leaving host."
            ))),
            reschedule_total: reg!(counter_vec(
                "reschedule_peer_total",
                "Counter of reschedule requests by reason (refresh or failure).",
                &["reason"]
            )),
            trigger_seed_peer_total: reg!(counter_vec(
                "trigger_seed_peer_total",
                "Counter of seed-peer triggers by outcome.",
                &["outcome"]
            )),
            schedule_duration_milliseconds: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "schedule_duration_milliseconds",
                    "Histogram of the time to choose parents."
                )
                .namespace("dragonfly")
                .subsystem("scheduler")
                .buckets(exponential_buckets(0.01, 2.0, 20).expect("buckets")),
                &["reason"]
            )),
            hosts: reg!(IntGauge::with_opts(opts("host_total", "Hosts in memory."))),
            tasks: reg!(IntGauge::with_opts(opts("task_total", "Tasks in memory."))),
            peers: reg!(IntGaugeVec::new(
                opts("peer_total", "Peers in memory by state."),
                &["state"]
            )),
            version: reg!(IntGaugeVec::new(
                opts("version", "Version info of the service."),
                &[
                    "major",
                    "minor",
                    "git_version",
                    "git_commit",
                    "platform",
                    "build_time"
                ]
            )),
            registry,
        };
        m.version
            .with_label_values(&[
                env!("CARGO_PKG_VERSION_MAJOR"),
                env!("CARGO_PKG_VERSION_MINOR"),
                env!("CARGO_PKG_VERSION"),
                "",
                std::env::consts::OS,
                "",
            ])
            .set(1);
        m
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
