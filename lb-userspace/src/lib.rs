//! maglb user space: the Maglev table builder, the datapath loader, VIP/backend management,
//! the agent and the `maglb` command.
pub mod addr;
pub mod agent;
pub mod api;
pub mod balancer;
pub mod bpffs;
pub mod cli;
pub mod client;
pub mod decap;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod netdev;
pub mod netlink;
pub mod programs;
pub mod service;
pub mod state;
pub mod store;
pub mod vrrp;

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
