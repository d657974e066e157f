//! End-to-end tests: the real `qbuild` binary (and the `qairt-sim` toolchain) in temporary
//! work folders. `cargo test --test e2e`; `QBUILD_KEEP=1` keeps the folders for debugging.
//!
//! - `demo`: the demo pipeline (Qairtfile.example): what reruns after each kind of change,
//!   targets, failures, dry runs.
//! - `errors`: bad Qairtfiles, with their messages verbatim.
//! - `prop`: random DAGs with random edits against a model of the staleness rules.
//! - `artifacts`: symlinks and folders as artifacts, the toolchain, `--check`, step checks.
//! - `reliability`: crashes, signals, locking, hostile Qairtfiles, cleanup, I/O errors.
//! - `iteration`: `--watch`, progress, logs, `--explain`, `--list`/`--graph`/`--clean`/`--status`/`--trace`.

mod artifacts;
mod demo;
mod errors;
mod iteration;
mod prop;
mod reliability;
mod support;
