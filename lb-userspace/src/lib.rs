//! maglb user space: the Maglev table builder, the datapath loader, VIP/backend management.
pub mod addr;
pub mod balancer;
pub mod decap;
pub mod maglev;
pub mod netdev;
pub mod programs;
pub mod service;
