//! `agentd doctor` on this host, and `agentd config check`, run as an
//! operator runs them: the `agentd` binary, its output and exit code.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::agentd_bin;
use crate::support::host::cgroup_dirs;

/// Every check doctor runs on a hybrid or v1 host such as this one (pure v2
/// hosts add `cgroup.delegation`).
const ROWS: &[&str] = &[
    "config",
    "kernel",
    "userns",
    "userns.unprivileged",
    "cgroup.mode",
    "cgroup.memory",
    "cgroup.pids",
    "cgroup.cpu",
    "cgroup.freezer",
    "cgroup.kill",
    "id-ranges",
    "overlayfs",
    "seccomp",
    "pidfd_open",
    "clone3",
    "sandbox-binary",
    "state-dir",
    "database",
];

/// `agentd <args>` with `env`, its environment otherwise cleared of
/// agentd's variables (a developer's shell may set some) and the packaged
/// config file as its config: flags given here override it.
fn agentd(args: &[&str], env: &[(&str, &str)]) -> Output {
    agentd_pid(args, env).0
}

/// [`agentd`], and the pid it ran as (agentd-daemon's too: agentd execs it).
fn agentd_pid(args: &[&str], env: &[(&str, &str)]) -> (Output, u32) {
    let mut cmd = Command::new(agentd_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AGENTD_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("AGENTD_CONFIG", concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/agentd.toml"))
        .env("RUST_BACKTRACE", "1")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("run agentd");
    let pid = child.id();
    (child.wait_with_output().expect("wait for agentd"), pid)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `agentd doctor --json` with `args`, parsed; and its exit status.
fn doctor_json(args: &[&str], env: &[(&str, &str)]) -> (Value, bool) {
    let out = agentd(&[&["doctor", "--json"], args].concat(), env);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", text(&out.stdout), text(&out.stderr)));
    (doc, out.status.success())
}

fn row<'a>(doc: &'a Value, check: &str) -> &'a Value {
    doc["checks"].as_array().unwrap().iter().find(|r| r["check"] == check).unwrap_or_else(|| panic!("no {check} row: {doc}"))
}

#[test]
fn doctor_passes_on_this_host_and_prints_its_table() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    // As `agentd up` makes it (tempfile leaves it to the umask).
    std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let state_arg = state.path().to_str().unwrap();
    let (out, pid) = agentd_pid(&["doctor", "--state-dir", state_arg], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "doctor failed here:\n{stdout}\n{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("CHECK") && lines[0].contains("STATUS") && lines[0].contains("FOUND"), "{stdout}");
    for check in ROWS {
        let line = lines.iter().find(|l| l.split_whitespace().next() == Some(*check)).unwrap_or_else(|| panic!("no {check} row:\n{stdout}"));
        let status = line.split_whitespace().nth(1).unwrap();
        assert!(status == "ok" || status == "warn", "{line}");
    }
    assert!(!lines.iter().any(|l| l.split_whitespace().nth(1) == Some("FAIL")), "{stdout}");
    assert!(lines.last().unwrap().ends_with(" 0 FAIL"), "{stdout}");
    // The config file was read, and the flag won over its state_dir.
    assert!(stdout.contains("packaging/agentd.toml: 16 keys, valid"), "{stdout}");
    let state_line = lines.iter().find(|l| l.starts_with("state-dir ")).unwrap();
    assert_eq!(state_line.split_whitespace().nth(1), Some("ok"), "{state_line}");
    assert!(state_line.ends_with(&format!("{state_arg}: owner root, mode 0700")), "{state_line}");
    // Its throwaway cgroups and the store: none left, none made.
    let probes = cgroup_dirs(&format!("agentd-doctor-{pid}"));
    assert!(probes.is_empty(), "{probes:?}");
    assert!(std::fs::read_dir(state.path()).unwrap().next().is_none(), "doctor wrote into the state dir");
}

#[test]
fn doctor_json_has_every_row() {
    let state = tempfile::tempdir().unwrap();
    let (doc, passed) = doctor_json(&["--state-dir", state.path().to_str().unwrap()], &[]);
    assert!(passed, "{doc:#}");
    assert_eq!(doc["ok"], true);
    for check in ROWS {
        let row = row(&doc, check);
        assert!(row["found"].as_str().is_some_and(|f| !f.is_empty()), "{row}");
        match row["status"].as_str().unwrap() {
            "ok" => assert!(row["remedy"].is_null(), "{row}"),
            "warn" => assert!(row["remedy"].as_str().is_some_and(|r| !r.is_empty()), "{row}"),
            other => panic!("{check} is {other}: {row}"),
        }
    }
}

#[test]
fn a_state_dir_others_may_read_is_a_warning_with_its_remedy() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (doc, passed) = doctor_json(&["--state-dir", state.to_str().unwrap()], &[]);
    assert!(passed, "a warning alone passes: {doc:#}");
    let row = row(&doc, "state-dir");
    assert_eq!(row["status"], "warn", "{row}");
    assert!(row["found"].as_str().unwrap().contains("mode 0755"), "{row}");
    assert_eq!(row["remedy"], format!("chmod 700 {}", state.display()));

    let out = agentd(&["doctor", "--state-dir", state.to_str().unwrap()], &[]);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines.iter().position(|l| l.starts_with("state-dir ")).unwrap();
    assert!(lines[at].contains(" warn "), "{stdout}");
    assert!(lines[at + 1].trim_start().starts_with(&format!("-> chmod 700 {}", state.display())), "the remedy follows its row:\n{stdout}");
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o777, 0o755, "doctor changes nothing");
}

#[test]
fn an_unreachable_database_fails_without_showing_its_password() {
    // A port just bound and released: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tmp = tempfile::tempdir().unwrap();
    // The URL comes from a config file, as an installed agentd reads it.
    let config = tmp.path().join("agentd.toml");
    std::fs::write(
        &config,
        format!("state_dir = \"{}\"\ndatabase_url = \"postgres://agentd:hunter2-secret@127.0.0.1:{port}/agentd\"\n", tmp.path().display()),
    )
    .unwrap();
    let started = Instant::now();
    let out = agentd(&["doctor"], &[("AGENTD_CONFIG", config.to_str().unwrap())]);
    assert!(started.elapsed() < Duration::from_secs(10), "doctor took {:?}", started.elapsed());
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let line = stdout.lines().find(|l| l.starts_with("database ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains(" FAIL ") && line.contains(&format!("postgres://agentd:***@127.0.0.1:{port}/agentd")), "{line}");
    assert!(!stdout.contains("hunter2") && !stderr.contains("hunter2"), "{stdout}\n{stderr}");
    let (doc, passed) = doctor_json(&[], &[("AGENTD_CONFIG", config.to_str().unwrap())]);
    assert!(!passed);
    assert_eq!(doc["ok"], false);
    assert_eq!(row(&doc, "database")["status"], "fail");
    assert!(!doc.to_string().contains("hunter2"));
}

/// A config file with three problems, on lines 3, 4 and 6.
const BAD: &str = "# agentd\nlisten = \"127.0.0.1:8080\"\nid_base = -5\nlisten_addr = \"0.0.0.0:80\"\nlog_json = true\nstop_grace_ms = \"2s\"\n";

fn bad_config(dir: &Path) -> String {
    let path = dir.join("agentd.toml");
    std::fs::write(&path, BAD).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn config_check_names_each_bad_key_with_its_line() {
    let tmp = tempfile::tempdir().unwrap();
    let path = bad_config(tmp.path());
    let out = agentd(&["config", "check", &path], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "one line per problem, no backtrace: {stderr}");
    assert!(lines[0].starts_with(&format!("config {path}:3:11: id_base must be an integer")), "{stderr}");
    assert!(lines[1].starts_with(&format!("config {path}:4:1: unknown key \"listen_addr\"")), "{stderr}");
    assert!(lines[2].starts_with(&format!("config {path}:6:17: stop_grace_ms must be an integer")), "{stderr}");

    // Without a FILE: AGENTD_CONFIG's (here the packaged one), which passes.
    let out = agentd(&["config", "check"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("ok: 16 keys"), "{}", text(&out.stdout));
}

#[test]
fn up_refuses_a_bad_config_with_the_same_one_line_message() {
    let tmp = tempfile::tempdir().unwrap();
    let path = bad_config(tmp.path());
    let state = tmp.path().join("state");
    let out = agentd(&["up", "--state-dir", state.to_str().unwrap()], &[("AGENTD_CONFIG", &path)]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line, though RUST_BACKTRACE=1: {stderr}");
    assert!(stderr.starts_with(&format!("agentd: config {path}:3:11: id_base must be an integer")), "{stderr}");
    assert!(stderr.contains("(and 2 more: `agentd config check` lists them)"), "{stderr}");
    assert!(!state.exists(), "nothing started");
}

#[test]
fn a_reachable_postgres_is_connected_to_and_left_unmigrated() {
    let pg = agentd_testkit::postgres::TempPostgres::start().expect("start a throwaway PostgreSQL");
    let state = tempfile::tempdir().unwrap();
    let (doc, _) = doctor_json(&["--state-dir", state.path().to_str().unwrap(), "--database-url", &pg.url()], &[]);
    let row = row(&doc, "database");
    assert_eq!(row["status"], "ok", "{row}");
    assert!(row["found"].as_str().unwrap().contains("connected, server"), "{row}");
    // Doctor asks the server its version; creating the schema is `up`'s job.
    let out = Command::new(agentd_testkit::postgres::pg_bin("psql").expect("psql"))
        .args([&pg.url(), "-Atc", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "0", "{}", text(&out.stderr));
}
