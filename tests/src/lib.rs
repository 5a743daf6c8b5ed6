//! Helpers for maglb's integration tests, demo and benchmarks.
pub mod agent;
pub mod bench;
pub mod browser;
pub mod certs;
pub mod ecmp;
pub mod fixture;
pub mod flood;
pub mod fuzz;
pub mod netns;
pub mod packet;
pub mod soak;
pub mod topology;
pub mod traffic;
