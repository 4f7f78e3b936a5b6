//! The host ids the node hands its sandboxes (`--id-base` onwards,
//! `--id-range-size` per sandbox, `--max-sandboxes` of them): valid, and
//! clear of subordinate ids given to users (`/etc/subuid`, `/etc/subgid`),
//! of `agentd sandbox run`'s own ranges, and of running processes. A
//! process sharing a host uid with a sandbox could signal, trace and write
//! its processes and files.

use std::ops::Range;
use std::path::Path;

use super::Row;

const NAME: &str = "id-ranges";

/// The settings, as `agentd up` takes them.
#[derive(Debug, Clone, Copy)]
pub struct IdSettings {
    pub base: u32,
    pub range_size: u32,
    pub max_sandboxes: u32,
}

pub fn check(etc: &Path, proc: &Path, ids: IdSettings) -> Row {
    let remedy = "choose --id-base, --id-range-size and --max-sandboxes (id_base, id_range_size, max_sandboxes in the config) clear of them";
    if ids.base == 0 {
        return Row::fail(NAME, "--id-base 0 would map sandbox root to host root", "set --id-base to 1000000, above the host's users");
    }
    if ids.range_size == 0 || ids.max_sandboxes == 0 {
        return Row::fail(NAME, "--id-range-size and --max-sandboxes must be positive", "set both above 0 (65536 and 1000 by default)");
    }
    let end = u64::from(ids.base) + u64::from(ids.range_size) * u64::from(ids.max_sandboxes);
    if end > u64::from(u32::MAX) {
        return Row::fail(NAME, format!("{}..{end} runs past the 32-bit id space", ids.base), "lower --id-base, --id-range-size or --max-sandboxes");
    }
    let range = u64::from(ids.base)..end;
    let shown = format!("{}..{end} ({} x {})", ids.base, ids.max_sandboxes, ids.range_size);
    let mut conflicts = Vec::new();
    for file in ["subuid", "subgid"] {
        if let Ok(text) = std::fs::read_to_string(etc.join(file)) {
            conflicts.extend(subid_conflicts(&text, &range).into_iter().map(|c| format!("/etc/{file} gives {c}")));
        }
    }
    let run_first = u64::from(agentd_sandbox::FIRST_ID);
    if range.end > run_first {
        conflicts.push(format!("`agentd sandbox run` takes ids from {run_first} up"));
    }
    let users = process_uids(proc, &range);
    if !users.is_empty() {
        let some: Vec<String> = users.iter().take(5).map(|(pid, uid)| format!("pid {pid} uid {uid}")).collect();
        conflicts.push(format!(
            "{} running process(es) have uids in it ({}): another agentd's sandboxes, or someone else",
            users.len(),
            some.join(", ")
        ));
    }
    if conflicts.is_empty() {
        Row::ok(NAME, format!("{shown}: clear of /etc/subuid, /etc/subgid and running processes"))
    } else {
        Row::warn(NAME, format!("{shown}: {}", conflicts.join("; ")), remedy)
    }
}

/// The entries of a `/etc/subuid`-style text (`name:first:count`) that
/// overlap `range`, as "name first..end".
pub fn subid_conflicts(text: &str, range: &Range<u64>) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let mut parts = line.split(':');
            let (name, first, count) = (parts.next()?, parts.next()?.parse::<u64>().ok()?, parts.next()?.parse::<u64>().ok()?);
            let theirs = first..first + count;
            (theirs.start < range.end && range.start < theirs.end).then(|| format!("{name} {}..{}", theirs.start, theirs.end))
        })
        .collect()
}

/// Processes (pid, uid) any of whose real, effective, saved or file-system
/// uids fall in `range`, from the `Uid:` lines of `<proc>/*/status`.
pub fn process_uids(proc: &Path, range: &Range<u64>) -> Vec<(u32, u64)> {
    let Ok(entries) = std::fs::read_dir(proc) else { return Vec::new() };
    let mut found: Vec<(u32, u64)> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            // A process may exit between the listing and the read.
            let status = std::fs::read_to_string(proc.join(pid.to_string()).join("status")).ok()?;
            let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            let uid = uids.split_whitespace().filter_map(|u| u.parse::<u64>().ok()).find(|u| range.contains(u))?;
            Some((pid, uid))
        })
        .collect();
    found.sort_unstable();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    const IDS: IdSettings = IdSettings { base: 1_000_000, range_size: 65536, max_sandboxes: 10 };

    fn fake_proc(procs: &[(u32, &str)]) -> tempfile::TempDir {
        let proc = tempfile::tempdir().unwrap();
        for (pid, uids) in procs {
            std::fs::create_dir(proc.path().join(pid.to_string())).unwrap();
            std::fs::write(proc.path().join(format!("{pid}/status")), format!("Name:\tx\nUid:\t{uids}\nGid:\t0\t0\t0\t0\n")).unwrap();
        }
        std::fs::create_dir(proc.path().join("sys")).unwrap();
        proc
    }

    #[test]
    fn finds_overlapping_subordinate_ids() {
        let text = "alice:100000:65536\n# comment\nbob:1600000:65536\n1001:1655360:100\nbad line\n";
        let range = 1_000_000..1_655_360;
        assert_eq!(subid_conflicts(text, &range), ["bob 1600000..1665536"], "1655360 is the first id past the range");
    }

    #[test]
    fn finds_processes_by_any_of_their_uids() {
        let proc = fake_proc(&[(1, "0\t0\t0\t0"), (20, "1000005\t1000005\t1000005\t1000005"), (30, "1000\t1000070\t1000\t1000")]);
        assert_eq!(process_uids(proc.path(), &(1_000_000..1_655_360)), [(20, 1_000_005), (30, 1_000_070)]);
    }

    #[test]
    fn judges_the_settings() {
        let etc = tempfile::tempdir().unwrap();
        let proc = fake_proc(&[(1, "0\t0\t0\t0")]);
        let row = check(etc.path(), proc.path(), IDS);
        assert_eq!(row.status, Status::Ok, "{row:?}");
        assert!(row.found.starts_with("1000000..1655360 (10 x 65536)"), "{}", row.found);

        std::fs::write(etc.path().join("subgid"), "carol:1010000:1000\n").unwrap();
        let row = check(etc.path(), proc.path(), IDS);
        assert_eq!(row.status, Status::Warn);
        assert!(row.found.contains("/etc/subgid gives carol 1010000..1011000"), "{}", row.found);
        assert!(row.remedy.unwrap().contains("--id-base"));

        let busy = fake_proc(&[(77, "1000001\t1000001\t1000001\t1000001")]);
        let row = check(tempfile::tempdir().unwrap().path(), busy.path(), IDS);
        assert!(row.status == Status::Warn && row.found.contains("pid 77 uid 1000001"), "{row:?}");

        let high = IdSettings { base: 999_990_000, ..IDS };
        assert!(check(proc.path(), proc.path(), high).found.contains("agentd sandbox run"));
        for bad in [IdSettings { base: 0, ..IDS }, IdSettings { range_size: 0, ..IDS }, IdSettings { max_sandboxes: u32::MAX, ..IDS }] {
            assert_eq!(check(etc.path(), proc.path(), bad).status, Status::Fail, "{bad:?}");
        }
    }
}
