//! The `maglb` command, built inside this package too so that its tests can run it as a
//! separate process (`CARGO_BIN_EXE_maglb-cli`); it is `lb-userspace`'s `maglb` unchanged.
fn main() -> std::process::ExitCode {
    lb_userspace::cli::main()
}
