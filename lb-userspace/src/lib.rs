//! maglb user space. One command's path, by folder: `cli` → `api` (client, server) →
//! `writer` (the one writer) → `state` (validate, diff) → `reconcile` (map writes) →
//! `datapath` (the maps). Readers go through `views` and never wait for the writer; `health`,
//! `vrrp` and `metrics` run beside it; `agent` wires everything.
pub mod addr;
pub mod agent;
pub mod api;
pub mod balancer;
pub mod bgp;
pub mod bpffs;
pub mod cli;
pub mod datapath;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod netlink;
pub mod programs;
pub mod reconcile;
pub mod state;
pub mod store;
mod sys;
mod tls;
pub mod views;
pub mod vrrp;
pub mod writer;

/// An error and its causes on one line, for messages to operators.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
