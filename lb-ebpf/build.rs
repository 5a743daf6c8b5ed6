// Rebuild when bpf-linker changes (a new LLVM means a new object).
fn main() {
    let bpf_linker = which::which("bpf-linker").unwrap_or_default();
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
