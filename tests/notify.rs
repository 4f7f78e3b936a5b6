//! systemd's readiness protocol as the units use it (`Type=notify`,
//! `WatchdogSec=`): the test is the service manager. It binds its own unix
//! datagram socket, starts the daemon with `NOTIFY_SOCKET` (and the watchdog
//! variables) pointing at it, and reads what arrives: STATUS= stages,
//! READY=1 only once the listener accepts, WATCHDOG=1 at half the period,
//! STOPPING=1 on SIGTERM.

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::support::agentd_bin;

/// Half a second: pings every 250 ms.
const WATCHDOG_USEC: &str = "500000";

/// The manager's end: the socket and what arrived on it.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message, in order, each split into its lines (`KEY=value`).
    seen: Vec<Vec<String>>,
}

impl Manager {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Self { socket, path, seen: Vec::new() }
    }

    /// Reads messages until one has the line `want`, for at most `within`;
    /// returns that message.
    fn wait_for(&mut self, want: &str, within: Duration, daemon: &mut Daemon) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let message: Vec<String> = String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect();
                    self.seen.push(message.clone());
                    if message.iter().any(|l| l == want) {
                        return message;
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("notify socket: {e}"),
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("agentd exited ({status}) before {want}; got {:?}\nlog:\n{}", self.seen, daemon.log());
            }
        }
        panic!("no {want} within {within:?}; got {:?}\nlog:\n{}", self.seen, daemon.log());
    }

    /// Reads what is still queued (the daemon has exited).
    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        // Bounded: the queue of an exited daemon only shrinks.
        for _ in 0..1000 {
            let Ok(n) = self.socket.recv(&mut buf) else { return };
            self.seen.push(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect());
        }
    }

    /// The STATUS= texts seen so far, in order.
    fn statuses(&self) -> Vec<String> {
        self.seen.iter().flatten().filter_map(|l| l.strip_prefix("STATUS=")).map(str::to_string).collect()
    }

    fn count(&self, line: &str) -> usize {
        self.seen.iter().flatten().filter(|l| *l == line).count()
    }
}

/// A daemon started as systemd starts a unit's main process.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Runs `agentd args` with `env`. With `watchdog_pid_is_self`, through
    /// `sh -c 'WATCHDOG_PID=$$ exec ...'`: the shell's pid is the one
    /// agentd keeps (it execs agentd-daemon in place), so WATCHDOG_PID names
    /// the daemon exactly as systemd sets it.
    fn spawn(dir: &Path, args: &[&str], env: &[(&str, &str)], watchdog_pid_is_self: bool) -> Self {
        let log = dir.join("agentd.log");
        let mut cmd = if watchdog_pid_is_self {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "WATCHDOG_PID=$$; export WATCHDOG_PID; exec \"$@\"", "sh"]).arg(agentd_bin());
            cmd
        } else {
            Command::new(agentd_bin())
        };
        let child = cmd
            .args(args)
            .env_remove("WATCHDOG_PID")
            .env("AGENTD_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start agentd");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("SIGTERM agentd");
    }

    /// Waits (bounded) for the exit and says whether it was clean.
    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(Instant::now() < deadline, "agentd did not exit after SIGTERM; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("agentd-notify-").tempdir().unwrap()
}

fn subtree(dir: &Path) -> String {
    format!("agentd-e2e-{}-{}", std::process::id(), dir.file_name().unwrap().to_string_lossy().replace('.', ""))
}

/// An HTTP/1.0 GET on a fresh connection: the status code.
fn http_status(addr: &str, path: &str) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no HTTP status in {answer:?}"))
}

/// Stages must come in this order (others may lie between).
fn assert_in_order(statuses: &[String], stages: &[&str]) {
    let mut at = 0;
    for stage in stages {
        match statuses[at..].iter().position(|s| s.starts_with(stage)) {
            Some(i) => at += i + 1,
            None => panic!("status {stage:?} missing or out of order in {statuses:?}"),
        }
    }
}

#[test]
fn up_is_ready_once_it_answers_pings_the_watchdog_and_says_it_stops() {
    let dir = scratch();
    let mut manager = Manager::bind(dir.path());
    let socket = manager.path.display().to_string();
    let state = dir.path().join("state").display().to_string();
    let subtree = subtree(dir.path());
    let mut daemon = Daemon::spawn(
        dir.path(),
        &["up", "--listen", "127.0.0.1:0", "--state-dir", &state],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", WATCHDOG_USEC), ("AGENTD_CGROUP_SUBTREE", &subtree)],
        true,
    );

    let ready = manager.wait_for("READY=1", Duration::from_secs(30), &mut daemon);
    // The address is in the ready message itself; the API answers at once.
    let status = ready.iter().find_map(|l| l.strip_prefix("STATUS=listening on ")).expect("READY=1 comes with the address");
    let addr = status.split_whitespace().next().unwrap();
    assert_eq!(http_status(addr, "/healthz"), 200);
    assert_in_order(&manager.statuses(), &["starting the node", "opening the store", "reconciling the store with the node", "listening on"]);

    // Twice the period: at least two more pings (every 250 ms).
    let pings = manager.count("WATCHDOG=1");
    for _ in 0..2 {
        manager.wait_for("WATCHDOG=1", Duration::from_secs(2), &mut daemon);
    }
    assert!(manager.count("WATCHDOG=1") >= pings + 2);

    daemon.terminate();
    manager.wait_for("STOPPING=1", Duration::from_secs(10), &mut daemon);
    assert!(daemon.wait_exit(), "agentd up did not stop cleanly; log:\n{}", daemon.log());
    manager.drain();
    assert!(manager.statuses().iter().any(|s| s.starts_with("stopping: stopping sandboxes")), "{:?}", manager.statuses());
}

#[test]
fn node_is_ready_once_its_socket_accepts_and_takes_the_watchdog_without_a_pid() {
    let dir = scratch();
    let mut manager = Manager::bind(dir.path());
    let socket = manager.path.display().to_string();
    let state = dir.path().join("state").display().to_string();
    let node_socket = dir.path().join("node.sock");
    let subtree = subtree(dir.path());
    // WATCHDOG_USEC alone, as sd_watchdog_enabled(3) accepts it.
    let mut daemon = Daemon::spawn(
        dir.path(),
        &["node", "--state-dir", &state, "--socket", &node_socket.display().to_string()],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", WATCHDOG_USEC), ("AGENTD_CGROUP_SUBTREE", &subtree)],
        false,
    );

    let ready = manager.wait_for("READY=1", Duration::from_secs(30), &mut daemon);
    assert!(ready.iter().any(|l| l == &format!("STATUS=listening on {}", node_socket.display())), "{ready:?}");
    UnixStream::connect(&node_socket).expect("the node's socket accepts once READY=1 is sent");
    assert_in_order(&manager.statuses(), &["starting the node", "listening on"]);

    let pings = manager.count("WATCHDOG=1");
    for _ in 0..2 {
        manager.wait_for("WATCHDOG=1", Duration::from_secs(2), &mut daemon);
    }
    assert!(manager.count("WATCHDOG=1") >= pings + 2);

    daemon.terminate();
    manager.wait_for("STOPPING=1", Duration::from_secs(10), &mut daemon);
    assert!(daemon.wait_exit(), "agentd node did not stop cleanly; log:\n{}", daemon.log());
}

#[test]
fn a_watchdog_meant_for_another_process_is_not_pinged() {
    let dir = scratch();
    let mut manager = Manager::bind(dir.path());
    let socket = manager.path.display().to_string();
    let state = dir.path().join("state").display().to_string();
    let node_socket = dir.path().join("node.sock").display().to_string();
    let subtree = subtree(dir.path());
    // PID 1 is never this daemon: systemd meant the watchdog for another
    // process of the unit.
    let mut daemon = Daemon::spawn(
        dir.path(),
        &["node", "--state-dir", &state, "--socket", &node_socket],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", WATCHDOG_USEC), ("WATCHDOG_PID", "1"), ("AGENTD_CGROUP_SUBTREE", &subtree)],
        false,
    );
    manager.wait_for("READY=1", Duration::from_secs(30), &mut daemon);
    // Four periods of silence.
    std::thread::sleep(Duration::from_secs(1));
    daemon.terminate();
    manager.wait_for("STOPPING=1", Duration::from_secs(10), &mut daemon);
    assert!(daemon.wait_exit());
    assert_eq!(manager.count("WATCHDOG=1"), 0, "{:?}", manager.seen);
}

#[test]
fn without_notify_socket_nothing_is_sent_or_logged() {
    let dir = scratch();
    let state = dir.path().join("state").display().to_string();
    let node_socket = dir.path().join("node.sock");
    let subtree = subtree(dir.path());
    let mut daemon = Daemon::spawn(
        dir.path(),
        &["node", "--state-dir", &state, "--socket", &node_socket.display().to_string()],
        // The watchdog alone does nothing without a socket to ping.
        &[("WATCHDOG_USEC", WATCHDOG_USEC), ("AGENTD_CGROUP_SUBTREE", &subtree), ("AGENTD_LOG", "info,agentd_daemon=debug")],
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&node_socket).is_err() {
        assert!(Instant::now() < deadline, "the node did not listen; log:\n{}", daemon.log());
        assert!(daemon.child.try_wait().unwrap().is_none(), "the node exited; log:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(600));
    daemon.terminate();
    assert!(daemon.wait_exit());
    let log = daemon.log();
    assert!(!log.contains("service manager") && !log.contains("watchdog"), "{log}");
}

#[test]
fn a_daemon_that_cannot_start_says_why() {
    let dir = scratch();
    let mut manager = Manager::bind(dir.path());
    let socket = manager.path.display().to_string();
    let state = dir.path().join("state").display().to_string();
    // No sandbox binary there: the node stops before it makes anything.
    let missing = dir.path().join("missing").join("agentd").display().to_string();
    let subtree = subtree(dir.path());
    let mut daemon = Daemon::spawn(
        dir.path(),
        &["node", "--state-dir", &state, "--sandbox-bin", &missing],
        &[("NOTIFY_SOCKET", &socket), ("AGENTD_CGROUP_SUBTREE", &subtree)],
        false,
    );
    assert!(!daemon.wait_exit(), "the node started with a socket it cannot bind");
    manager.drain();
    let statuses = manager.statuses();
    assert!(statuses.last().is_some_and(|s| s.starts_with("failed: sandbox binary ") && s.contains("not found")), "{statuses:?}");
    assert_eq!(manager.count("READY=1"), 0);
}

#[test]
fn server_is_ready_once_it_answers() {
    let dir = scratch();
    let node_state = dir.path().join("node-state").display().to_string();
    let node_socket = dir.path().join("node.sock");
    let subtree = subtree(dir.path());
    let mut node = Daemon::spawn(
        dir.path(),
        &["node", "--state-dir", &node_state, "--socket", &node_socket.display().to_string()],
        &[("AGENTD_CGROUP_SUBTREE", &subtree)],
        false,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&node_socket).is_err() {
        assert!(Instant::now() < deadline && node.child.try_wait().unwrap().is_none(), "the node did not listen; log:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(20));
    }

    let server_dir = dir.path().join("server");
    std::fs::create_dir(&server_dir).unwrap();
    let mut manager = Manager::bind(&server_dir);
    let socket = manager.path.display().to_string();
    let state = server_dir.join("state").display().to_string();
    let mut server = Daemon::spawn(
        &server_dir,
        &["server", "--listen", "127.0.0.1:0", "--state-dir", &state, "--node-socket", &node_socket.display().to_string()],
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", WATCHDOG_USEC)],
        true,
    );
    let ready = manager.wait_for("READY=1", Duration::from_secs(30), &mut server);
    let addr = ready.iter().find_map(|l| l.strip_prefix("STATUS=listening on ")).expect("READY=1 comes with the address").to_string();
    assert_eq!(http_status(&addr, "/healthz"), 200);
    assert_in_order(&manager.statuses(), &["opening the store", "reconciling the store with the node", "listening on"]);
    manager.wait_for("WATCHDOG=1", Duration::from_secs(2), &mut server);
    server.terminate();
    manager.wait_for("STOPPING=1", Duration::from_secs(10), &mut server);
    assert!(server.wait_exit(), "agentd server did not stop cleanly; log:\n{}", server.log());
    node.terminate();
    assert!(node.wait_exit(), "agentd node did not stop cleanly; log:\n{}", node.log());
}
