//! The qbuild command: everything happens in the library's `run`.

// Expansion and graph building allocate many small strings; mimalloc makes a no-op over
// 100k jobs markedly faster than the system allocator.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(qbuild::run());
}
