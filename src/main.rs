//! The `regobox` binary: everything is in the library; this only turns its outcome into an exit
//! code.

/// mimalloc rather than glibc's malloc: the proxy allocates and frees a few dozen small objects
/// per request (hyper's messages, header maps, tasks), and glibc's allocator was 13-15 % of the
/// instructions per proxied request (scripts/profile-proxy.sh; scripts/PERFORMANCE.md). Built
/// without its transparent-huge-page advice (`no_thp`): with it, the process started 10 MiB
/// larger and an idle connection cost more; and the other way of turning it off
/// (`PR_SET_THP_DISABLE`) would be inherited by PostgreSQL and the application.
///
/// Through [`Allocator`], not the `mimalloc` crate's own `MiMalloc`, which asks for every block
/// with `mi_malloc_aligned`, whatever the alignment.
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

/// mimalloc's blocks are all a multiple of a word in size and start on one: an alignment of a
/// word or less needs no asking. `mi_malloc_aligned` (mimalloc 3) takes its fast path only for a
/// block of up to 1 KiB; a larger one whose size is not a power of two goes to its generic path
/// and is over-allocated (found under callgrind: 18 allocations per proxied HTTP/1.1 request cost
/// 1 970 instructions, 6 of them through that path: scripts/PERFORMANCE.md).
struct Allocator;

/// The alignment every mimalloc block has (`sizeof(void*)`).
const WORD: usize = std::mem::size_of::<usize>();

// SAFETY: each call is mimalloc's for the layout: `mi_malloc`, `mi_zalloc` and `mi_realloc` when
// the alignment asked is at most a word (every block is word-aligned), mimalloc's aligned calls
// otherwise; every block, however made, is freed by `mi_free`.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys as mi;
        unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        use libmimalloc_sys as mi;
        unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast(), size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), size, layout.align()).cast()
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(regobox::cli::main())
}
