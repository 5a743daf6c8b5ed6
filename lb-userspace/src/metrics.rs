//! Prometheus text exposition of the agent's counters: the per-CPU datapath counters summed
//! over CPUs (so they survive agent restarts: they live in the pinned maps), backend health,
//! probe latencies and table rebuilds.

use std::fmt::Write as _;

use lb_common::Counter;

/// Probe latency buckets, seconds.
pub const PROBE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Table rebuild duration buckets, seconds.
pub const REBUILD_BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A cumulative histogram.
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

pub struct BackendMetrics {
    pub backend: String,
    pub packets: u64,
    pub bytes: u64,
    pub up: bool,
    pub probe: Option<Histogram>,
}

pub struct VipMetrics {
    pub vip: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendMetrics>,
}

/// Everything one scrape shows.
pub struct Snapshot {
    pub attached: bool,
    pub forwarding: bool,
    pub vips: Vec<VipMetrics>,
    /// Global datapath counters by reason (`lb_common::stat::NAMES`).
    pub global: Vec<(&'static str, Counter)>,
    pub rebuilds: u64,
    pub rebuild_seconds: Histogram,
    /// VRRP, while it runs.
    pub vrrp: Option<VrrpMetrics>,
}

pub struct VrrpMetrics {
    pub vrid: u8,
    pub master: bool,
    pub priority: u8,
    pub transitions: u64,
    /// Refused advertisements by reason.
    pub invalid: Vec<(String, u64)>,
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        let _ = write!(self.0, "{name}");
        if !labels.is_empty() {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", l.join(","));
        }
        let _ = writeln!(self.0, " {v}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        for (b, c) in h.bounds.iter().zip(&h.counts) {
            let le = b.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, c);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &l, h.count);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, h.count);
    }
}

/// Global counters, grouped into families: (reason prefix, family, label, help).
const GROUPS: &[(&str, &str, &str, &str)] = &[
    (
        "drop_",
        "maglb_dropped_packets_total",
        "reason",
        "Packets dropped by the balancer, by reason.",
    ),
    (
        "pass_",
        "maglb_passed_packets_total",
        "reason",
        "Packets handed to the kernel untouched, by reason.",
    ),
    (
        "error_",
        "maglb_errors_total",
        "reason",
        "Datapath errors, by reason.",
    ),
    (
        "icmp_",
        "maglb_icmp_packets_total",
        "action",
        "ICMP handled by the balancer, by action.",
    ),
];

/// Renders a scrape.
pub fn render(s: &Snapshot) -> String {
    let mut o = Out(String::with_capacity(4096));
    o.family("maglb_build_info", "gauge", "maglb version (always 1).");
    o.sample(
        "maglb_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    o.family(
        "maglb_attached",
        "gauge",
        "1 when the XDP balancer is attached.",
    );
    o.sample("maglb_attached", &[], u8::from(s.attached));
    o.family(
        "maglb_forwarding",
        "gauge",
        "1 when the datapath forwards (next hop known).",
    );
    o.sample("maglb_forwarding", &[], u8::from(s.forwarding));

    o.family(
        "maglb_vip_packets_total",
        "counter",
        "Packets to a VIP sent to a backend.",
    );
    for v in &s.vips {
        o.sample("maglb_vip_packets_total", &[("vip", &v.vip)], v.packets);
    }
    o.family(
        "maglb_vip_bytes_total",
        "counter",
        "Bytes (IP packets, before encapsulation) to a VIP sent to a backend.",
    );
    for v in &s.vips {
        o.sample("maglb_vip_bytes_total", &[("vip", &v.vip)], v.bytes);
    }
    o.family(
        "maglb_vip_new_flows_total",
        "counter",
        "Flows that got a backend from the Maglev table.",
    );
    for v in &s.vips {
        o.sample("maglb_vip_new_flows_total", &[("vip", &v.vip)], v.new_flows);
    }
    o.family(
        "maglb_backend_packets_total",
        "counter",
        "Packets sent to a backend of a VIP.",
    );
    for v in &s.vips {
        for b in &v.backends {
            o.sample(
                "maglb_backend_packets_total",
                &[("vip", &v.vip), ("backend", &b.backend)],
                b.packets,
            );
        }
    }
    o.family(
        "maglb_backend_bytes_total",
        "counter",
        "Bytes sent to a backend of a VIP.",
    );
    for v in &s.vips {
        for b in &v.backends {
            o.sample(
                "maglb_backend_bytes_total",
                &[("vip", &v.vip), ("backend", &b.backend)],
                b.bytes,
            );
        }
    }
    o.family(
        "maglb_backend_up",
        "gauge",
        "1 when the backend passes its health check (or has none).",
    );
    for v in &s.vips {
        for b in &v.backends {
            o.sample(
                "maglb_backend_up",
                &[("vip", &v.vip), ("backend", &b.backend)],
                u8::from(b.up),
            );
        }
    }
    o.family(
        "maglb_backend_probe_duration_seconds",
        "histogram",
        "Health probe latency.",
    );
    for v in &s.vips {
        for b in &v.backends {
            if let Some(h) = &b.probe {
                o.histogram(
                    "maglb_backend_probe_duration_seconds",
                    &[("vip", &v.vip), ("backend", &b.backend)],
                    h,
                );
            }
        }
    }

    let get = |n: &str| {
        s.global
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    };
    o.family(
        "maglb_conntrack_hits_total",
        "counter",
        "Packets whose flow was in the connection table.",
    );
    o.sample(
        "maglb_conntrack_hits_total",
        &[],
        get("conntrack_hit").packets,
    );
    o.family(
        "maglb_conntrack_misses_total",
        "counter",
        "Packets whose flow was not in the connection table.",
    );
    o.sample(
        "maglb_conntrack_misses_total",
        &[],
        get("conntrack_miss").packets,
    );
    o.family(
        "maglb_encapsulated_packets_total",
        "counter",
        "Packets encapsulated and sent to backends.",
    );
    o.sample(
        "maglb_encapsulated_packets_total",
        &[],
        get("tx_encap").packets,
    );
    o.family(
        "maglb_encapsulated_bytes_total",
        "counter",
        "Bytes sent to backends, outer headers included.",
    );
    o.sample("maglb_encapsulated_bytes_total", &[], get("tx_encap").bytes);
    for (prefix, family, label, help) in GROUPS {
        o.family(family, "counter", help);
        for (name, c) in &s.global {
            if let Some(reason) = name.strip_prefix(prefix) {
                o.sample(family, &[(label, reason)], c.packets);
            }
        }
    }

    o.family(
        "maglb_vrrp_master",
        "gauge",
        "1 while this balancer is the VRRP master.",
    );
    o.family(
        "maglb_vrrp_priority",
        "gauge",
        "Advertised VRRP priority (after tracking).",
    );
    o.family(
        "maglb_vrrp_transitions_total",
        "counter",
        "VRRP state changes.",
    );
    o.family(
        "maglb_vrrp_invalid_adverts_total",
        "counter",
        "VRRP advertisements refused, by reason.",
    );
    if let Some(v) = &s.vrrp {
        let vrid = v.vrid.to_string();
        let l = [("vrid", vrid.as_str())];
        o.sample("maglb_vrrp_master", &l, u8::from(v.master));
        o.sample("maglb_vrrp_priority", &l, v.priority);
        o.sample("maglb_vrrp_transitions_total", &l, v.transitions);
        for (reason, n) in &v.invalid {
            o.sample(
                "maglb_vrrp_invalid_adverts_total",
                &[("vrid", &vrid), ("reason", reason)],
                n,
            );
        }
    }

    o.family(
        "maglb_table_rebuilds_total",
        "counter",
        "Maglev tables rebuilt and switched.",
    );
    o.sample("maglb_table_rebuilds_total", &[], s.rebuilds);
    o.family(
        "maglb_table_rebuild_duration_seconds",
        "histogram",
        "Time from a change to the datapath carrying it.",
    );
    o.histogram(
        "maglb_table_rebuild_duration_seconds",
        &[],
        &s.rebuild_seconds,
    );
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let mut h = Histogram::new(&[0.01, 0.1]);
        h.observe(0.005);
        h.observe(0.05);
        h.observe(5.0);
        let s = Snapshot {
            attached: true,
            forwarding: true,
            vips: vec![VipMetrics {
                vip: "[fd20::1]:80/tcp".into(),
                packets: 7,
                bytes: 700,
                new_flows: 2,
                backends: vec![BackendMetrics {
                    backend: "fd10::1".into(),
                    packets: 7,
                    bytes: 700,
                    up: false,
                    probe: Some(h.clone()),
                }],
            }],
            global: vec![
                (
                    "drop_no_backend",
                    Counter {
                        packets: 3,
                        bytes: 0,
                    },
                ),
                (
                    "conntrack_hit",
                    Counter {
                        packets: 5,
                        bytes: 0,
                    },
                ),
            ],
            rebuilds: 4,
            rebuild_seconds: h,
            vrrp: Some(VrrpMetrics {
                vrid: 51,
                master: true,
                priority: 150,
                transitions: 2,
                invalid: vec![("ttl".into(), 1)],
            }),
        };
        let text = render(&s);
        for line in [
            "maglb_vip_packets_total{vip=\"[fd20::1]:80/tcp\"} 7",
            "maglb_backend_up{vip=\"[fd20::1]:80/tcp\",backend=\"fd10::1\"} 0",
            "maglb_dropped_packets_total{reason=\"no_backend\"} 3",
            "maglb_conntrack_hits_total 5",
            "maglb_table_rebuild_duration_seconds_bucket{le=\"0.01\"} 1",
            "maglb_table_rebuild_duration_seconds_bucket{le=\"0.1\"} 2",
            "maglb_table_rebuild_duration_seconds_bucket{le=\"+Inf\"} 3",
            "maglb_table_rebuild_duration_seconds_count 3",
            "# TYPE maglb_vip_new_flows_total counter",
            "maglb_vrrp_master{vrid=\"51\"} 1",
            "maglb_vrrp_invalid_adverts_total{vrid=\"51\",reason=\"ttl\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
