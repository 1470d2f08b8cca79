//! The `regobox` binary: everything is in the library; this only turns its outcome into an exit
//! code.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(regobox::cli::main())
}
