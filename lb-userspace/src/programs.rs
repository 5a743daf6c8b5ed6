//! The XDP objects built from `lb-ebpf` by `build.rs`, embedded in the binary.

/// The balancer (`maglb_balancer`).
pub static BALANCER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-balancer"));

/// The backend programs (`maglb_decap`, and `maglb_pass`, which passes everything).
pub static DECAP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-decap"));

/// Benchmark tools (`maglb_gen`, `maglb_tx`, `maglb_sink`); see `lb-ebpf/src/bin/tools.rs`.
pub static TOOLS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-tools"));

/// The balancer's egress classifier for health probes over the data path
/// (`maglb_probe_encap`).
pub static PROBE_ENCAP: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-probe-encap"));
