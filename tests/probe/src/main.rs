//! `agentd-probe CASE [ARG...]`: tries one thing a hostile workload would try
//! and exits with the errno it got (0 when the call succeeded), after printing
//! one line `CASE errno=N detail`. Calls are raw libc, with no retries or
//! fallbacks, so that the exit code is exactly the kernel's answer, as in
//! bubblewrap's seccomp tests. A case that is killed (seccomp KILL, OOM) shows
//! up as the signal in the caller's exit status.
//!
//! First of all it prints `uid_map=BASE COUNT`: the host ids the sandbox runs
//! as, by which the tests look for anything of it left on the host.
//!
//! Calls that would change the host if a sandbox let them through are made
//! so that they would change nothing (the clock set to what it reads, a read
//! of the time adjustment, a module that does not exist), except where the
//! test needs to see the change to tell (a sysctl), and restores it.

use std::ffi::CString;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Turns a libc return value into the probe's result.
fn check(rc: i64) -> i32 {
    if rc < 0 { errno() } else { 0 }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn open(path: &str, flags: i32) -> i32 {
    // SAFETY: plain open/close on a NUL-terminated path.
    unsafe {
        let fd = libc::open(c(path).as_ptr(), flags | libc::O_CLOEXEC, 0o644);
        if fd < 0 {
            return errno();
        }
        libc::close(fd);
    }
    0
}

fn write_file(path: &str, data: &str) -> i32 {
    // SAFETY: open/write/close on a NUL-terminated path and a byte buffer.
    unsafe {
        let fd = libc::open(c(path).as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return errno();
        }
        let rc = libc::write(fd, data.as_ptr().cast(), data.len());
        let e = if rc < 0 { errno() } else { 0 };
        libc::close(fd);
        e
    }
}

fn list_dir(path: &str) -> Vec<String> {
    std::fs::read_dir(path)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Forks until the kernel refuses; children wait to be killed.
fn fork_bomb() -> (i32, String) {
    let mut count = 0;
    let result = loop {
        // SAFETY: the child only pauses; it never returns into Rust code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            break errno();
        }
        if pid == 0 {
            // SAFETY: pause and _exit are async-signal-safe.
            unsafe {
                libc::pause();
                libc::_exit(0);
            }
        }
        count += 1;
        if count >= 100_000 {
            break 0;
        }
    };
    // SAFETY: signals every process we may signal but PID 1 and ourselves.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    (result, format!("forked={count}"))
}

/// Allocates and touches memory until killed (or until `limit_mib`).
fn memory_bomb(limit_mib: usize) -> (i32, String) {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for i in 0..limit_mib / 16 {
        let mut block = vec![0u8; 16 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = i as u8;
        }
        blocks.push(block);
    }
    (0, format!("allocated={limit_mib}MiB"))
}

/// Checks `m:PATH` (masked: a file that is /dev/null, or an empty read-only
/// directory) and `r:PATH` (on a read-only mount) for each argument; absent
/// paths pass (the kernel has no such file). Exit 0 when all hold, 200 when
/// one does not.
fn proc_view(args: &[String]) -> (i32, String) {
    let mut report = Vec::new();
    let mut bad = false;
    for arg in args {
        let (kind, path) = arg.split_once(':').unwrap_or(("?", arg));
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::lstat(c(path).as_ptr(), &mut st) } != 0 {
            report.push(format!("{path}:absent"));
            continue;
        }
        let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
        let read_only = unsafe { libc::statvfs(c(path).as_ptr(), &mut vfs) } == 0 && vfs.f_flag & libc::ST_RDONLY != 0;
        let fine = match kind {
            "m" if st.st_mode & libc::S_IFMT == libc::S_IFDIR => read_only && list_dir(path).is_empty(),
            "m" => st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3),
            "r" => read_only,
            _ => false,
        };
        bad |= !fine;
        report.push(format!("{path}:{}", if fine { "ok" } else { "EXPOSED" }));
    }
    (if bad { 200 } else { 0 }, report.join(" "))
}

/// What the sandbox shows of itself: hostname, /sys, the host's home
/// directories, /dev/pts and its device.
fn sandbox_view() -> (i32, String) {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let exists = |p: &str| std::path::Path::new(p).symlink_metadata().is_ok();
    let mut pts = list_dir("/dev/pts");
    pts.sort();
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::stat(c("/dev/pts").as_ptr(), &mut st) };
    let detail = format!(
        "hostname={} sys={} home={} root={} pts={} pts_dev={}:{}",
        hostname.trim(),
        exists("/sys"),
        exists("/home"),
        exists("/root"),
        pts.join(","),
        libc::major(st.st_dev),
        libc::minor(st.st_dev)
    );
    (0, detail)
}

fn run(case: &str, args: &[String]) -> (i32, String) {
    let arg = args.first().map(String::as_str);
    let none = String::new();
    // SAFETY (for every unsafe block below): each is one raw system call with
    // constant or checked arguments; failing is the expected outcome.
    match case {
        // Raw: glibc's getpid takes no error, and would return -errno as a pid.
        "getpid" => (check(unsafe { libc::syscall(libc::SYS_getpid) }), none),
        "mount" => {
            let _ = std::fs::create_dir_all("/tmp/probe-mnt");
            let rc = unsafe {
                libc::mount(c("none").as_ptr(), c("/tmp/probe-mnt").as_ptr(), c("tmpfs").as_ptr(), 0, std::ptr::null())
            };
            (check(rc as i64), none)
        }
        "umount" => (check(unsafe { libc::umount2(c("/usr").as_ptr(), libc::MNT_DETACH) } as i64), none),
        "pivot-root" => (check(unsafe { libc::syscall(libc::SYS_pivot_root, c("/tmp").as_ptr(), c("/tmp").as_ptr()) }), none),
        "unshare-user" => (check(unsafe { libc::unshare(libc::CLONE_NEWUSER) } as i64), none),
        "unshare-mount" => (check(unsafe { libc::unshare(libc::CLONE_NEWNS) } as i64), none),
        "clone-newuser" => {
            let rc = unsafe {
                libc::syscall(libc::SYS_clone, (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
            };
            if rc == 0 {
                unsafe { libc::_exit(0) };
            }
            (check(rc), none)
        }
        "setns" => {
            // Our own namespace file always opens: the call itself is tested.
            let fd = unsafe { libc::open(c("/proc/self/ns/mnt").as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return (errno(), "open /proc/self/ns/mnt".into());
            }
            (check(unsafe { libc::setns(fd, libc::CLONE_NEWNS) } as i64), none)
        }
        "ptrace" => {
            let pid: i32 = arg.and_then(|a| a.parse().ok()).unwrap_or(1);
            let rc = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0usize, 0usize) };
            (check(rc as i64), format!("pid={pid}"))
        }
        "read-kcore" => match std::fs::File::open("/proc/kcore") {
            Err(e) => (e.raw_os_error().unwrap_or(0), none),
            Ok(mut f) => {
                let mut buf = vec![0u8; 4096];
                let n = std::io::Read::read(&mut f, &mut buf).unwrap_or(0);
                // Any byte of kernel memory is a leak: exit with a code no
                // errno has.
                (if n == 0 { 0 } else { 200 }, format!("bytes={n}"))
            }
        },
        "write-sysctl" => {
            // A host-wide knob (no namespace has its own), harmless to move:
            // the test reads the host's value around the run and puts it
            // back should the write get through.
            let path = "/proc/sys/vm/overcommit_ratio";
            let now: u32 = std::fs::read_to_string(path).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(50);
            (write_file(path, &format!("{}", now + 1)), format!("was={now}"))
        }
        "write-sysrq" => (write_file("/proc/sysrq-trigger", "h"), none),
        "write-cgroupfs" => (open("/sys/fs/cgroup/cgroup.procs", libc::O_WRONLY), none),
        "keyctl" => (check(unsafe { libc::syscall(libc::SYS_keyctl, 1 /* JOIN_SESSION_KEYRING */, 0usize) }), none),
        "add-key" => {
            let rc = unsafe {
                libc::syscall(libc::SYS_add_key, c("user").as_ptr(), c("agentd-probe").as_ptr(), c("x").as_ptr(), 1usize, -3i64 /* session keyring */)
            };
            (check(rc), none)
        }
        "bpf" => {
            let attr = [0u8; 128];
            (check(unsafe { libc::syscall(libc::SYS_bpf, 0 /* MAP_CREATE */, attr.as_ptr(), attr.len()) }), none)
        }
        "perf-event-open" => {
            let attr = [0u8; 128];
            (check(unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) }), none)
        }
        "init-module" => (check(unsafe { libc::syscall(libc::SYS_init_module, std::ptr::null::<u8>(), 0usize, c("").as_ptr()) }), none),
        "finit-module" => (check(unsafe { libc::syscall(libc::SYS_finit_module, 0, c("").as_ptr(), 0) }), none),
        "reboot" => (check(unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) } as i64), none),
        "swapoff" => (check(unsafe { libc::swapoff(c("/tmp/none").as_ptr()) } as i64), none),
        "settimeofday" => {
            let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
            unsafe { libc::gettimeofday(&mut tv, std::ptr::null_mut()) };
            (check(unsafe { libc::settimeofday(&tv, std::ptr::null()) } as i64), none)
        }
        "clock-settime" => {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
            (check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } as i64), none)
        }
        // modes 0: a read of the clock's state, which the kernel grants anyone.
        "adjtimex" => {
            let mut tx: libc::timex = unsafe { std::mem::zeroed() };
            (check(unsafe { libc::adjtimex(&mut tx) } as i64), none)
        }
        "clock-adjtime" => {
            let mut tx: libc::timex = unsafe { std::mem::zeroed() };
            (check(unsafe { libc::clock_adjtime(libc::CLOCK_REALTIME, &mut tx) } as i64), none)
        }
        "kexec-load" => (check(unsafe { libc::syscall(libc::SYS_kexec_load, 0usize, 0usize, std::ptr::null::<u8>(), 0usize) }), none),
        "kexec-file-load" => {
            (check(unsafe { libc::syscall(libc::SYS_kexec_file_load, -1, -1, 0usize, std::ptr::null::<u8>(), 0usize) }), none)
        }
        "delete-module" => {
            (check(unsafe { libc::syscall(libc::SYS_delete_module, c("agentd_probe_none").as_ptr(), libc::O_NONBLOCK) }), none)
        }
        "swapon" => (check(unsafe { libc::swapon(c("/tmp/none").as_ptr(), 0) } as i64), none),
        "request-key" => {
            let rc = unsafe {
                libc::syscall(libc::SYS_request_key, c("user").as_ptr(), c("agentd-probe").as_ptr(), std::ptr::null::<u8>(), 0usize)
            };
            (check(rc), none)
        }
        // A path that does not exist: were accounting granted, it would fail
        // there rather than turn the host's accounting on or off.
        "acct" => (check(unsafe { libc::acct(c("/nonexistent/agentd-probe").as_ptr()) } as i64), none),
        // Q_SYNC of every filesystem needs no privilege: only a filter refuses it.
        "quotactl" => {
            let cmd = (libc::Q_SYNC << 8) | libc::USRQUOTA;
            (check(unsafe { libc::quotactl(cmd, std::ptr::null(), 0, std::ptr::null_mut()) } as i64), none)
        }
        "name-to-handle-at" => {
            // struct file_handle with room for any filesystem's handle.
            let mut handle = [0u32; 34];
            handle[0] = 128;
            let mut mount_id = 0i32;
            let rc = unsafe {
                libc::syscall(libc::SYS_name_to_handle_at, libc::AT_FDCWD, c("/workspace").as_ptr(), handle.as_mut_ptr(), &mut mount_id, 0)
            };
            (check(rc), none)
        }
        "open-by-handle-at" => {
            // A made-up handle: were the call granted, no file would match.
            let handle: [u32; 4] = [8, 1, 0, 0];
            let root = unsafe { libc::open(c("/").as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
            (check(unsafe { libc::syscall(libc::SYS_open_by_handle_at, root, handle.as_ptr(), libc::O_RDONLY) }), none)
        }
        "get-mempolicy" => {
            let mut mode = 0i32;
            let rc = unsafe { libc::syscall(libc::SYS_get_mempolicy, &mut mode, std::ptr::null_mut::<u64>(), 0usize, 0usize, 0usize) };
            (check(rc), none)
        }
        // The number of filesystem types the kernel knows.
        "sysfs" => (check(unsafe { libc::syscall(libc::SYS_sysfs, 3) }), none),
        "fanotify-init" => (check(unsafe { libc::fanotify_init(libc::FAN_CLASS_NOTIF | libc::FAN_REPORT_FID, libc::O_RDONLY as u32) } as i64), none),
        "process-madvise" => {
            (check(unsafe { libc::syscall(libc::SYS_process_madvise, -1, std::ptr::null::<u8>(), 0usize, libc::MADV_COLD, 0usize) }), none)
        }
        "vsock" => (check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) } as i64), none),
        "sethostname" => {
            let name = "agentd-probe";
            (check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } as i64), none)
        }
        "setdomainname" => {
            let name = "agentd-probe";
            (check(unsafe { libc::setdomainname(name.as_ptr().cast(), name.len()) } as i64), none)
        }
        "userfaultfd" => (check(unsafe { libc::syscall(libc::SYS_userfaultfd, 0) }), none),
        "fork-bomb" => fork_bomb(),
        "memory-bomb" => memory_bomb(arg.and_then(|a| a.parse().ok()).unwrap_or(1024)),
        "write-outside" => {
            let path = arg.unwrap_or("/usr/probe-was-here");
            (open(path, libc::O_WRONLY | libc::O_CREAT), format!("path={path}"))
        }
        "write-workspace" => (open("/workspace/probe-was-here", libc::O_WRONLY | libc::O_CREAT), none),
        "count-procs" => {
            let pids: Vec<String> = list_dir("/proc").into_iter().filter(|n| n.bytes().all(|b| b.is_ascii_digit())).collect();
            (0, format!("procs={} {}", pids.len(), pids.join(",")))
        }
        "kill" => {
            let pid: i32 = arg.and_then(|a| a.parse().ok()).unwrap_or(1);
            (check(unsafe { libc::kill(pid, libc::SIGTERM) } as i64), format!("pid={pid}"))
        }
        "net-ifaces" => {
            let ifaces = list_dir("/proc/self/net/dev_snmp6");
            let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
            let names: Vec<&str> = dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(str::trim).collect();
            (0, format!("ifaces={} {:?}", names.len(), if names.is_empty() { ifaces } else { names.iter().map(|s| s.to_string()).collect() }))
        }
        "connect-loopback" => {
            let port: u16 = arg.and_then(|a| a.parse().ok()).unwrap_or(9);
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(_) => (0, format!("port={port}")),
                Err(e) => (e.raw_os_error().unwrap_or(0), format!("port={port}")),
            }
        }
        "connect" => {
            let addr: std::net::SocketAddr = arg.and_then(|a| a.parse().ok()).unwrap_or(([1, 1, 1, 1], 443).into());
            match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
                Ok(_) => (0, format!("addr={addr}")),
                Err(e) => (e.raw_os_error().unwrap_or(0), format!("addr={addr}")),
            }
        }
        "udp-send" => {
            let addr: std::net::SocketAddr = arg.and_then(|a| a.parse().ok()).unwrap_or(([1, 1, 1, 1], 53).into());
            let sent = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"agentd-probe", addr));
            match sent {
                Ok(_) => (0, format!("addr={addr}")),
                Err(e) => (e.raw_os_error().unwrap_or(0), format!("addr={addr}")),
            }
        }
        "proc-view" => proc_view(args),
        "sandbox-view" => sandbox_view(),
        "write-tmp" => (open(&format!("/tmp/{}", arg.unwrap_or("probe")), libc::O_WRONLY | libc::O_CREAT), none),
        "read-tmp" => (open(&format!("/tmp/{}", arg.unwrap_or("probe")), libc::O_RDONLY), none),
        "limits" => {
            let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
            let pick = |name: &str| {
                limits.lines().find(|l| l.starts_with(name)).map(|l| l[name.len()..].split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            };
            let oom = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap_or_default();
            let core = pick("Max core file size").unwrap_or_default();
            let nofile = pick("Max open files").unwrap_or_default();
            (0, format!("core={core} nofile={nofile} oom_score_adj={}", oom.trim()))
        }
        "caps-wait" => {
            // Stays alive, for the test to look at from the host, until its
            // stdin closes.
            println!("ready");
            let mut buf = [0u8; 1];
            while unsafe { libc::read(0, buf.as_mut_ptr().cast(), 1) } > 0 {}
            (0, none)
        }
        "chown" => {
            let path = arg.unwrap_or("/usr/bin/env");
            (check(unsafe { libc::chown(c(path).as_ptr(), 0, 0) } as i64), format!("path={path}"))
        }
        "chmod" => {
            let path = arg.unwrap_or("/usr/bin/env");
            (check(unsafe { libc::chmod(c(path).as_ptr(), 0o4777) } as i64), format!("path={path}"))
        }
        "mknod" => {
            let dev = libc::makedev(8, 0);
            (check(unsafe { libc::mknod(c("/tmp/sda").as_ptr(), libc::S_IFBLK | 0o600, dev) } as i64), none)
        }
        "list-dev" => (0, format!("dev={}", { let mut d = list_dir("/dev"); d.sort(); d.join(",") })),
        "open-dev" => {
            let path = arg.unwrap_or("/dev/mem");
            (open(path, libc::O_RDONLY), format!("path={path}"))
        }
        "write-exe" => {
            let path = arg.unwrap_or("/proc/1/exe");
            (open(path, libc::O_WRONLY), format!("path={path}"))
        }
        "list-fds" => {
            let mut fds = list_dir("/proc/self/fd");
            fds.sort();
            (0, format!("fds={}", fds.join(",")))
        }
        "clone3" => {
            let args = [0u64; 11];
            (check(unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), std::mem::size_of_val(&args)) }), none)
        }
        "io-uring" => {
            let params = [0u8; 120];
            (check(unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, params.as_ptr()) }), none)
        }
        "tiocsti" => {
            let ch = b'x';
            (check(unsafe { libc::ioctl(0, libc::TIOCSTI, &ch) } as i64), none)
        }
        "tioclinux" => {
            let sub = 0u8;
            (check(unsafe { libc::ioctl(0, libc::TIOCLINUX, &sub) } as i64), none)
        }
        "syscall32" => {
            // getpid through the i386 entry point; a sandbox must kill us here.
            let mut eax: i64 = 20;
            unsafe { std::arch::asm!("int 0x80", inout("rax") eax, options(nostack)) };
            (0, format!("int80 returned {eax}"))
        }
        "x32" => (check(unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) }), none),
        "personality" => {
            // ADDR_NO_RANDOMIZE unless told (in hex, as personality.h writes them).
            let persona = arg.and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()).unwrap_or(0x0040000);
            (check(unsafe { libc::personality(persona as libc::c_ulong) } as i64), format!("persona={persona:#x}"))
        }
        "caps" => {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let caps: Vec<&str> = status.lines().filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs") || l.starts_with("Seccomp:")).collect();
            (0, caps.join(" "))
        }
        other => {
            eprintln!("agentd-probe: unknown case {other:?}");
            (255, none)
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(case) = args.get(1) else {
        eprintln!("usage: agentd-probe CASE [ARG...]");
        std::process::exit(255);
    };
    let uid_map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let ids: Vec<&str> = uid_map.split_whitespace().collect();
    if let [_, base, count] = ids[..] {
        println!("uid_map={base} {count}");
    }
    let (code, detail) = run(case, &args[2..]);
    println!("{case} errno={code} {detail}");
    std::process::exit(code);
}
