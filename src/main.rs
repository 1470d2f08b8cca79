//! The `regobox` binary: everything is in the library; this only turns its outcome into an exit
//! code.

/// mimalloc rather than glibc's malloc: the proxy allocates and frees a few dozen small objects
/// per request (hyper's messages, header maps, tasks), and glibc's allocator was 13-15 % of the
/// instructions per proxied request (scripts/profile-proxy.sh; scripts/PERFORMANCE.md). Built
/// without its transparent-huge-page advice (`no_thp`): with it, the process started 10 MiB
/// larger and an idle connection cost more; and the other way of turning it off
/// (`PR_SET_THP_DISABLE`) would be inherited by PostgreSQL and the application.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(regobox::cli::main())
}
