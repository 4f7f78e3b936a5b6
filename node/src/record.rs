//! `sandbox.json`: what a restarted node needs to take a running sandbox
//! back (live restore) or, failing that, to stop what is left of it.
//!
//! Written atomically ([`crate::state_file`]) when the sandbox is built and
//! again when it is frozen or thawed. PID 1 is known by its pid *and* its
//! start time and the host's boot id, so a pid reused by another process
//! while the node was away is never taken for the sandbox.

use std::path::Path;

use agentd_builder::IdRange;
use agentd_cgroups::sandbox::SandboxCgroup;
use agentd_proto::common::SeccompPolicy;
use prost::Message;
use serde::{Deserialize, Serialize};

/// The version of the record's shape this node writes and takes back.
/// Records without one (older nodes) can only be cleaned up.
pub const VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub id: String,
    /// Host pid of PID 1 (the supervisor).
    pub pid: i32,
    /// PID 1's start time (`/proc/<pid>/stat` field 22, clock ticks since boot).
    pub pid_start: u64,
    /// The host's boot (`/proc/sys/kernel/random/boot_id`): pids of another
    /// boot mean nothing.
    pub boot_id: String,
    pub slot: u32,
    pub ids: IdRange,
    pub created_at_ms: i64,
    /// Its cgroup directories, as made (the node's subtree may be named
    /// otherwise by a later start).
    pub cgroup: SandboxCgroup,
    /// The memory limit, for the reason an OOM-killed turn gives.
    pub memory_max: Option<u64>,
    /// The agents' seccomp policy (protobuf, hex), given to every agent
    /// started in the sandbox; absent for the default filter.
    pub seccomp: Option<String>,
    /// Hibernated: its processes are frozen.
    pub frozen: bool,
    /// Its secrets and the ports their proxies listen on in its namespace
    /// (its agents were told them): a restarted node serves them again.
    /// References only, never values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<RecordedSecret>,
}

/// One secret of a sandbox, as its record keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecordedSecret {
    pub name: String,
    pub upstream: String,
    pub header: String,
    pub scheme: Option<String>,
    pub env: String,
    pub port: u16,
}

impl RecordedSecret {
    /// `refs` with the ports their proxies got, in the same order.
    pub fn of(refs: &[agentd_plan::SecretRef], ports: &[u16]) -> Vec<RecordedSecret> {
        refs.iter()
            .zip(ports)
            .map(|(r, port)| RecordedSecret {
                name: r.name.clone(),
                upstream: r.upstream.to_string(),
                header: r.header.clone(),
                scheme: r.scheme.clone(),
                env: r.env.clone(),
                port: *port,
            })
            .collect()
    }

    /// The references and ports back, checked as a plan's are (the file
    /// could have been edited).
    pub fn refs(recorded: &[RecordedSecret]) -> Result<(Vec<agentd_plan::SecretRef>, Vec<u16>), agentd_plan::SecretError> {
        let refs = recorded
            .iter()
            .enumerate()
            .map(|(i, s)| agentd_plan::SecretRef::new(&format!("secrets[{i}]"), &s.name, &s.upstream, &s.header, s.scheme.as_deref(), &s.env))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((refs, recorded.iter().map(|s| s.port).collect()))
    }
}

/// What cleaning up after a sandbox needs, readable from records of every
/// version.
#[derive(Debug, Clone, Deserialize)]
pub struct Leftover {
    pub id: String,
    pub pid: i32,
    pub ids: IdRange,
    #[serde(default)]
    pub pid_start: u64,
}

impl Record {
    pub fn seccomp_policy(&self) -> Result<Option<SeccompPolicy>, String> {
        let Some(text) = &self.seccomp else { return Ok(None) };
        let bytes = hex::decode(text).map_err(|e| format!("seccomp policy: {e}"))?;
        SeccompPolicy::decode(bytes.as_slice()).map(Some).map_err(|e| format!("seccomp policy: {e}"))
    }

    pub fn encode_seccomp(policy: Option<&SeccompPolicy>) -> Option<String> {
        policy.map(|p| hex::encode(p.encode_to_vec()))
    }

    pub fn leftover(&self) -> Leftover {
        Leftover { id: self.id.clone(), pid: self.pid, ids: self.ids, pid_start: self.pid_start }
    }

    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        crate::state_file::write_atomic_for_this_boot(&dir.join("sandbox.json"), &serde_json::to_vec_pretty(self).expect("a record serializes"))
    }
}

/// A sandbox directory's record as found at start.
pub enum Found {
    /// Whole and of this version.
    Record(Box<Record>),
    /// Readable enough to clean up after (an older version), with why it
    /// cannot be taken back.
    Leftover(Leftover, String),
    /// None yet: a create that had not finished (the record is written,
    /// whole, before a create answers), which the control plane retries.
    Missing,
    /// Unreadable, cut short or not JSON: only the directory's name is known.
    Unreadable(String),
}

/// Reads `<dir>/sandbox.json`.
pub fn read(dir: &Path) -> Found {
    let bytes = match std::fs::read(dir.join("sandbox.json")) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Found::Missing,
        Err(e) => return Found::Unreadable(format!("sandbox.json: {e}")),
    };
    match serde_json::from_slice::<Record>(&bytes) {
        Ok(r) if r.version == VERSION => Found::Record(Box::new(r)),
        Ok(r) => Found::Leftover(r.leftover(), format!("sandbox.json is of version {}, not {VERSION}", r.version)),
        Err(full) => match serde_json::from_slice::<Leftover>(&bytes) {
            Ok(l) => Found::Leftover(l, format!("sandbox.json lacks what a restart needs ({full})")),
            Err(_) => Found::Unreadable(format!("sandbox.json is not a sandbox record: {full}")),
        },
    }
}

/// The start time of `pid` (field 22 of `/proc/<pid>/stat`), if it runs.
pub fn start_time(proc_root: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'. Field 3 is the first after it.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// This boot of the host.
pub fn boot_id(proc_root: &Path) -> String {
    std::fs::read_to_string(proc_root.join("sys/kernel/random/boot_id")).map(|s| s.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_its_start_time() {
        let proc_root = Path::new("/proc");
        let me = std::process::id() as i32;
        let start = start_time(proc_root, me).expect("we run");
        assert_eq!(start_time(proc_root, me), Some(start), "stable");
        assert_eq!(start_time(proc_root, i32::MAX), None);
        assert!(!boot_id(proc_root).is_empty());
    }

    #[test]
    fn records_of_other_shapes_are_leftovers_or_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("sandbox.json"), r#"{"id":"ctr_1","pid":42,"slot":0,"ids":{"host_base":1000000,"size":65536},"created_at_ms":1}"#).unwrap();
        assert!(matches!(read(dir.path()), Found::Leftover(l, _) if l.id == "ctr_1" && l.pid == 42));
        std::fs::write(dir.path().join("sandbox.json"), r#"{"id":"ctr_1","pid":4"#).unwrap();
        assert!(matches!(read(dir.path()), Found::Unreadable(_)));
        std::fs::remove_file(dir.path().join("sandbox.json")).unwrap();
        assert!(matches!(read(dir.path()), Found::Missing));
    }
}
