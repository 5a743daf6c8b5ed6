//! The XDP objects built from `lb-ebpf` by `build.rs`, embedded in the binary.

/// The balancer (`maglb_balancer`).
pub static BALANCER: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-balancer"));

/// The backend programs (`maglb_decap`, and `maglb_pass`, which passes everything).
pub static DECAP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-decap"));

/// Benchmark tools (`maglb_gen`, `maglb_tx`, `maglb_sink`, `maglb_calls_helper`,
/// `maglb_calls_sub`); see `lb-ebpf/src/bin/tools.rs`.
pub static TOOLS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-tools"));

/// The balancer's egress classifier for health probes over the data path
/// (`maglb_probe_encap`).
pub static PROBE_ENCAP: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/maglb-probe-encap"));

#[cfg(test)]
mod tests {
    use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

    /// The memory functions a BPF object may call: the linker's versions are byte-by-byte
    /// loops. LLVM emits calls to them for large zeroing or copies (it once merged an IPv4 flow
    /// key's zero words into a 16-byte `memset`: a 16-round loop on every packet).
    const BYTE_LOOPS: [&str; 5] = ["memset", "memcpy", "memmove", "memcmp", "bcmp"];

    /// The byte-loop functions `elf`'s code calls, one entry per call site.
    fn byte_loop_calls(elf: &[u8]) -> Vec<String> {
        let file = object::File::parse(elf).expect("an ELF object");
        let mut calls = Vec::new();
        for section in file.sections() {
            for (_, reloc) in section.relocations() {
                let RelocationTarget::Symbol(index) = reloc.target() else {
                    continue;
                };
                let name = file
                    .symbol_by_index(index)
                    .and_then(|s| s.name())
                    .unwrap_or("");
                if BYTE_LOOPS.contains(&name) {
                    let section = section.name().unwrap_or("?");
                    calls.push(format!("{name} from {section}"));
                }
            }
        }
        calls
    }

    #[test]
    fn no_program_calls_a_byte_loop() {
        for (name, elf) in [
            ("balancer", super::BALANCER),
            ("decap", super::DECAP),
            ("tools", super::TOOLS),
            ("probe_encap", super::PROBE_ENCAP),
        ] {
            assert_eq!(byte_loop_calls(elf), Vec::<String>::new(), "{name}");
        }
    }
}
