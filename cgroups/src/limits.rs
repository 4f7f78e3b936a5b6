//! Resource limits of one sandbox, validated when built: a [`Limits`] that
//! exists is one the kernel will accept and that makes sense on this host.
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

use std::path::Path;

use oci_spec::runtime::{LinuxCpu, LinuxMemory, LinuxPids, LinuxResources};

pub use agentd_plan::limits::{LimitsError, MAX_CPUS, MAX_MEMORY_BYTES, MAX_PIDS, MIN_CPUS, MIN_MEMORY_BYTES, MIN_PIDS, check_bounds};

/// The CFS period we use, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// What the host can give, against which limits are checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostCapacity {
    /// CPUs the node may use (online CPUs, or fewer if its affinity or its
    /// own cgroup quota says so).
    pub cpus: f64,
    /// Physical memory, bytes (`MemTotal`).
    pub memory_bytes: u64,
}

impl HostCapacity {
    /// Reads the host's capacity: memory from `<proc>/meminfo`, CPUs from
    /// `std::thread::available_parallelism` (which honours affinity and a
    /// cgroup quota on the node itself).
    pub fn detect(proc: &Path) -> Result<HostCapacity, LimitsError> {
        let path = proc.join("meminfo");
        let text = std::fs::read_to_string(&path).map_err(|e| LimitsError::Host {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let memory_bytes = parse_mem_total(&text).ok_or_else(|| LimitsError::Host {
            path: path.clone(),
            reason: "no MemTotal line".into(),
        })?;
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        Ok(HostCapacity { cpus, memory_bytes })
    }
}

/// `MemTotal:  16384 kB` -> bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut it = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => n.checked_mul(1024),
        _ => None,
    }
}

/// Resource limits of one sandbox; `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Memory limit in bytes. Swap is limited too: memory+swap = memory.
    memory_bytes: Option<u64>,
    /// Most processes (and threads) the sandbox may hold at once.
    pids_max: Option<u64>,
    /// CPU time as a fractional count of CPUs (0.5 = half of one CPU).
    cpus: Option<f64>,
}

impl Limits {
    /// No limit at all.
    pub fn unlimited() -> Limits {
        Limits::default()
    }

    /// Validated limits; see the module doc for the bounds.
    pub fn new(
        memory_bytes: Option<u64>,
        pids_max: Option<u64>,
        cpus: Option<f64>,
        host: &HostCapacity,
    ) -> Result<Limits, LimitsError> {
        check_bounds(memory_bytes, pids_max, cpus)?;
        if let Some(bytes) = memory_bytes
            && bytes > host.memory_bytes
        {
            return Err(LimitsError::MemoryTooLarge {
                bytes,
                host: host.memory_bytes,
            });
        }
        if let Some(value) = cpus
            && value > host.cpus
        {
            return Err(LimitsError::CpusOutOfRange {
                value,
                min: MIN_CPUS,
                max: host.cpus,
            });
        }
        Ok(Limits {
            memory_bytes,
            pids_max,
            cpus,
        })
    }

    pub fn memory_bytes(&self) -> Option<u64> {
        self.memory_bytes
    }

    pub fn pids_max(&self) -> Option<u64> {
        self.pids_max
    }

    pub fn cpus(&self) -> Option<f64> {
        self.cpus
    }

    /// The CFS quota for [`CPU_PERIOD_US`], in microseconds (0.5 CPU ->
    /// 50000), if a CPU limit is set.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpus
            .map(|c| ((c * CPU_PERIOD_US as f64).round() as u64).max(1000))
    }

    /// The same limits as OCI resources, for libcgroups. Swap is left out:
    /// the v2 path writes `memory.swap.max` itself (see `v2::apply`).
    pub(crate) fn to_oci(self) -> LinuxResources {
        let mut res = LinuxResources::default();
        if let Some(bytes) = self.memory_bytes {
            let mut mem = LinuxMemory::default();
            // Bounded by the host's memory in `new`, so it fits in i64.
            mem.set_limit(Some(bytes as i64));
            res.set_memory(Some(mem));
        }
        if let Some(max) = self.pids_max {
            let mut pids = LinuxPids::default();
            pids.set_limit(max as i64);
            res.set_pids(Some(pids));
        }
        if let Some(quota) = self.cpu_quota_us() {
            let mut cpu = LinuxCpu::default();
            cpu.set_quota(Some(quota as i64));
            cpu.set_period(Some(CPU_PERIOD_US));
            res.set_cpu(Some(cpu));
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostCapacity = HostCapacity {
        cpus: 2.0,
        memory_bytes: 8 << 30,
    };

    #[test]
    fn accepts_sensible_limits() {
        let l = Limits::new(Some(512 << 20), Some(256), Some(0.5), &HOST).unwrap();
        assert_eq!(l.memory_bytes(), Some(512 << 20));
        assert_eq!(l.pids_max(), Some(256));
        assert_eq!(l.cpu_quota_us(), Some(50_000));
        assert_eq!(
            Limits::new(None, None, None, &HOST).unwrap(),
            Limits::unlimited()
        );
    }

    #[test]
    fn cpu_quota_rounds_and_keeps_the_kernel_minimum() {
        let q = |c| {
            Limits::new(None, None, Some(c), &HOST)
                .unwrap()
                .cpu_quota_us()
        };
        assert_eq!(q(0.01), Some(1000));
        assert_eq!(q(1.5), Some(150_000));
        assert_eq!(q(2.0), Some(200_000));
        assert_eq!(q(0.333_33), Some(33_333));
    }

    #[test]
    fn refuses_out_of_range_memory() {
        assert_eq!(
            Limits::new(Some(0), None, None, &HOST),
            Err(LimitsError::MemoryTooSmall {
                bytes: 0,
                min: 4 << 20
            })
        );
        assert!(matches!(
            Limits::new(Some((4 << 20) - 1), None, None, &HOST),
            Err(LimitsError::MemoryTooSmall { .. })
        ));
        assert!(Limits::new(Some(4 << 20), None, None, &HOST).is_ok());
        assert!(Limits::new(Some(8 << 30), None, None, &HOST).is_ok());
        assert_eq!(
            Limits::new(Some((8 << 30) + 1), None, None, &HOST),
            Err(LimitsError::MemoryTooLarge {
                bytes: (8 << 30) + 1,
                host: 8 << 30
            })
        );
        assert!(Limits::new(Some(u64::MAX), None, None, &HOST).is_err());
        assert!(check_bounds(Some(8 << 40), None, None).is_ok());
        assert!(matches!(
            check_bounds(Some(MAX_MEMORY_BYTES + 1), None, None),
            Err(LimitsError::MemoryAbsurd { .. })
        ));
        assert!(matches!(
            check_bounds(Some(1 << 20), None, None),
            Err(LimitsError::MemoryTooSmall { .. })
        ));
    }

    #[test]
    fn refuses_out_of_range_pids() {
        for bad in [0, 1, 3, MAX_PIDS + 1, u64::MAX] {
            assert!(
                matches!(
                    Limits::new(None, Some(bad), None, &HOST),
                    Err(LimitsError::PidsOutOfRange { .. })
                ),
                "{bad}"
            );
        }
        assert!(Limits::new(None, Some(4), None, &HOST).is_ok());
        assert!(Limits::new(None, Some(MAX_PIDS), None, &HOST).is_ok());
    }

    #[test]
    fn refuses_out_of_range_cpus() {
        for bad in [0.0, -1.0, 0.009, 8192.5, 1e9] {
            assert!(
                matches!(
                    Limits::new(None, None, Some(bad), &HOST),
                    Err(LimitsError::CpusAbsurd { .. })
                ),
                "{bad}"
            );
            assert!(check_bounds(None, None, Some(bad)).is_err(), "{bad}");
        }
        // Sane anywhere, too many for this host: only the node can tell.
        assert!(check_bounds(None, None, Some(2.01)).is_ok());
        assert!(matches!(
            Limits::new(None, None, Some(2.01), &HOST),
            Err(LimitsError::CpusOutOfRange { .. })
        ));
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(
                Limits::new(None, None, Some(bad), &HOST),
                Err(LimitsError::CpusNotFinite { .. })
            ));
        }
        let msg = Limits::new(None, None, Some(3.0), &HOST)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("cpus 3"), "{msg}");
    }

    #[test]
    fn oci_resources() {
        let l = Limits::new(Some(64 << 20), Some(8), Some(0.25), &HOST).unwrap();
        let r = l.to_oci();
        let mem = r.memory().unwrap();
        assert_eq!(mem.limit(), Some(64 << 20));
        assert_eq!(mem.swap(), None);
        assert_eq!(r.pids().unwrap().limit(), 8);
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(25_000));
        assert_eq!(r.cpu().as_ref().unwrap().period(), Some(100_000));
        let none = Limits::unlimited().to_oci();
        assert!(none.memory().is_none() && none.pids().is_none() && none.cpu().is_none());
    }

    #[test]
    fn reads_mem_total() {
        let text = "MemTotal:        2030428 kB\nMemFree:  1 kB\n";
        assert_eq!(parse_mem_total(text), Some(2_030_428 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        let host = HostCapacity::detect(Path::new("/proc")).unwrap();
        assert!(host.cpus >= 1.0 && host.memory_bytes > 0);
    }
}
