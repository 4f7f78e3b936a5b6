//! What the benchmarks share: where the release binaries are, and sizing
//! from the environment.

use std::path::PathBuf;

/// A binary of the release build; benchmarks measure what users run.
pub fn release_bin(name: &str) -> PathBuf {
    // The same target directory cargo used for the build, if it was moved.
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from);
    let path = target.join("release").join(name);
    assert!(path.is_file(), "{} missing: cargo build --release --workspace --bins", path.display());
    path
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
