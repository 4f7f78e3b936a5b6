//! What the benchmarks share: where the release binaries are, and sizing
//! from the environment.

use std::path::PathBuf;

/// The target directory cargo used for the build, if it was moved.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from)
}

/// A binary of the release build; benchmarks measure what users run.
pub fn release_bin(name: &str) -> PathBuf {
    let path = target_dir().join("release").join(name);
    assert!(path.is_file(), "{} missing: cargo build --release --workspace --bins", path.display());
    path
}

/// `agentd-sandbox` as it is shipped: the `sandbox` profile's build
/// (`scripts/build-release`), else the release profile's, with a warning.
#[allow(dead_code)] // not every bench starts sandboxes
pub fn sandbox_bin() -> PathBuf {
    let dense = target_dir().join("sandbox").join("agentd-sandbox");
    if dense.is_file() {
        return dense;
    }
    let path = release_bin("agentd-sandbox");
    println!("note: {} missing (scripts/build-release builds it); using {}", dense.display(), path.display());
    path
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
