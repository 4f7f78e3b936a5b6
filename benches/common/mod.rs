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

/// `agentd`, the binary that builds sandboxes, with a note when it is not
/// the build that is shipped (`scripts/build-release`: dense and static)
/// but a plain release build, which starts slower.
#[allow(dead_code)] // not every bench starts sandboxes
pub fn agentd_bin() -> PathBuf {
    let path = release_bin("agentd");
    // A dynamically linked executable names its loader near its start
    // (PT_INTERP); a static one has none.
    let head = std::fs::read(&path).map(|b| b[..b.len().min(4096)].to_vec()).unwrap_or_default();
    if head.windows(8).any(|w| w == b"ld-linux") {
        println!("note: {} is linked dynamically: scripts/build-release builds it as shipped (dense, static)", path.display());
    }
    path
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
