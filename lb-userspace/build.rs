use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the XDP programs (`lb-ebpf`, next to this crate) for the BPF target;
/// `src/programs.rs` embeds them.
fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or the nightly \
         rust-src component is missing)",
    )
}
