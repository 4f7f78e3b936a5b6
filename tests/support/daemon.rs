//! A node and a control plane as separate processes (`agentd node`,
//! `agentd server`), so that a test can kill the control plane alone and
//! read what the node did from the node's own log.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::agentd_bin;

/// One agentd process with its log collected line by line.
pub struct Daemon {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(agentd_bin());
        cmd.args(args).envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Starts `cmd` (an `agentd` command line, perhaps made to run in a test
    /// host's network namespace) with its log collected; `AGENTD_LOG`
    /// defaults to the control plane's debug lines.
    pub fn spawn_command(mut cmd: Command) -> Self {
        if !cmd.get_envs().any(|(k, _)| k == "AGENTD_LOG") {
            cmd.env("AGENTD_LOG", "info,agentd_controlplane=debug");
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start agentd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        std::thread::spawn({
            let log = Arc::clone(&log);
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            }
        });
        Self { child: Some(child), log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The process's id while it runs (agentd-daemon after agentd's exec).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Lines of the log containing every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        self.log.lock().unwrap().iter().filter(|l| parts.iter().all(|p| l.contains(p))).count()
    }

    /// Waits for a log line containing `needle` and returns it.
    pub async fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return line.clone();
            }
            // Exited (a zombie until reaped): no need to wait out the deadline.
            if let Some(pid) = self.pid() {
                let state = super::procfs::status_field(pid, "State");
                assert!(!state.is_some_and(|s| s.starts_with('Z')), "agentd exited before logging {needle:?}; log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no log line with {needle:?}; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (SIGSTOP makes a node that hangs, SIGCONT brings it back).
    pub fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("the process runs");
        kill(Pid::from_raw(child.id() as i32), signal).expect("signal agentd");
    }

    /// SIGKILL: no shutdown, no cleanup, as a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGINT and wait for the exit (SIGKILL after 20 s).
    pub fn interrupt(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("agentd did not stop on SIGINT; its log:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `agentd node` on a socket in `dir`.
pub struct NodeProcess {
    pub daemon: Daemon,
    pub socket: PathBuf,
    state: PathBuf,
    /// Its cgroup subtree's name.
    pub subtree: String,
}

impl Drop for NodeProcess {
    /// A test that failed may leave sandboxes a live-restore node left
    /// running: the node is killed, and they are.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.daemon.kill9();
            super::host::kill_leftovers(&self.state.join("node").join("sandboxes"), &self.subtree);
        }
    }
}

impl NodeProcess {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[]).await
    }

    /// [`Self::start`] with extra environment (fault-test hooks).
    pub async fn start_with(dir: &Path, env: &[(&str, &str)]) -> Self {
        let state = dir.join("node-state");
        let socket = dir.join("node.sock");
        let subtree = format!("agentd-e2e-{}-{}", std::process::id(), dir.file_name().unwrap().to_string_lossy().replace('.', ""));
        let daemon = Daemon::spawn(
            &["node", "--state-dir", &state.display().to_string(), "--socket", &socket.display().to_string()],
            &[&[("AGENTD_CGROUP_SUBTREE", subtree.as_str())], env].concat(),
        );
        daemon.wait_for_line("node listening").await;
        Self { daemon, socket, state, subtree }
    }

    /// Sandboxes the node built (its log says so once per sandbox).
    pub fn sandboxes_created(&self) -> usize {
        self.daemon.count(&["sandbox created"])
    }

    /// Every line of every session's event log (JSONL) in the sandboxes
    /// the node still has.
    pub fn event_log_lines(&self) -> Vec<serde_json::Value> {
        let sandboxes = self.state.join("node").join("sandboxes");
        let mut lines = Vec::new();
        for sandbox in std::fs::read_dir(&sandboxes).into_iter().flatten().flatten() {
            let logs = std::fs::read_dir(sandbox.path().join("sessions")).into_iter().flatten().flatten();
            // `<id>.jsonl` beside each `<id>.json` state file.
            for log in logs.filter(|e| e.path().extension().is_some_and(|x| x == "jsonl")) {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                lines.extend(text.lines().map(|l| serde_json::from_str(l).expect("an event log line is JSON")));
            }
        }
        lines
    }

    pub fn sandbox_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.state.join("node").join("sandboxes"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}

/// `agentd server` against a node's socket, with its HTTP base URL.
pub struct ServerProcess {
    pub daemon: Daemon,
    pub base: String,
    /// A client that sends the admin token this server wrote into its state
    /// dir on first start (a server sharing another's store writes none:
    /// use the first one's client).
    pub http: reqwest::Client,
}

impl ServerProcess {
    pub async fn start(state: &Path, node_socket: &Path, env: &[(&str, &str)]) -> Self {
        let daemon = Daemon::spawn(
            &[
                "server",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                &state.display().to_string(),
                "--node-socket",
                &node_socket.display().to_string(),
            ],
            env,
        );
        let line = daemon.wait_for_line("API listening").await;
        let addr = line.split("listen=").nth(1).expect("listen= in the line").trim().to_string();
        Self { daemon, base: format!("http://{addr}"), http: super::admin_client(state) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}
