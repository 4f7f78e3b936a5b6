//! A fake cgroupfs in a temp dir, for unit tests: hosts laid out as v1,
//! hybrid or v2, and a [`CgroupFs`] whose `mkdir` fills a new cgroup with
//! the control files the kernel would, whose `rmdir` refuses a cgroup with
//! pids in `cgroup.procs`, and whose `kill` records the pid and takes it out
//! of every `cgroup.procs`.
//!
//! Control files we write start empty: writes do not truncate (neither do
//! the kernel's nor libcgroups'), so an empty file reads back exactly what
//! was written last, when values grow or keep their length.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tempfile::TempDir;

use super::fs::CgroupFs;

#[derive(Debug)]
pub struct FakeCgroupFs {
    root: PathBuf,
    /// Pure v2: the root is the v2 mount.
    unified: bool,
    /// Pids `kill` was called on, in order.
    pub killed: Mutex<Vec<u32>>,
}

const V1_MEMORY: &[(&str, &str)] = &[
    ("memory.limit_in_bytes", ""),
    ("memory.memsw.limit_in_bytes", ""),
    ("memory.usage_in_bytes", "0\n"),
    (
        "memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    ),
];
const V1_PIDS: &[(&str, &str)] = &[("pids.max", ""), ("pids.current", "0\n")];
const V1_CPU: &[(&str, &str)] = &[("cpu.cfs_period_us", ""), ("cpu.cfs_quota_us", "")];
const V1_CPUACCT: &[(&str, &str)] = &[("cpuacct.usage", "0\n")];
const V1_FREEZER: &[(&str, &str)] = &[("freezer.state", "")];
const V1_CORE: &[(&str, &str)] = &[("cgroup.procs", ""), ("tasks", "")];
const V2_CORE: &[(&str, &str)] = &[
    ("cgroup.procs", ""),
    ("cgroup.controllers", ""),
    ("cgroup.subtree_control", ""),
    ("cgroup.events", "populated 0\nfrozen 0\n"),
    ("cgroup.freeze", ""),
    ("cgroup.kill", ""),
    ("cpu.stat", "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"),
];
const V2_CONTROLLED: &[(&str, &str)] = &[
    ("memory.max", ""),
    ("memory.swap.max", ""),
    ("memory.current", "0\n"),
    ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"),
    ("pids.max", ""),
    ("pids.current", "0\n"),
    ("cpu.max", ""),
];

impl FakeCgroupFs {
    fn files(&self, path: &Path) -> Vec<(&'static str, &'static str)> {
        if self.unified {
            return [V2_CORE, V2_CONTROLLED].concat();
        }
        let rel = path
            .strip_prefix(&self.root)
            .expect("fake mkdir outside the root");
        let mount = rel.iter().next().and_then(|m| m.to_str()).unwrap_or("");
        let mut files = Vec::new();
        if mount == "unified" {
            return V2_CORE.to_vec();
        }
        files.extend_from_slice(V1_CORE);
        for c in mount.split(',') {
            files.extend_from_slice(match c {
                "memory" => V1_MEMORY,
                "pids" => V1_PIDS,
                "cpu" => V1_CPU,
                "cpuacct" => V1_CPUACCT,
                "freezer" => V1_FREEZER,
                _ => &[],
            });
        }
        files
    }
}

impl CgroupFs for FakeCgroupFs {
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)?;
        for (name, content) in self.files(path) {
            std::fs::write(path.join(name), content)?;
        }
        Ok(())
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        if !path.exists() {
            return Err(io::ErrorKind::NotFound.into());
        }
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        std::fs::remove_dir_all(path)
    }

    fn kill(&self, pid: u32) -> io::Result<()> {
        self.killed.lock().unwrap().push(pid);
        forget_pid(&self.root, pid);
        Ok(())
    }

    fn attach(&self, procs: &Path, pid: u32) -> io::Result<()> {
        if !procs.exists() {
            return Err(io::ErrorKind::NotFound.into());
        }
        forget_pid(&self.root, pid);
        let mut text = std::fs::read_to_string(procs)?;
        text.push_str(&format!("{pid}\n"));
        std::fs::write(procs, text)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if to.exists() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        std::fs::rename(from, to)
    }
}

/// Takes `pid` out of every `cgroup.procs` under `dir`, as its death would.
fn forget_pid(dir: &Path, pid: u32) {
    let procs = dir.join("cgroup.procs");
    if let Ok(text) = std::fs::read_to_string(&procs) {
        let kept: String = text
            .lines()
            .filter(|l| l.trim() != pid.to_string())
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&procs, kept).unwrap();
    }
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            forget_pid(&e.path(), pid);
        }
    }
}

/// A fake host: a temp dir laid out as a cgroup root, and the text its
/// `/proc/self/cgroup` would hold.
pub struct FakeHost {
    pub dir: TempDir,
    pub self_cgroup: String,
    pub unified: bool,
}

impl FakeHost {
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn cfs(&self) -> std::sync::Arc<FakeCgroupFs> {
        std::sync::Arc::new(FakeCgroupFs {
            root: self.root().to_owned(),
            unified: self.unified,
            killed: Mutex::new(Vec::new()),
        })
    }

    /// Makes the start cgroup `start` (and its parents) in the mount
    /// `mount` (relative to the root; "" for pure v2) with `files`.
    fn start(&self, mount: &str, start: &str, files: &[(&str, &str)]) {
        let dir = self.root().join(mount).join(start.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
    }

    /// This host's layout: v1 controllers (cpu and cpuacct mounted apart,
    /// memory started in `/process_api/abc`, the rest at `/`), a named
    /// systemd hierarchy, cpuset, and a controller-less v2 tree at
    /// `unified/`.
    pub fn hybrid() -> FakeHost {
        let host = FakeHost {
            dir: tempfile::tempdir().unwrap(),
            self_cgroup: "9:name=systemd:/\n8:pids:/\n6:freezer:/\n4:memory:/process_api/abc\n\
                          3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n"
                .into(),
            unified: false,
        };
        for m in ["systemd", "pids", "freezer", "cpuset", "cpuacct", "cpu"] {
            host.start(m, "/", &[("cgroup.procs", "1\n")]);
        }
        host.start("memory", "/process_api/abc", &[("cgroup.procs", "1\n")]);
        host.start(
            "unified",
            "/",
            &[("cgroup.procs", "1\n"), ("cgroup.controllers", "")],
        );
        host
    }

    /// A v1-only host with cpu and cpuacct co-mounted, started in
    /// `/user.slice` everywhere.
    pub fn legacy() -> FakeHost {
        let host = FakeHost {
            dir: tempfile::tempdir().unwrap(),
            self_cgroup: "5:pids:/user.slice\n4:freezer:/user.slice\n3:memory:/user.slice\n\
                          2:cpu,cpuacct:/user.slice\n1:name=systemd:/user.slice\n"
                .into(),
            unified: false,
        };
        for m in ["pids", "freezer", "memory", "cpu,cpuacct", "systemd"] {
            host.start(m, "/user.slice", &[("cgroup.procs", "1\n")]);
        }
        host
    }

    /// A pure v2 host; the daemon (`pid`) started in `start` with the usual
    /// controllers available and none enabled.
    pub fn unified(start: &str, pid: u32) -> FakeHost {
        let host = FakeHost {
            dir: tempfile::tempdir().unwrap(),
            self_cgroup: format!("0::{start}\n"),
            unified: true,
        };
        host.start(
            "",
            "/",
            &[
                ("cgroup.procs", "1\n"),
                (
                    "cgroup.controllers",
                    "cpuset cpu io memory hugetlb pids rdma misc\n",
                ),
                ("cgroup.subtree_control", "cpu io memory pids\n"),
            ],
        );
        if start != "/" {
            host.start(
                "",
                start,
                &[
                    ("cgroup.procs", &format!("{pid}\n")),
                    ("cgroup.controllers", "cpu io memory pids\n"),
                    ("cgroup.subtree_control", ""),
                ],
            );
        }
        host
    }
}
