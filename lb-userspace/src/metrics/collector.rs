//! What a scrape reads at scrape time: the datapath's counters (per-CPU, summed; they live in
//! the pinned maps, so they survive agent restarts), the latest snapshot (attachment, health)
//! and the VRRP speaker's status.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{datapath::Reading, views::Views, writer::Snapshot};

pub struct Scrape(pub Views);

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrape")
    }
}

type Labels = Vec<(&'static str, String)>;

/// Global counters by name prefix, as one family with a label.
const GROUPS: &[(&str, &str, &str, &str)] = &[
    (
        "drop_",
        "maglb_dropped_packets",
        "reason",
        "Packets dropped by the balancer, by reason",
    ),
    (
        "pass_",
        "maglb_passed_packets",
        "reason",
        "Packets handed to the kernel untouched, by reason",
    ),
    (
        "error_",
        "maglb_errors",
        "reason",
        "Datapath errors, by reason",
    ),
    (
        "icmp_",
        "maglb_icmp_packets",
        "action",
        "ICMP handled by the balancer, by action",
    ),
];

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, i64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn float_gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, f64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn no_labels() -> Labels {
    Vec::new()
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let views = &self.0;
        let s = views.snapshot();
        let c = &views.counters;
        let version = vec![("version", env!("CARGO_PKG_VERSION").to_owned())];
        gauges(
            &mut enc,
            "maglb_build_info",
            "maglb version (always 1)",
            [(version, 1)],
        )?;
        gauges(
            &mut enc,
            "maglb_attached",
            "1 when the XDP balancer is attached",
            [(no_labels(), i64::from(s.attached))],
        )?;
        gauges(
            &mut enc,
            "maglb_forwarding",
            "1 when the datapath forwards (next hop known)",
            [(no_labels(), i64::from(s.forwarding()))],
        )?;
        let reading = c.read(&s.owners);
        self.vip_families(&mut enc, &s, &reading)?;
        self.backend_families(&mut enc, &s, &reading)?;
        self.weights(&mut enc, &s)?;
        self.global_families(&mut enc, &s, &reading)?;
        self.datapath(&mut enc, &s)?;
        self.probe_tunnel(&mut enc)?;
        self.vrrp(&mut enc)?;
        self.bgp(&mut enc)
    }
}

impl Scrape {
    /// Per VIP: packets, bytes, new flows, drops by reason.
    fn vip_families(
        &self,
        enc: &mut DescriptorEncoder,
        s: &Snapshot,
        reading: &Reading,
    ) -> fmt::Result {
        let vips: Vec<(String, u32)> = s
            .placement
            .iter()
            .map(|(id, p)| (id.to_string(), p.index))
            .collect();
        let vip = |v: &str| vec![("vip", v.to_owned())];
        counters(
            enc,
            "maglb_vip_packets",
            "Packets to a VIP sent to a backend",
            vips.iter().map(|(v, i)| (vip(v), reading.vip(*i).packets)),
        )?;
        counters(
            enc,
            "maglb_vip_bytes",
            "Bytes (IP packets, before encapsulation) to a VIP sent to a backend",
            vips.iter().map(|(v, i)| (vip(v), reading.vip(*i).bytes)),
        )?;
        counters(
            enc,
            "maglb_vip_new_flows",
            "Flows that got a backend from the Maglev table",
            vips.iter()
                .map(|(v, i)| (vip(v), reading.vip(*i).new_flows)),
        )?;
        counters(
            enc,
            "maglb_vip_dropped_packets",
            "Packets to a VIP that were not forwarded, by reason (no_backend, src_rate, vip_cap, denied, not_allowed, ...)",
            vips.iter().flat_map(|(v, i)| {
                self.0
                    .counters
                    .vip_drops(*i)
                    .into_iter()
                    .map(move |(name, n)| {
                        let reason = name.split_once('_').map_or(name, |(_, r)| r);
                        (
                            vec![("vip", v.clone()), ("reason", reason.to_owned())],
                            n.packets,
                        )
                    })
            }),
        )?;
        Ok(())
    }

    /// Per VIP and backend: packets, bytes, health.
    fn backend_families(
        &self,
        enc: &mut DescriptorEncoder,
        s: &Snapshot,
        reading: &Reading,
    ) -> fmt::Result {
        let backends: Vec<(Labels, u32, bool)> = s
            .placement
            .iter()
            .flat_map(|(id, p)| {
                let s = &s;
                p.slots.iter().map(move |(a, slot)| {
                    let labels = vec![("vip", id.to_string()), ("backend", a.to_string())];
                    (labels, *slot, s.is_up(id, a))
                })
            })
            .collect();
        counters(
            enc,
            "maglb_backend_packets",
            "Packets sent to a backend of a VIP",
            backends
                .iter()
                .map(|(l, slot, _)| (l.clone(), reading.slot(*slot).packets)),
        )?;
        counters(
            enc,
            "maglb_backend_bytes",
            "Bytes sent to a backend of a VIP",
            backends
                .iter()
                .map(|(l, slot, _)| (l.clone(), reading.slot(*slot).bytes)),
        )?;
        gauges(
            enc,
            "maglb_backend_up",
            "1 when the backend passes its health check (or has none)",
            backends
                .iter()
                .map(|(l, _, up)| (l.clone(), i64::from(*up))),
        )?;
        Ok(())
    }

    /// The balancer's own counters: connection table, encapsulation, drops and passes by
    /// reason.
    fn global_families(
        &self,
        enc: &mut DescriptorEncoder,
        s: &Snapshot,
        reading: &Reading,
    ) -> fmt::Result {
        let c = &self.0.counters;
        let globals = c.globals(reading, &s.owners);
        let get = |n: &str| {
            globals
                .iter()
                .find(|(k, _)| *k == n)
                .map(|(_, c)| *c)
                .unwrap_or_default()
        };
        for (name, help, value) in [
            (
                "maglb_conntrack_hits",
                "Packets whose flow was in the connection table",
                get("conntrack_hit").packets,
            ),
            (
                "maglb_conntrack_misses",
                "Packets whose flow was not in the connection table",
                get("conntrack_miss").packets,
            ),
            (
                "maglb_encapsulated_packets",
                "Packets encapsulated and sent to backends",
                get("tx_encap").packets,
            ),
            (
                "maglb_encapsulated_bytes",
                "Bytes sent to backends, outer headers included",
                get("tx_encap").bytes,
            ),
        ] {
            counters(enc, name, help, [(no_labels(), value)])?;
        }
        for (prefix, family, label, help) in GROUPS {
            counters(
                enc,
                family,
                help,
                globals.iter().filter_map(|(name, c)| {
                    let reason = name.strip_prefix(prefix)?;
                    Some((vec![(*label, reason.to_owned())], c.packets))
                }),
            )?;
        }
        Ok(())
    }

    /// Each backend's configured weight and its weight now (adaptive weights).
    fn weights(&self, enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
        let weights: Vec<(Labels, u32, u32)> = s
            .state
            .vips
            .iter()
            .flat_map(|v| {
                v.backends.iter().map(move |b| {
                    let labels = vec![
                        ("vip", v.address.to_string()),
                        ("backend", b.address.to_string()),
                    ];
                    (labels, b.weight, s.weight_percent(&v.address, &b.address))
                })
            })
            .collect();
        gauges(
            enc,
            "maglb_backend_weight",
            "The backend's configured weight",
            weights.iter().map(|(l, w, _)| (l.clone(), i64::from(*w))),
        )?;
        float_gauges(
            enc,
            "maglb_backend_effective_weight",
            "The backend's weight now: the configured one, lowered by adaptive weights while \
             its probes are much slower than its peers'",
            weights
                .iter()
                .map(|(l, w, p)| (l.clone(), *w as f64 * *p as f64 / 100.0)),
        )
    }

    /// The probe classifier's counters, while it is loaded.
    fn probe_tunnel(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        counters(
            enc,
            "maglb_probe_tunnel_packets",
            "Probe packets the probe classifier handled: encapsulated, or dropped by reason",
            self.0.tunnel.borrow().stats.iter().flat_map(|st| {
                st.read()
                    .into_iter()
                    .zip(lb_common::probe_stat::NAMES)
                    .map(|(c, n)| (vec![("result", n.to_owned())], c.packets))
                    .collect::<Vec<_>>()
            }),
        )
    }

    /// The flood mode and the connection table's size.
    fn datapath(&self, enc: &mut DescriptorEncoder, s: &Snapshot) -> fmt::Result {
        let f = self.0.counters.flood();
        counters(
            enc,
            "maglb_flood_not_inserted_flows",
            "New flows forwarded without a connection-table entry because their CPU was over the flood threshold",
            [(no_labels(), f.not_inserted)],
        )?;
        counters(
            enc,
            "maglb_flood_windows",
            "Flood-meter windows (about 134 ms, per CPU) in which a CPU reached the flood threshold",
            [(no_labels(), f.flood_windows)],
        )?;
        gauges(
            enc,
            "maglb_conntrack_entries",
            "Size of the connection table in flows (conntrack_entries, rounded up to a power of two)",
            [(no_labels(), i64::from(s.conntrack))],
        )
    }

    /// One sample per VIP while `[bgp]` is configured: 1 while its address is announced.
    fn bgp(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let b = self.0.bgp();
        gauges(
            enc,
            "maglb_bgp_announced",
            "1 while this balancer announces the VIP's address over BGP (through BIRD)",
            b.iter().flat_map(|b| {
                b.addresses.iter().flat_map(|a| {
                    a.vips
                        .iter()
                        .map(|v| (vec![("vip", v.to_string())], i64::from(a.announced)))
                })
            }),
        )
    }

    fn vrrp(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let v = self.0.vrrp();
        let vrid = |v: &crate::api::VrrpStatus| vec![("vrid", v.vrid.to_string())];
        gauges(
            enc,
            "maglb_vrrp_master",
            "1 while this balancer is the VRRP master",
            v.iter()
                .map(|v| (vrid(v), i64::from(v.state == crate::api::VrrpState::Master))),
        )?;
        gauges(
            enc,
            "maglb_vrrp_priority",
            "Advertised VRRP priority (after tracking)",
            v.iter().map(|v| (vrid(v), i64::from(v.effective_priority))),
        )?;
        counters(
            enc,
            "maglb_vrrp_transitions",
            "VRRP state changes",
            v.iter().map(|v| (vrid(v), v.transitions)),
        )?;
        counters(
            enc,
            "maglb_vrrp_invalid_adverts",
            "VRRP advertisements refused, by reason",
            v.iter().flat_map(|v| {
                v.invalid.iter().map(|(reason, n)| {
                    (
                        vec![("vrid", v.vrid.to_string()), ("reason", reason.clone())],
                        *n,
                    )
                })
            }),
        )
    }
}
