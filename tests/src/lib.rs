//! Helpers for maglb's integration tests, demo and benchmarks.
pub mod fixture;
pub mod packet;
