//! Host-side views of processes through /proc.

use std::path::Path;

/// The namespace inode link (e.g. `pid:[4026531836]`) of `kind` for `pid`.
pub fn namespace(pid: u32, kind: &str) -> std::io::Result<String> {
    Ok(std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))?.to_string_lossy().into_owned())
}

/// The direct children of `pid` (all its threads' children).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// The environment of `pid` as `NAME=value` strings.
pub fn environ(pid: u32) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

/// A field of /proc/<pid>/status, such as `Uid` or `NSpid`.
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().to_string()))
}

pub fn is_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; it counts as gone.
    status_field(pid, "State").is_some_and(|s| !s.starts_with('Z'))
}

pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether any mount in this process's mount table mentions `needle`.
pub fn mounts_mention(needle: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").map(|m| m.contains(needle)).unwrap_or(false)
}
