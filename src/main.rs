//! The qbuild command: everything happens in the library's `run`.

// Expansion and graph building allocate many small strings; mimalloc makes a no-op over
// 100k jobs markedly faster than the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Hand freed memory back to the OS at once rather than after a delay (1 s in mimalloc
    // v3): expanding 100k jobs frees many short-lived strings, and with the delay a no-op
    // at 90k jobs peaked ~40 MB higher (158 MB against 199 MB).
    // `mi_option_purge_delay` is 15 in mimalloc.h (v2 and v3; `MIMALLOC_VERBOSE=1` lists it
    // as 'purge_delay'); the crate names no constant for it. An environment setting
    // (`MIMALLOC_PURGE_DELAY`) still wins, for experiments.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option of the allocator, before any other thread starts.
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
    let code = qbuild::run();
    // Everything qbuild wrote is flushed here; what `exit` would still do is the
    // allocator's teardown, which with no purge delay hands every touched page back to the
    // OS (a `madvise` each, ~17 even for `--version`) just before the process is gone.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: ends the process; no destructor or exit handler of ours is left to run.
    unsafe { libc::_exit(code) }
}
