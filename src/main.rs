//! The qbuild command: everything happens in the library's `run`.

fn main() {
    std::process::exit(qbuild::run());
}
