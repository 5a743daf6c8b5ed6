//! The live status page on the metrics listener, like HAProxy's stats page: every VIP and
//! backend with its state, health, last probe result and latency, and live rates, plus the
//! VRRP state. One embedded HTML file with its script and styles (no outside assets); it
//! refreshes from `/status.json`.

use serde::Serialize;

use crate::{
    api::{VipView, VrrpStatus},
    views::Views,
};

pub const HTML: &str = include_str!("status.html");

/// What the page reads: cumulative counters (the page computes rates between two reads),
/// health and states.
#[derive(Serialize)]
pub struct PageData {
    pub version: &'static str,
    /// Seconds since the epoch, with fractions: the page's clock for rates.
    pub now: f64,
    pub interface: Option<String>,
    pub attached: bool,
    pub forwarding: bool,
    pub vips: Vec<VipView>,
    pub vrrp: Option<VrrpStatus>,
}

pub fn data(views: &Views) -> PageData {
    let status = views.status();
    PageData {
        version: env!("CARGO_PKG_VERSION"),
        now: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        interface: status.interface,
        attached: status.attached,
        forwarding: status.ready,
        vips: views.vips(),
        vrrp: views.vrrp(),
    }
}
