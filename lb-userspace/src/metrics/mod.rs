//! Prometheus metrics through `prometheus-client`: instruments that the writer and the probe
//! supervisor update as they work ([`WriterMetrics`], [`ProbeMetrics`]), a collector that
//! reads the datapath's counters and the latest snapshot at scrape time ([`collector`]), and
//! the process's own figures ([`process`]). A scrape is Prometheus text 0.0.4, or OpenMetrics
//! text when the client asks for it.

mod collector;
mod process;

use std::time::Duration;

use prometheus_client::{
    encoding::{prometheus_text, text as openmetrics_text},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::{health::supervisor::BackendKey, views::Views};

/// Probe latency buckets, seconds.
pub const PROBE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Table rebuild duration buckets, seconds.
pub const REBUILD_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// What the writer counts.
#[derive(Clone, Debug)]
pub struct WriterMetrics {
    rebuilds: Counter,
    seconds: Histogram,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        Self {
            rebuilds: Counter::default(),
            seconds: Histogram::new(REBUILD_BUCKETS.iter().copied()),
        }
    }
}

impl WriterMetrics {
    /// `tables` tables were rebuilt and switched in `seconds`.
    pub fn rebuilt(&self, tables: u64, seconds: f64) {
        self.rebuilds.inc_by(tables);
        self.seconds.observe(seconds);
    }
}

type BackendLabels = Vec<(String, String)>;

fn backend_labels(key: &BackendKey) -> BackendLabels {
    vec![
        ("vip".into(), key.0.to_string()),
        ("backend".into(), key.1.to_string()),
    ]
}

/// Probe latencies, and steps of adaptive weights, per backend.
#[derive(Clone, Debug)]
pub struct ProbeMetrics {
    latency: Family<BackendLabels, Histogram, fn() -> Histogram>,
    weight_steps: Family<BackendLabels, Counter>,
}

impl Default for ProbeMetrics {
    fn default() -> Self {
        Self {
            latency: Family::new_with_constructor(|| Histogram::new(PROBE_BUCKETS.iter().copied())),
            weight_steps: Family::default(),
        }
    }
}

impl ProbeMetrics {
    pub fn observe(&self, key: &BackendKey, took: Duration) {
        self.latency
            .get_or_create(&backend_labels(key))
            .observe(took.as_secs_f64());
    }

    /// Adaptive weights changed the backend's effective weight.
    pub fn weight_step(&self, key: &BackendKey) {
        self.weight_steps.get_or_create(&backend_labels(key)).inc();
    }

    /// Forgets a backend that is no longer probed.
    pub fn forget(&self, key: &BackendKey) {
        self.latency.remove(&backend_labels(key));
    }
}

/// The registry of everything a scrape shows.
pub fn registry(views: Views, writer: &WriterMetrics, probes: &ProbeMetrics) -> Registry {
    let mut r = Registry::default();
    r.register(
        "maglb_table_rebuilds",
        "Maglev tables rebuilt and switched",
        writer.rebuilds.clone(),
    );
    r.register(
        "maglb_table_rebuild_duration_seconds",
        "Time from a change to the datapath carrying it",
        writer.seconds.clone(),
    );
    r.register(
        "maglb_backend_probe_duration_seconds",
        "Health probe latency",
        probes.latency.clone(),
    );
    r.register(
        "maglb_backend_weight_changes",
        "Changes of a backend's effective weight by adaptive weights",
        probes.weight_steps.clone(),
    );
    r.register_collector(Box::new(collector::Scrape(views)));
    r.register_collector(Box::new(process::Process));
    r
}

/// The OpenMetrics content type, which a client asks for in `Accept`.
pub const OPENMETRICS: &str = "application/openmetrics-text";

/// A scrape: (content type, body), in OpenMetrics text when `openmetrics`.
pub fn render(r: &Registry, openmetrics: bool) -> (&'static str, String) {
    let mut out = String::with_capacity(16 * 1024);
    if openmetrics {
        openmetrics_text::encode(&mut out, r).expect("writing to a String");
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            out,
        )
    } else {
        prometheus_text::encode(&mut out, r).expect("writing to a String");
        (prometheus_text::CONTENT_TYPE, out)
    }
}
