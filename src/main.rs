//! The `cdrguard` binary: everything is in the library's `cli` module.

/// mimalloc for Rust's allocations; its `override` feature makes it the C `malloc` of
/// librdkafka as well (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cdrguard::cli::main()
}
