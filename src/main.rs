//! The `cdrguard` binary: everything is in the library's `cli` module.

fn main() -> std::process::ExitCode {
    cdrguard::cli::main()
}
