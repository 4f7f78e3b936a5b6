//! What the hostile-workload suite looks at on the host after a case: things
//! a run made and left (mounts, scratch directories, cgroups, processes under
//! its ids), things it made at all (directories watched with inotify), the
//! kernel's log, key users, terminal input.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The tag in the names of everything the `sandbox run` with process id
/// `pid` makes: its mount point, scratch directories and cgroup subtree.
pub fn run_tag(pid: u32) -> String {
    format!("agentd-run-{pid}")
}

/// Where a run's scratch directories go: /dev/shm when it is a tmpfs, else
/// the temporary directory. Both are looked at.
pub fn scratch_dirs() -> [PathBuf; 2] {
    [std::env::temp_dir(), PathBuf::from("/dev/shm")]
}

/// Removes what the `sandbox run` with process id `pid` left, for a test
/// that killed it (SIGKILL leaves it: the run cleans up after itself only
/// when it lives to do so): its scratch files and directories, and its
/// cgroups once their processes are gone (waited for, 5 s at most).
pub fn remove_run_scratch(pid: u32) {
    let tag = run_tag(pid);
    for dir in scratch_dirs() {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&format!("{tag}-")) {
                let path = e.path();
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            }
        }
    }
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    let mut cgroups = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name().to_string_lossy() == tag {
                    cgroups.push(e.path());
                } else {
                    stack.push(e.path());
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for cgroup in cgroups {
        // Children first; a cgroup whose last process is still exiting
        // refuses rmdir with EBUSY for a moment.
        let mut dirs: Vec<PathBuf> = vec![cgroup.clone()];
        let mut i = 0;
        while i < dirs.len() {
            let children: Vec<PathBuf> = std::fs::read_dir(&dirs[i]).into_iter().flatten().flatten().filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false)).map(|e| e.path()).collect();
            dirs.extend(children);
            i += 1;
        }
        for dir in dirs.iter().rev() {
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// What the `sandbox run` with process id `pid` left on the host: mounts,
/// scratch directories and cgroups all carry its tag.
pub fn run_leftovers(pid: u32) -> Vec<String> {
    let tag = run_tag(pid);
    let mut left: Vec<String> =
        std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter(|l| l.contains(&tag)).map(str::to_string).collect();
    for dir in scratch_dirs() {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        left.extend(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&tag)));
    }
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name().to_string_lossy() == tag {
                    left.push(e.path().display().to_string());
                }
                stack.push(e.path());
            }
        }
    }
    left
}

/// Host processes running under any of the `count` ids from `base`: what a
/// sandbox with that range left behind.
pub fn processes_under(base: u32, count: u32) -> Vec<(u32, String)> {
    let ids = base as u64..base as u64 + count as u64;
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else { continue };
        let uids = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap_or_default();
        if uids.split_whitespace().filter_map(|u| u.parse::<u64>().ok()).any(|u| ids.contains(&u)) {
            let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or_default().trim().to_string();
            found.push((pid, name));
        }
    }
    found
}

/// Users the kernel keeps keys or keyrings for, among the `count` ids from
/// `base` (/proc/key-users lists every user with a key, whoever reads it).
pub fn key_users_in(base: u32, count: u32) -> Vec<String> {
    let ids = base as u64..base as u64 + count as u64;
    std::fs::read_to_string("/proc/key-users")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.trim().split(':').next().and_then(|u| u.parse::<u64>().ok()).is_some_and(|u| ids.contains(&u)))
        .map(str::to_string)
        .collect()
}

/// The kernel log as `(sequence number, message)`, read from /dev/kmsg.
pub fn kernel_log() -> Vec<(u64, String)> {
    let mut kmsg = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").expect("/dev/kmsg (tests run as root)");
    let mut records = Vec::new();
    // One read returns one record; a record longer than this is cut (EINVAL).
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match kmsg.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let (head, message) = text.split_once(';').unwrap_or(("", &text));
                if let Some(seq) = head.split(',').nth(1).and_then(|s| s.parse().ok()) {
                    records.push((seq, message.trim_end().to_string()));
                }
            }
            // Records overwritten while we read: go on with the oldest left.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("/dev/kmsg: {e}"),
        }
    }
    records
}

/// The sequence number of the newest kernel log record.
pub fn kernel_log_end() -> u64 {
    kernel_log().last().map_or(0, |r| r.0)
}

/// Kernel log messages written after record `seq`.
pub fn kernel_log_since(seq: u64) -> Vec<String> {
    kernel_log().into_iter().filter(|(s, _)| *s > seq).map(|(_, m)| m).collect()
}

/// Input waiting on a terminal, read without blocking.
pub fn pending_input(tty: &OwnedFd) -> Vec<u8> {
    let fd = tty.as_raw_fd();
    // SAFETY: fcntl and read on a descriptor we own, into a local buffer.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        let mut input = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            input.extend_from_slice(&buf[..n as usize]);
        }
        libc::fcntl(fd, libc::F_SETFL, flags);
        input
    }
}

/// Names created in a set of directories while it lives (inotify): shows
/// what a run made even if it removed it again.
pub struct Creations {
    fd: OwnedFd,
    /// Watch descriptor -> directory.
    dirs: Vec<(i32, PathBuf)>,
}

impl Creations {
    pub fn watch(dirs: &[PathBuf]) -> Creations {
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(raw >= 0, "inotify_init1: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor of ours.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut watched = Vec::new();
        for dir in dirs {
            let path = CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid C string and our inotify descriptor.
            let wd = unsafe { libc::inotify_add_watch(raw, path.as_ptr(), libc::IN_CREATE) };
            assert!(wd >= 0, "watch {}: {}", dir.display(), std::io::Error::last_os_error());
            watched.push((wd, dir.clone()));
        }
        Creations { fd, dirs: watched }
    }

    /// Every path created so far, as `dir/name`.
    pub fn created(&self) -> Vec<PathBuf> {
        let mut created = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            // SAFETY: reads into our buffer from our descriptor.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut at = 0;
            while at < n as usize {
                // SAFETY: the kernel wrote whole `inotify_event`s, each
                // followed by `len` bytes of NUL-padded name.
                let event: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name_at = at + std::mem::size_of::<libc::inotify_event>();
                let name = &buf[name_at..name_at + event.len as usize];
                let name = String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
                if let Some((_, dir)) = self.dirs.iter().find(|(wd, _)| *wd == event.wd) {
                    created.push(dir.join(name));
                }
                at = name_at + event.len as usize;
            }
        }
        created
    }
}

/// The cgroup directories this process is in, one per hierarchy: where a
/// `sandbox run` it starts makes its subtree.
pub fn own_cgroup_dirs() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut dirs = Vec::new();
    for line in std::fs::read_to_string("/proc/self/cgroup").unwrap().lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
        let hierarchy = match controllers {
            // The v2 tree: beside the v1 ones on hybrid hosts, or the root.
            "" if root.join("unified").is_dir() => root.join("unified"),
            "" => root.to_owned(),
            named if named.starts_with("name=") => root.join(&named["name=".len()..]),
            co_mounted if root.join(co_mounted).is_dir() => root.join(co_mounted),
            controllers => root.join(controllers.split(',').next().unwrap()),
        };
        let dir = hierarchy.join(path.trim_start_matches('/'));
        if dir.is_dir() {
            dirs.push(dir);
        }
    }
    dirs
}
