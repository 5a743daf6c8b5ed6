//! `cargo xtask fuzz`: see `maglb_tests::fuzz`.
fn main() -> anyhow::Result<()> {
    maglb_tests::fuzz::main()
}
