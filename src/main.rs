//! The `cdrguard` binary: everything is in the library's `cli` module.

fn main() -> anyhow::Result<()> {
    cdrguard::cli::main()
}
