//! The datapath configuration: interface MAC, MTU, outer sources and the next hop's MAC,
//! computed from the kernel's tables (rtnetlink) and handed to the writer when it changes.
//! It is computed again as soon as the kernel says a link, address, route or neighbour entry
//! changed (a router's new MAC, learnt from its gratuitous ARP, reaches the datapath within
//! milliseconds), when the state changes, and every second in any case. It has its own
//! netlink connections: two dumps at once on one netlink socket fail with EBUSY.

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures_util::{FutureExt as _, Stream, StreamExt as _};
use lb_common::Config;
use rtnetlink::Handle;
use tokio::{sync::watch, time::Instant};
use tracing::warn;

use crate::{
    addr, netlink,
    state::State,
    writer::{Command, Snapshot, WriterHandle},
};

/// After a kernel notice, how long to wait for the rest of the same change (a link coming
/// up sends several) before looking again.
const SETTLE: Duration = Duration::from_millis(20);
/// The least time between two looks caused by notices: a busy neighbour table (every entry's
/// state change is a notice) costs at most twenty looks a second.
const MIN_GAP: Duration = Duration::from_millis(50);

/// Runs until the writer goes.
pub async fn run(writer: WriterHandle, mut snap: watch::Receiver<Arc<Snapshot>>) {
    let nl = match netlink::connect() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "no netlink connection for the next hop; the datapath will not forward");
            return;
        }
    };
    let mut notices = subscribe();
    let mut lost = false;
    let mut last_error = String::new();
    let mut looked = Instant::now();
    loop {
        let s = snap.borrow_and_update().clone();
        if let Some(iface) = s.state.balancer.interface.clone().filter(|_| s.attached) {
            looked = Instant::now();
            match desired_config(&s.state, &iface, &nl).await {
                Ok((config, nexthop)) => {
                    last_error.clear();
                    if config != s.config || nexthop != s.nexthop {
                        let cmd = Command::Config { config, nexthop };
                        if writer.send(cmd).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    if e != last_error {
                        warn!(error = %e, "datapath configuration not complete");
                        last_error = e;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if lost {
                    notices = subscribe();
                    lost = notices.is_none();
                }
            }
            r = snap.changed() => if r.is_err() { return },
            more = notice(&mut notices) => {
                if !more {
                    // The socket failed (its buffer overflowed, say): look now, and subscribe
                    // again at the next second.
                    warn!("the kernel's netlink notices stopped; subscribing again");
                    (notices, lost) = (None, true);
                    continue;
                }
                tokio::time::sleep_until((Instant::now() + SETTLE).max(looked + MIN_GAP)).await;
                if let Some(n) = notices.as_mut() {
                    while let Some(Some(_)) = n.next().now_or_never() {}
                }
            }
        }
    }
}

/// The kernel's notices of changes, or none (then the configuration is looked at every
/// second only).
fn subscribe() -> Option<impl Stream + Unpin> {
    netlink::watch()
        .inspect_err(|e| warn!(error = %crate::error_chain(e), "no netlink notices; the next hop is looked up every second"))
        .ok()
}

/// Waits for a notice: true when one came, false when the stream ended; forever without a
/// stream.
async fn notice(notices: &mut Option<impl Stream + Unpin>) -> bool {
    match notices {
        Some(n) => n.next().await.is_some(),
        None => std::future::pending().await,
    }
}

async fn desired_config(
    state: &State,
    iface: &str,
    nl: &Handle,
) -> anyhow::Result<(Config, Option<(IpAddr, [u8; 6])>)> {
    let b = &state.balancer;
    let link = netlink::link(nl, iface).await?;
    let mtu = match b.mtu {
        Some(m) => m,
        None => link.mtu.min(u16::MAX as u32) as u16,
    };
    let (a4, a6) = netlink::addresses(nl, link.index).await?;
    let src_v4 = b.source_v4.map(Into::into).or(a4);
    let src_v6 = b.source_v6.map(Into::into).or(a6);
    let mut cfg = Config {
        src_v6: src_v6.map(|a| addr::to_words(a).0).unwrap_or_default(),
        src_v4: src_v4.map(|a| addr::to_words(a).0[0]).unwrap_or(0),
        mtu,
        ready: 0,
        if_mac: link.mac,
        nh_mac: [0; 6],
    };
    let target = b.nexthop.or_else(|| {
        state
            .vips
            .iter()
            .flat_map(|v| v.backends.iter())
            .map(|b| b.address)
            .next()
    });
    let nexthop = match (&b.nexthop_mac, target) {
        (Some(mac), _) => {
            cfg.nh_mac = addr::parse_mac(mac).expect("validated");
            None
        }
        (None, Some(t)) => {
            let (gw, mac) = netlink::nexthop_mac(nl, t).await?;
            cfg.nh_mac = mac;
            Some((gw, mac))
        }
        (None, None) => None,
    };
    // Forward only with a next hop to send to; until then everything goes to the kernel.
    cfg.ready = u16::from(cfg.nh_mac != [0; 6]);
    Ok((cfg, nexthop))
}
