//! `agentd-probe CASE [ARG]`: tries one thing a hostile workload would try and
//! exits with the errno it got (0 when the call succeeded), after printing one
//! line `CASE errno=N detail`. Calls are raw libc, with no retries or
//! fallbacks, so that the exit code is exactly the kernel's answer, as in
//! bubblewrap's seccomp tests. A case that is killed (seccomp KILL, OOM) shows
//! up as the signal in the caller's exit status.

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

fn run(case: &str, arg: Option<&str>) -> (i32, String) {
    let none = String::new();
    // SAFETY (for every unsafe block below): each is one raw system call with
    // constant or checked arguments; failing is the expected outcome.
    match case {
        "getpid" => (check(unsafe { libc::getpid() } as i64), none),
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
        "write-proc-sys" => (write_file("/proc/sys/kernel/domainname", "probe"), none),
        "write-sysrq" => (write_file("/proc/sysrq-trigger", "h"), none),
        "write-cgroupfs" => (open("/sys/fs/cgroup/cgroup.procs", libc::O_WRONLY), none),
        "keyctl" => (check(unsafe { libc::syscall(libc::SYS_keyctl, 1 /* JOIN_SESSION_KEYRING */, 0usize) }), none),
        "add-key" => {
            let rc = unsafe {
                libc::syscall(libc::SYS_add_key, c("user").as_ptr(), c("probe").as_ptr(), c("x").as_ptr(), 1usize, -3i64 /* session keyring */)
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
            let tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
            (check(unsafe { libc::settimeofday(&tv, std::ptr::null()) } as i64), none)
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
        "personality" => (check(unsafe { libc::personality(0x0040000 /* ADDR_NO_RANDOMIZE */) } as i64), none),
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
        eprintln!("usage: agentd-probe CASE [ARG]");
        std::process::exit(255);
    };
    let (code, detail) = run(case, args.get(2).map(String::as_str));
    println!("{case} errno={code} {detail}");
    std::process::exit(code);
}
