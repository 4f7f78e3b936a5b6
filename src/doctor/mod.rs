//! `agentd doctor`: checks of this host for what agentd needs, each a row
//! of check, status, what was found and, where not ok, a remedy.
//!
//! A `fail` means a sandbox cannot be built here (or `agentd up` would not
//! start); a `warn` means agentd runs but loses something (a limit, speed,
//! isolation from other users of its ids). The checks look, or try things
//! in throwaway children (a user namespace, a cgroup), and put back what
//! they touch; each is bounded in time.
//!
//! One module per concern: [`kernel`], [`userns`], [`cgroups`], [`ids`],
//! [`syscalls`] (seccomp, pidfd_open, clone3, overlayfs), [`binary`] (the
//! static `agentd`), [`state_dir`], [`database`].

pub mod binary;
pub mod cgroups;
pub mod database;
pub mod ids;
pub mod kernel;
pub mod state_dir;
pub mod syscalls;
pub mod userns;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// A stable name (`kernel`, `cgroup.memory`, ...), for people and scripts.
    pub check: String,
    pub status: Status,
    pub found: String,
    /// What to do about it; `None` when ok.
    pub remedy: Option<String>,
}

impl Row {
    pub fn ok(check: impl Into<String>, found: impl Into<String>) -> Row {
        Row { check: check.into(), status: Status::Ok, found: found.into(), remedy: None }
    }

    pub fn warn(check: impl Into<String>, found: impl Into<String>, remedy: impl Into<String>) -> Row {
        Row { check: check.into(), status: Status::Warn, found: found.into(), remedy: Some(remedy.into()) }
    }

    pub fn fail(check: impl Into<String>, found: impl Into<String>, remedy: impl Into<String>) -> Row {
        Row { check: check.into(), status: Status::Fail, found: found.into(), remedy: Some(remedy.into()) }
    }
}

/// What doctor checks against: `agentd up`'s settings, and where the host's
/// files are (parameters, so tests can point them elsewhere).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Which config file was read, if any.
    pub config: Option<crate::config::Loaded>,
    pub state_dir: PathBuf,
    pub ids: ids::IdSettings,
    pub database_url: Option<String>,
    pub sandbox_bin: PathBuf,
    pub proc: PathBuf,
    pub etc: PathBuf,
    pub cgroup_root: PathBuf,
    /// The bound on the database connect.
    pub database_timeout: Duration,
}

/// Runs every check, in the order the table shows them.
pub fn run(s: &Settings) -> Vec<Row> {
    let mut rows = vec![config_row(s)];
    rows.push(kernel::check(&s.proc));
    rows.push(userns::privileged(s.ids.base, s.ids.range_size));
    let is_root = nix::unistd::geteuid().is_root();
    rows.push(userns::unprivileged(&userns::Knobs::read(&s.proc), s.ids.max_sandboxes, is_root));
    match std::fs::read_to_string(s.proc.join("self/cgroup")) {
        Ok(text) => rows.extend(cgroups::check(&s.cgroup_root, &text, std::process::id())),
        Err(e) => rows.push(Row::fail("cgroup.mode", format!("cannot read /proc/self/cgroup: {e}"), "mount /proc")),
    }
    rows.push(ids::check(&s.etc, &s.proc, s.ids));
    rows.push(syscalls::overlayfs(&s.proc));
    rows.push(syscalls::seccomp(&s.proc));
    rows.push(syscalls::pidfd_open());
    rows.push(syscalls::clone3());
    rows.push(binary::check(&s.sandbox_bin));
    rows.push(state_dir::check(&s.state_dir));
    rows.push(database::check(s.database_url.as_deref(), &s.state_dir, s.database_timeout));
    rows
}

fn config_row(s: &Settings) -> Row {
    match &s.config {
        Some(loaded) => Row::ok("config", format!("{}: {} keys, valid", loaded.path.display(), loaded.keys)),
        None => Row::ok("config", format!("no {}: built-in defaults, environment and flags", crate::config::DEFAULT_PATH)),
    }
}

/// Whether a sandbox can be built here: no row failed.
pub fn passed(rows: &[Row]) -> bool {
    rows.iter().all(|r| r.status != Status::Fail)
}

/// The rows as a table, each remedy on a line of its own under its row,
/// and a count at the end.
pub fn table(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(0).max("CHECK".len());
    let mut out = String::new();
    let _ = writeln!(out, "{:width$}  {:6}  FOUND", "CHECK", "STATUS");
    for row in rows {
        let _ = writeln!(out, "{:width$}  {:6}  {}", row.check, row.status.label(), row.found);
        if let Some(remedy) = row.remedy.as_ref().filter(|_| row.status != Status::Ok) {
            let _ = writeln!(out, "{:width$}  {:6}  -> {remedy}", "", "");
        }
    }
    let count = |s: Status| rows.iter().filter(|r| r.status == s).count();
    let _ = writeln!(out, "\n{} ok, {} warn, {} FAIL", count(Status::Ok), count(Status::Warn), count(Status::Fail));
    out
}

/// The rows as one JSON document: `{"ok": bool, "checks": [...]}`.
pub fn json(rows: &[Row]) -> String {
    serde_json::json!({ "ok": passed(rows), "checks": rows }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_remedies_under_their_rows() {
        let rows = [Row::ok("kernel", "6.8"), Row::warn("state-dir", "/x: mode 0755", "chmod 700 /x"), Row::fail("database", "no", "start it")];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "CHECK      STATUS  FOUND");
        assert_eq!(lines[1], "kernel     ok      6.8");
        assert_eq!(lines[2], "state-dir  warn    /x: mode 0755");
        assert_eq!(lines[3], "                   -> chmod 700 /x");
        assert_eq!(lines[4], "database   FAIL    no");
        assert!(text.ends_with("1 ok, 1 warn, 1 FAIL\n"));
        assert!(!passed(&rows));
        let doc: serde_json::Value = serde_json::from_str(&json(&rows)).unwrap();
        assert_eq!(doc["ok"], false);
        assert_eq!(doc["checks"][1]["status"], "warn");
        assert_eq!(doc["checks"][1]["remedy"], "chmod 700 /x");
        assert_eq!(doc["checks"][0]["remedy"], serde_json::Value::Null);
    }
}
