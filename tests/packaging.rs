//! The packages and units as an operator gets them: `systemd-analyze verify`
//! on each unit; a session under the node units' hardening (emulated:
//! systemd is not PID 1 here) and the reason two protections are left out;
//! the .rpm's files, scriptlets and an install into a scratch root; the
//! .deb's files and maintainer scripts, and its install, a session, an
//! upgrade with a turn streaming through it, remove and purge in a minimal
//! Debian root made by debootstrap.
//!
//! The packages come from `scripts/package` (run once by `scripts/test`,
//! into `AGENTD_PACKAGES`, default `<target>/packages`); the Debian root
//! from a cache, `<target>/debootstrap-bookworm.tar`, made on first use
//! (`scripts/debian-root`).
//! The tools are installed by `scripts/install-test-deps`. Without
//! packages or tools a test is skipped loudly, or fails when
//! `AGENTD_REQUIRE_PACKAGING=1` (as `scripts/test` sets it).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::host::{become_subreaper, reap_orphans};
use crate::support::{Agentd, SseEvent, agentd_bin, echo_agent, procfs, said, session_body, turn};

const UNITS: [&str; 3] = ["agentd.service", "agentd-server.service", "agentd-node.service"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/ (agentd is target/<profile>/agentd).
fn target_dir() -> PathBuf {
    agentd_bin().parent().and_then(Path::parent).expect("the target directory").to_owned()
}

/// A scratch directory under the target directory's tmp (not /tmp: the
/// hardening test gives agentd a /tmp of its own).
fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Skips (loudly) or fails, as `AGENTD_REQUIRE_PACKAGING` says.
fn missing(what: &str) {
    let message = format!("{what}; scripts/test installs and builds everything these tests need");
    if std::env::var("AGENTD_REQUIRE_PACKAGING").is_ok_and(|v| v == "1") {
        panic!("{message}");
    }
    eprintln!("\n********** SKIPPED: {message} **********\n");
}

fn tool(name: &str) -> bool {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().is_ok_and(|o| o.status.success());
    if !found {
        missing(&format!("{name} is not installed (scripts/install-test-deps installs it)"));
    }
    found
}

fn package(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("AGENTD_PACKAGES").map(PathBuf::from).unwrap_or_else(|| target_dir().join("packages"));
    let path = dir.join(name);
    if path.is_file() {
        Some(path)
    } else {
        missing(&format!("{} is missing (scripts/package builds it)", path.display()));
        None
    }
}

/// Runs `cmd`; it must succeed. Its output.
fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o7777
}

/// `systemd-analyze verify` on each unit, in a root holding the host's own
/// units (the targets ours name) and the real agentd at /usr/bin/agentd
/// (verify checks ExecStart=). It exits 0 on unknown keys and bad values,
/// printing them, so the check is "no output at all".
#[test]
fn each_unit_passes_systemd_analyze_verify() {
    if !tool("systemd-analyze") {
        return;
    }
    let root = scratch("agentd-units-");
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
    std::fs::create_dir_all(units.parent().unwrap()).unwrap();
    run(Command::new("cp").arg("-a").arg("/usr/lib/systemd/system").arg(&units));
    std::fs::copy(agentd_bin(), root.path().join("usr/bin/agentd")).unwrap();
    let verify = |unit: &str| {
        let out = Command::new("systemd-analyze").arg("verify").arg(format!("--root={}", root.path().display())).arg("--man=no").arg(unit).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    for unit in UNITS {
        std::fs::copy(repo().join("packaging/systemd").join(unit), units.join(unit)).unwrap();
        let (ok, said) = verify(unit);
        assert!(ok && said.trim().is_empty(), "systemd-analyze verify {unit}:\n{said}");
    }
    // The check sees what it must: a unit with a bad value and an unknown key.
    let broken = std::fs::read_to_string(units.join("agentd.service")).unwrap().replace("ProtectHome=read-only", "ProtectHome=sometimes\nProtectNothing=yes");
    std::fs::write(units.join("agentd-broken.service"), broken).unwrap();
    let (_, said) = verify("agentd-broken.service");
    assert!(said.contains("sometimes") && said.contains("ProtectNothing"), "{said}");
}

/// A unit's `Key=value` lines (comments and sections dropped); a key given
/// twice keeps both values.
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(repo().join("packaging/systemd").join(unit)).unwrap();
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '['])) {
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{unit}: not a setting: {line}"));
        settings.entry(key.trim().to_string()).or_default().push(value.trim().to_string());
    }
    settings
}

fn setting<'a>(settings: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    settings.get(key).and_then(|v| v.last()).map(String::as_str).unwrap_or_else(|| panic!("the unit has no {key}="))
}

/// What the units that run sandboxes share, and what the emulation below
/// stands for. A change to one of these lines needs the emulation changed
/// with it.
#[test]
fn the_sandbox_units_take_only_the_hardening_sandboxes_survive() {
    let up = unit_settings("agentd.service");
    let node = unit_settings("agentd-node.service");
    for (name, unit) in [("agentd.service", &up), ("agentd-node.service", &node)] {
        for (key, value) in [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("Delegate", "yes"),
            ("KillMode", "process"),
            ("ProtectSystem", "full"),
            ("ProtectHome", "read-only"),
            ("PrivateTmp", "yes"),
            ("ProtectKernelModules", "yes"),
            ("NoNewPrivileges", "yes"),
            ("StateDirectory", "agentd"),
            ("StateDirectoryMode", "0700"),
            ("RuntimeDirectory", "agentd"),
            ("ConfigurationDirectory", "agentd"),
            ("Environment", "AGENTD_CONFIG=/etc/agentd/agentd.toml"),
            ("Restart", "on-failure"),
        ] {
            assert_eq!(setting(unit, key), value, "{name}: {key}");
        }
        assert!(unit.contains_key("WatchdogSec") && unit.contains_key("LimitNOFILE"), "{name}");
        // Each of these breaks sandboxes (see the units' comments and the
        // test below).
        for key in ["UMask", "ProtectKernelTunables", "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "ProtectHostname", "PrivateDevices", "ProtectProc", "ProcSubset", "MemoryDenyWriteExecute", "PrivateUsers"] {
            assert!(!unit.contains_key(key), "{name} sets {key}, which sandboxes do not survive");
        }
    }
    assert_eq!(setting(&up, "ExecStart"), "/usr/bin/agentd up");
    assert_eq!(setting(&node, "ExecStart"), "/usr/bin/agentd node");
    let server = unit_settings("agentd-server.service");
    assert_eq!(setting(&server, "ExecStart"), "/usr/bin/agentd server");
    for (key, value) in [("Type", "notify"), ("ProtectSystem", "strict"), ("ProtectControlGroups", "yes"), ("RestrictNamespaces", "yes"), ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"), ("NoNewPrivileges", "yes")] {
        assert_eq!(setting(&server, key), value, "agentd-server.service: {key}");
    }
}

/// `setpriv --bounding-set` spelling of a unit's CapabilityBoundingSet=.
fn bounding_set(settings: &BTreeMap<String, Vec<String>>) -> (String, u64) {
    let mut mask = 0u64;
    let mut names = vec!["-all".to_string()];
    for cap in setting(settings, "CapabilityBoundingSet").split_whitespace() {
        let name = cap.strip_prefix("CAP_").unwrap_or_else(|| panic!("{cap}")).to_lowercase();
        let bit = caps_bit(&name);
        mask |= 1 << bit;
        names.push(format!("+{name}"));
    }
    (names.join(","), mask)
}

/// Bit numbers of the capabilities the units name (linux/capability.h).
fn caps_bit(name: &str) -> u32 {
    match name {
        "chown" => 0,
        "dac_override" => 1,
        "dac_read_search" => 2,
        "fowner" => 3,
        "fsetid" => 4,
        "kill" => 5,
        "setgid" => 6,
        "setuid" => 7,
        "setpcap" => 8,
        "net_bind_service" => 10,
        "net_admin" => 12,
        "sys_chroot" => 18,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "mknod" => 27,
        other => panic!("add capability {other} to caps_bit"),
    }
}

/// The part of agentd.service's hardening that can be had without systemd,
/// applied as systemd applies it, in a mount namespace of agentd's own that
/// dies with it (the host's mounts are never touched): ProtectSystem=full
/// (/usr, /boot, /efi, /etc read-only), ProtectHome=read-only,
/// ProtectKernelModules= (the modules hidden), PrivateTmp=, the umask, then
/// NoNewPrivileges= and CapabilityBoundingSet= through setpriv. A session
/// must run in it. SystemCallFilter= and the rest of systemd's own doing are
/// checked by `systemd-analyze verify` only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_under_the_units_hardening() {
    if !tool("setpriv") || !tool("unshare") {
        return;
    }
    let unit = unit_settings("agentd.service");
    let (caps, mask) = bounding_set(&unit);
    let protect = r#"set -e
for d in /usr /boot /efi /etc; do if [ -d "$d" ]; then mount --bind -o ro "$d" "$d"; fi; done
for d in /home /root /run/user; do if [ -d "$d" ]; then mount --rbind "$d" "$d"; mount -o remount,bind,ro "$d"; fi; done
for d in $(realpath -e /usr/lib/modules /lib/modules 2>/dev/null | sort -u); do mount -t tmpfs -o ro,mode=000 tmpfs "$d"; done
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
umask "$UMASK"
exec setpriv --no-new-privs --bounding-set "$CAPS" --inh-caps=-all "$@""#;
    // In /run: not under the emulated protections (/tmp is replaced) and
    // short (sandbox sockets under it must fit a unix socket path).
    let state = tempfile::Builder::new().prefix("agentd-h-").tempdir_in("/run").unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "slave", "sh", "-c", protect, "sh"])
        .arg(agentd_bin())
        .args(["up", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state.path())
        .env("CAPS", &caps)
        // systemd's default: the units set none (0077 breaks sandboxes).
        .env("UMASK", unit.get("UMask").and_then(|v| v.last()).map(String::as_str).unwrap_or("0022"));
    let mut agentd = Agentd::start_command(cmd, state.path().to_owned(), Some(state), &[]).await;

    // The daemon runs as the unit would make it.
    let bounding = procfs::status_field(agentd.pid(), "CapBnd").expect("CapBnd");
    assert_eq!(u64::from_str_radix(bounding.trim(), 16).unwrap(), mask, "{caps}");
    assert_eq!(procfs::status_field(agentd.pid(), "NoNewPrivs").as_deref().map(str::trim), Some("1"));

    let (id, mut events) = agentd.create_streaming(&session_body(&[])).await;
    let (status, _) = agentd.prompt(&id, "hardened").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(said(&events.until_run_end().await), "hardened");
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{}", agentd.log());
    assert!(agentd.interrupt().success(), "{}", agentd.log());
}

/// Why the sandbox units leave ProtectKernelTunables= and ProtectKernelLogs=
/// out: each covers a part of /proc with a mount, and then the kernel
/// refuses the fresh /proc every sandbox mounts in its user namespace. Here
/// the same covering mounts, in a mount namespace of the command's own.
#[test]
fn a_covered_proc_stops_sandboxes_as_those_protections_would() {
    if !tool("unshare") {
        return;
    }
    let sandbox = |cover: &str| {
        Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "sh", "-c", &format!("set -e; {cover}; exec \"$@\""), "sh"])
            .arg(agentd_bin())
            .args(["sandbox", "run", "--", "true"])
            .output()
            .unwrap()
    };
    let plain = sandbox("true");
    assert!(plain.status.success(), "{}", String::from_utf8_lossy(&plain.stderr));
    // ProtectKernelTunables=: /proc/sys (and more) read-only.
    // ProtectKernelLogs=: /proc/kmsg made inaccessible.
    for cover in ["mount --bind -o ro /proc/sys /proc/sys", "mount --bind /dev/null /proc/kmsg"] {
        let out = sandbox(cover);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("mount /proc"), "{cover}: {}\n{stderr}", out.status);
    }
}

/// The .rpm: file list, modes, config flag, scriptlets; then installed into
/// a scratch root. `--noscripts` there: the scratch root has no shell to run
/// them in (rpm runs them chrooted); they are checked as text and for
/// syntax with `sh -n`, and the .deb test runs its maintainer scripts for
/// real.
#[test]
fn the_rpm_holds_binaries_units_and_config_and_installs_into_a_root() {
    let Some(rpm) = package("agentd.rpm") else { return };
    if !tool("rpm") {
        return;
    }
    let listing = stdout(Command::new("rpm").args(["-qp", "--queryformat", "[%{FILEMODES:perms} %{FILEFLAGS:fflags} %{FILENAMES}\n]"]).arg(&rpm));
    let files: BTreeMap<&str, (&str, &str)> = listing
        .lines()
        .map(|l| {
            let mut parts = l.split(' ');
            let (perms, flags, name) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            (name, (perms, flags))
        })
        .collect();
    assert_eq!(files.get("/usr/bin/agentd"), Some(&("-rwxr-xr-x", "")), "{listing}");
    assert_eq!(files.get("/usr/bin/agentd-daemon"), Some(&("-rwxr-xr-x", "")), "{listing}");
    for unit in UNITS {
        assert_eq!(files.get(format!("/usr/lib/systemd/system/{unit}").as_str()), Some(&("-rw-r--r--", "")), "{listing}");
    }
    // c: config, n: noreplace.
    assert_eq!(files.get("/etc/agentd/agentd.toml"), Some(&("-rw-r--r--", "cn")), "{listing}");
    let names = stdout(Command::new("rpm").arg("-qlp").arg(&rpm));
    for name in files.keys() {
        assert!(names.lines().any(|l| l == *name), "rpm -qlp lacks {name}:\n{names}");
    }
    assert_eq!(stdout(Command::new("rpm").arg("-qpc").arg(&rpm)).trim(), "/etc/agentd/agentd.toml");

    // `rpm -qp --scripts`: each scriptlet under a line "NAME scriptlet:" (or
    // "NAME scriptlet (using PROG):"); its comments dropped.
    let listing = stdout(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    let mut scripts: BTreeMap<String, String> = BTreeMap::new();
    let mut current = None;
    for line in listing.lines() {
        if let Some((name, _)) = line.split_once(" scriptlet:").or_else(|| line.split_once(" scriptlet (using ")) {
            current = Some(name.to_string());
        } else if line.trim_start().starts_with('#') {
            continue;
        } else if let Some(name) = &current {
            let text = scripts.entry(name.clone()).or_default();
            text.push_str(line);
            text.push('\n');
        }
    }
    let script = |name: &str| scripts.get(name).cloned().unwrap_or_else(|| panic!("no {name} scriptlet:\n{listing}"));
    let post = script("postinstall");
    assert!(post.contains("systemctl daemon-reload") && post.contains("try-restart agentd.service agentd-server.service agentd-node.service"), "{post}");
    assert!(!post.contains("enable") && !post.contains(" start "), "{post}");
    let preun = script("preuninstall");
    assert!(preun.contains("\"$1\" -eq 0") && preun.contains("disable --now agentd.service agentd-server.service agentd-node.service"), "{preun}");
    assert!(script("postuninstall").contains("systemctl daemon-reload"));
    for script in ["post.sh", "preun.sh", "postun.sh"] {
        run(Command::new("sh").arg("-n").arg(repo().join("packaging/rpm").join(script)));
    }

    let root = scratch("agentd-rpm-root-");
    run(Command::new("rpm").arg("--root").arg(root.path()).arg("--initdb"));
    run(Command::new("rpm").arg("--root").arg(root.path()).args(["--nodeps", "--noscripts", "-i"]).arg(&rpm));
    let mut expected = vec![("usr/bin/agentd".to_string(), 0o755), ("usr/bin/agentd-daemon".to_string(), 0o755), ("etc/agentd/agentd.toml".to_string(), 0o644)];
    expected.extend(UNITS.map(|u| (format!("usr/lib/systemd/system/{u}"), 0o644)));
    for (path, want) in expected {
        assert_eq!(mode(&root.path().join(&path)), want, "{path}");
    }
    assert_eq!(std::fs::read(root.path().join("etc/agentd/agentd.toml")).unwrap(), std::fs::read(repo().join("packaging/agentd.toml")).unwrap());
    let version = stdout(Command::new(root.path().join("usr/bin/agentd")).arg("--version"));
    assert_eq!(version.trim(), format!("agentd {}", env!("CARGO_PKG_VERSION")));
    run(Command::new("rpm").arg("--root").arg(root.path()).args(["--nodeps", "--noscripts", "-e", "agentd"]));
    assert!(!root.path().join("usr/bin/agentd").exists() && !root.path().join("etc/agentd/agentd.toml").exists());
}

/// The .deb's file list (`dpkg-deb -c`: path to mode string).
fn deb_files(deb: &Path) -> BTreeMap<String, String> {
    stdout(Command::new("dpkg-deb").arg("-c").arg(deb))
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields[5].trim_start_matches('.').to_string(), fields[0].to_string())
        })
        .collect()
}

/// The .deb's contents, control fields and maintainer scripts.
#[test]
fn the_deb_holds_binaries_units_config_and_maintainer_scripts() {
    let Some(deb) = package("agentd.deb") else { return };
    let files = deb_files(&deb);
    assert_eq!(files.get("/usr/bin/agentd").map(String::as_str), Some("-rwxr-xr-x"), "{files:?}");
    assert_eq!(files.get("/usr/bin/agentd-daemon").map(String::as_str), Some("-rwxr-xr-x"), "{files:?}");
    assert_eq!(files.get("/etc/agentd/agentd.toml").map(String::as_str), Some("-rw-r--r--"), "{files:?}");
    for unit in UNITS {
        assert_eq!(files.get(&format!("/usr/lib/systemd/system/{unit}")).map(String::as_str), Some("-rw-r--r--"), "{files:?}");
    }

    let fields = stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).args(["Package", "Version", "Architecture", "Depends"]));
    assert!(fields.contains("Package: agentd\n") && fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))), "{fields}");
    assert!(fields.contains("Depends: ") && fields.contains("libc6"), "{fields}");

    let control = scratch("agentd-deb-control-");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(control.path()));
    let read = |name: &str| std::fs::read_to_string(control.path().join(name)).unwrap_or_else(|e| panic!("control file {name}: {e}"));
    assert_eq!(read("conffiles").lines().collect::<Vec<_>>(), ["/etc/agentd/agentd.toml"]);
    for script in ["postinst", "prerm", "postrm"] {
        assert_eq!(mode(&control.path().join(script)), 0o755, "{script}");
        assert!(!read(script).contains("#DEBHELPER#"), "{script}: debhelper's snippets were not put in");
        run(Command::new("sh").arg("-n").arg(control.path().join(script)));
    }
    let postinst = read("postinst");
    let prerm = read("prerm");
    assert!(postinst.contains("if [ -d /run/systemd/system ]; then\n\t\tsystemctl --system daemon-reload"), "{postinst}");
    assert!(!postinst.contains("deb-systemd-invoke start"), "{postinst}");
    // Every enable sits under the was-enabled guard.
    let lines: Vec<&str> = postinst.lines().collect();
    for (i, line) in lines.iter().enumerate().filter(|(_, l)| l.contains("deb-systemd-helper enable")) {
        let guard = lines[..i].iter().rev().find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).unwrap();
        assert!(guard.contains("was-enabled"), "unguarded enable: {line}\n{postinst}");
    }
    assert!(prerm.contains("[ \"$1\" = remove ]"), "{prerm}");
    for unit in UNITS {
        // Enabled again only if the admin had enabled it; never started;
        // try-restarted on upgrade (a second argument: the old version).
        assert!(postinst.contains(&format!("deb-systemd-helper --quiet was-enabled {unit}")), "{postinst}");
        assert!(postinst.contains(&format!("if [ -n \"$2\" ]; then\n\t\t\tdeb-systemd-invoke try-restart {unit}")), "{postinst}");
        assert!(prerm.contains(&format!("deb-systemd-invoke stop {unit}")), "{prerm}");
    }
    let postrm = read("postrm");
    assert!(postrm.contains("deb-systemd-helper purge") && postrm.contains("rm -rf --one-file-system /var/lib/agentd"), "{postrm}");
}

/// A minimal Debian root (debootstrap's minbase) unpacked from the cache,
/// removed at the end unless something is still mounted in it.
struct DebianRoot {
    /// Taken out (and kept) by `drop` when something is still mounted in it.
    dir: Option<tempfile::TempDir>,
}

impl DebianRoot {
    /// The cache, made on first use by `scripts/debian-root` (which
    /// `scripts/test` runs before the tests: it downloads Debian's required
    /// packages, 30-60 s).
    fn cache() -> PathBuf {
        let tar = target_dir().join("debootstrap-bookworm.tar");
        if !tar.is_file() {
            let started = Instant::now();
            run(Command::new(repo().join("scripts/debian-root")).arg(&tar));
            eprintln!("debootstrap cache {} made in {:?}", tar.display(), started.elapsed());
        }
        tar
    }

    fn new() -> Self {
        let tar = Self::cache();
        let dir = scratch("agentd-debian-root-");
        run(Command::new("tar").arg("-C").arg(dir.path()).arg("-xf").arg(&tar));
        Self { dir: Some(dir) }
    }

    fn root(&self) -> &Path {
        self.dir.as_ref().expect("the root exists").path()
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.root().join(inside.trim_start_matches('/'))
    }

    /// `chroot ROOT args` with a plain environment.
    fn chroot(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(self.root()).args(args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin").env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// `args` run with the root as their `/`, as a daemon runs there: in a
    /// mount namespace of its own (slave: nothing goes back to the host, and
    /// every mount goes with the namespace's last process), with the host's
    /// /proc, /sys (its cgroup hierarchies with it) and /dev bound in, then
    /// pivot_root into it, as a container runtime does. Not chroot: the
    /// kernel refuses a new user namespace to a chrooted process (an escape
    /// guard: clone(CLONE_NEWUSER) fails with EPERM), so no sandbox could be
    /// built; after pivot_root the root is the namespace's own.
    fn mounted_root(&self, args: &[&str]) -> Command {
        let script = r#"set -e
mount --bind "$ROOT" "$ROOT"
mount --rbind /proc "$ROOT/proc"
mount --rbind /sys "$ROOT/sys"
mount --rbind /dev "$ROOT/dev"
cd "$ROOT"
pivot_root . .
umount -l .
cd /
exec "$@""#;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "slave", "sh", "-c", script, "sh"]).args(args).env("ROOT", self.root());
        cmd
    }

    fn mounted(&self) -> bool {
        procfs::mounts_mention(&self.root().display().to_string())
    }
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        // The mounts live in agentd's own mount namespace and go with it; a
        // root still mounted somewhere is left rather than emptied through
        // its mounts.
        if self.mounted() {
            let kept = self.dir.take().expect("the root exists").keep();
            eprintln!("{} is still mounted; left in place", kept.display());
        }
    }
}

/// An upgrade with a live session: a second build of the package (the same
/// binaries as the next version, by `dpkg-deb -R` and `-b`) is installed
/// while a turn streams, and the daemon restarted as the postinst's
/// try-restart has systemd do it (systemd is not PID 1 here): the unit's
/// `KillMode=process` stop signals agentd alone, then the new binary starts.
/// With the packaged config's `live_restore` the sandbox, its agent and the
/// turn run on: the same PID 1, the stream resumed from Last-Event-ID with
/// nothing missed or repeated, and a new turn answers.
async fn upgrade_with_a_live_session(root: &DebianRoot, agentd: &mut Agentd, id: &str) {
    let next = format!("{}-2", env!("CARGO_PKG_VERSION"));
    run(&mut root.chroot(&["dpkg-deb", "-R", "/tmp/agentd.deb", "/tmp/agentd-next"]));
    let control = root.path("/tmp/agentd-next/DEBIAN/control");
    let text = std::fs::read_to_string(&control).unwrap();
    let current = format!("Version: {}-1", env!("CARGO_PKG_VERSION"));
    assert!(text.contains(&current), "{text}");
    std::fs::write(&control, text.replace(&current, &format!("Version: {next}"))).unwrap();
    // Uncompressed: xz on 160 MB of binaries takes minutes here.
    run(&mut root.chroot(&["dpkg-deb", "-Znone", "-b", "/tmp/agentd-next", "/tmp/agentd-next.deb"]));

    let (_, session) = agentd.get(&format!("/v1/sessions/{id}")).await;
    let (_, container) = agentd.get(&format!("/v1/containers/{}", session["container_id"].as_str().unwrap())).await;
    let supervisor = container["supervisor_pid"].as_u64().unwrap_or_else(|| panic!("{container}")) as u32;
    let mut events = agentd.events(id, session["last_event_id"].as_u64()).await;
    let prompt = (1..=20).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let (status, answer) = agentd.prompt(id, &prompt).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let mut seen = Vec::new();
    while seen.iter().filter(|e: &&SseEvent| e.event == "session.update").count() < 3 {
        seen.push(events.next().await.expect("the turn streams"));
    }

    run(&mut root.chroot(&["dpkg", "-i", "/tmp/agentd-next.deb"]));
    let status = stdout(&mut root.chroot(&["dpkg-query", "-W", "-f", "${Status} ${Version}", "agentd"]));
    assert_eq!(status, format!("install ok installed {next}"));
    assert!(agentd.interrupt().success(), "{}", agentd.log());
    drop(events);
    assert!(procfs::is_alive(supervisor), "the sandbox outlives the stop");
    agentd.restart_command(root.mounted_root(&["/usr/bin/agentd", "up", "--listen", "127.0.0.1:0"]), &[]).await;

    let (_, container) = agentd.get(&format!("/v1/containers/{}", session["container_id"].as_str().unwrap())).await;
    assert_eq!(container["supervisor_pid"].as_u64(), Some(u64::from(supervisor)), "the same PID 1, taken back: {container}");
    let mut events = agentd.events(id, seen.last().unwrap().id).await;
    seen.extend(events.until_run_end().await);
    assert_eq!(seen.last().unwrap().event, "run.completed", "{seen:?}");
    let ids: Vec<u64> = seen.iter().map(|e| e.id.expect("every event has an id")).collect();
    let first = ids[0];
    assert_eq!(ids, (first..first + ids.len() as u64).collect::<Vec<_>>(), "no gap, no repeat");
    assert_eq!(said(&seen), prompt, "every chunk once, in order");
    let after = turn(agentd, id, &mut events, "after the upgrade").await;
    assert_eq!(said(&after), "after the upgrade");
}

/// The .deb in a minimal Debian root: dpkg installs it (maintainer scripts
/// and all, chrooted), agentd runs from it through a session with the echo
/// agent (with the root as its `/`: [`DebianRoot::mounted_root`]), is
/// upgraded under a live turn ([`upgrade_with_a_live_session`]), then
/// `dpkg -r` keeps the config and state, `dpkg -P` removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deb_installs_runs_a_session_and_purges_in_a_debian_root() {
    let Some(deb) = package("agentd.deb") else { return };
    if !tool("debootstrap") || !tool("unshare") {
        return;
    }
    // The sandbox's PID 1 is orphaned while the daemon restarts.
    become_subreaper();
    let started = Instant::now();
    let root = DebianRoot::new();
    eprintln!("Debian root unpacked in {:?}", started.elapsed());
    std::fs::copy(&deb, root.path("/tmp/agentd.deb")).unwrap();
    std::fs::copy(echo_agent(), root.path("/usr/local/bin/echo-agent")).unwrap();

    run(&mut root.chroot(&["dpkg", "-i", "/tmp/agentd.deb"]));
    let status = stdout(&mut root.chroot(&["dpkg-query", "-W", "-f", "${Status} ${Version}", "agentd"]));
    assert_eq!(status, format!("install ok installed {}-1", env!("CARGO_PKG_VERSION")));
    let version = stdout(&mut root.mounted_root(&["/usr/bin/agentd", "--version"]));
    assert_eq!(version.trim(), format!("agentd {}", env!("CARGO_PKG_VERSION")));
    // Installed, not enabled (enable = false), nothing started.
    assert!(!root.path("/etc/systemd/system/multi-user.target.wants/agentd.service").exists());

    // agentd up as installed: its config from /etc/agentd, its state in
    // /var/lib/agentd.
    let state = root.path("/var/lib/agentd");
    let cmd = root.mounted_root(&["/usr/bin/agentd", "up", "--listen", "127.0.0.1:0"]);
    let mut agentd = Agentd::start_command(cmd, state.clone(), None, &[]).await;
    // Each chunk a little late: a turn long enough to stream through the
    // upgrade's restart.
    let mut body = session_body(&["--delay-ms", "150"]);
    body["manual_agent"]["distribution"]["binary"] = json!({"url": "file:///usr/local/bin/echo-agent", "executable": "/usr/local/bin/echo-agent"});
    let (id, mut events) = agentd.create_streaming(&body).await;
    let (status, _) = agentd.prompt(&id, "from the package").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(said(&events.until_run_end().await), "from the package");

    upgrade_with_a_live_session(&root, &mut agentd, &id).await;

    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{}", agentd.log());
    assert!(agentd.interrupt().success(), "{}", agentd.log());
    drop(agentd);
    reap_orphans();
    assert!(!root.mounted(), "mounts left in the root");
    assert!(state.join("agentd.db").is_file(), "the store was not where the package says");

    // Remove: binaries and units go; the conffile and the state stay.
    run(&mut root.chroot(&["dpkg", "-r", "agentd"]));
    for gone in ["/usr/bin/agentd", "/usr/bin/agentd-daemon", "/usr/lib/systemd/system/agentd.service", "/usr/lib/systemd/system/agentd-node.service"] {
        assert!(!root.path(gone).exists(), "{gone} left after dpkg -r");
    }
    assert!(root.path("/etc/agentd/agentd.toml").is_file() && state.is_dir());
    let status = stdout(&mut root.chroot(&["dpkg-query", "-W", "-f", "${Status}", "agentd"]));
    assert_eq!(status, "deinstall ok config-files");

    // Purge: the conffile, /etc/agentd and the state go too.
    run(&mut root.chroot(&["dpkg", "-P", "agentd"]));
    for gone in ["/etc/agentd/agentd.toml", "/etc/agentd", "/var/lib/agentd"] {
        assert!(!root.path(gone).exists(), "{gone} left after dpkg -P");
    }
    let left = root.chroot(&["dpkg-query", "-W", "agentd"]).output().unwrap();
    assert!(!left.status.success(), "dpkg still knows agentd after the purge");
    eprintln!("the .deb test took {:?}", started.elapsed());
}
