//! Pieces shared by maglb's XDP programs: packet parsing, checksums, the flow hash.
//!
//! Compiled for the BPF target as part of the programs, and for the host only as an (empty in
//! effect) build dependency of `lb-userspace`.
#![no_std]

pub mod csum;
pub mod parse;

/// The flow hash lives in `lb-common`, so user space and its tests compute the same one.
pub use lb_common::hash;
