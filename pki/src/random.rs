//! Randomness for secrets, ids and serial numbers, straight from the OS.

/// The OS could not give us random bytes (on Linux: `getrandom(2)` failed, which
/// happens only on very old kernels or under a seccomp policy that forbids it).
#[derive(Debug, thiserror::Error)]
#[error("the OS random number generator failed: {0}")]
pub struct RandomError(getrandom::Error);

/// `N` random bytes.
pub fn bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(RandomError)?;
    Ok(out)
}
