//! The bounds of a sandbox's resource limits that hold on every host, and
//! the errors of limits that break a bound (this module's or a host's: the
//! node checks its own memory and CPUs with `agentd_cgroups::Limits`).
//!
//! Bounds, and why:
//! - memory: at least [`MIN_MEMORY_BYTES`] (4 MiB: below that an agent's
//!   runtime cannot even start, so the number is a unit mistake), at most the
//!   host's physical memory (swap is disabled for sandboxes, so a larger limit
//!   is no limit and again likely a unit mistake).
//! - pids: [`MIN_PIDS`]..=[`MAX_PIDS`]: a supervisor, an agent and a shell need
//!   a few; 4194304 is the kernel's `PID_MAX_LIMIT` on 64-bit.
//! - cpus: at least [`MIN_CPUS`] (0.01: a quota of 1 ms per 100 ms period, the
//!   kernel's minimum quota), at most the CPUs this host offers; finite.
//!
//! The bounds that hold on any host ([`check_bounds`]: the minimums,
//! [`MAX_MEMORY_BYTES`], [`MAX_PIDS`], [`MAX_CPUS`]) are what a control
//! plane can judge without asking the node; the host's memory and CPUs only
//! the node knows.

use std::path::PathBuf;

/// The smallest memory limit we accept: 4 MiB.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// The smallest pids limit we accept.
pub const MIN_PIDS: u64 = 4;
/// The largest pids limit we accept: the kernel's `PID_MAX_LIMIT` (64-bit).
pub const MAX_PIDS: u64 = 4_194_304;
/// The smallest CPU share we accept (1 ms of quota per 100 ms period).
pub const MIN_CPUS: f64 = 0.01;
/// The largest memory limit any host could honour: 64 TiB, all that 46
/// physical address bits (x86-64 with 4-level paging) reach. Anything above
/// is a unit mistake.
pub const MAX_MEMORY_BYTES: u64 = 1 << 46;
/// The most CPUs a kernel can be built for (`CONFIG_NR_CPUS` with x86-64's
/// MAXSMP). Anything above is a unit mistake (millicores, say).
pub const MAX_CPUS: f64 = 8192.0;
/// A limit that cannot be applied, with the bound it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitsError {
    #[error("memory limit {bytes} bytes is below the minimum of {min} bytes (4 MiB)")]
    MemoryTooSmall { bytes: u64, min: u64 },
    #[error("memory limit {bytes} bytes is above {max} bytes (64 TiB), more than any host has")]
    MemoryAbsurd { bytes: u64, max: u64 },
    #[error("memory limit {bytes} bytes exceeds the host's {host} bytes of memory")]
    MemoryTooLarge { bytes: u64, host: u64 },
    #[error("pids limit {value} is outside {min}..={max}")]
    PidsOutOfRange { value: u64, min: u64, max: u64 },
    #[error("cpus {value} is not a finite number")]
    CpusNotFinite { value: f64 },
    #[error("cpus {value} is outside {min}..={max}, the most CPUs any host has")]
    CpusAbsurd { value: f64, min: f64, max: f64 },
    #[error("cpus {value} is outside {min}..={max} (the host offers {max})")]
    CpusOutOfRange { value: f64, min: f64, max: f64 },
    #[error("cannot read host capacity from {}: {reason}", path.display())]
    Host { path: PathBuf, reason: String },
}

/// The bounds every host shares (see the module doc): what can be refused
/// without knowing the host.
pub fn check_bounds(memory_bytes: Option<u64>, pids_max: Option<u64>, cpus: Option<f64>) -> Result<(), LimitsError> {
    if let Some(bytes) = memory_bytes {
        if bytes < MIN_MEMORY_BYTES {
            return Err(LimitsError::MemoryTooSmall {
                bytes,
                min: MIN_MEMORY_BYTES,
            });
        }
        if bytes > MAX_MEMORY_BYTES {
            return Err(LimitsError::MemoryAbsurd {
                bytes,
                max: MAX_MEMORY_BYTES,
            });
        }
    }
    if let Some(value) = pids_max
        && !(MIN_PIDS..=MAX_PIDS).contains(&value)
    {
        return Err(LimitsError::PidsOutOfRange {
            value,
            min: MIN_PIDS,
            max: MAX_PIDS,
        });
    }
    if let Some(value) = cpus {
        if !value.is_finite() {
            return Err(LimitsError::CpusNotFinite { value });
        }
        if !(MIN_CPUS..=MAX_CPUS).contains(&value) {
            return Err(LimitsError::CpusAbsurd {
                value,
                min: MIN_CPUS,
                max: MAX_CPUS,
            });
        }
    }
    Ok(())
}
