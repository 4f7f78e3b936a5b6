//! `terminal/create`, `terminal/output`, `terminal/wait_for_exit`,
//! `terminal/kill` and `terminal/release`: commands an agent runs through its
//! client.
//!
//! A terminal is a child of the supervisor, so it runs in the sandbox like the
//! agent, with the agent's hardening applied between fork and exec. Each leads
//! its own process group, which `kill` and `release` SIGKILL whole. Its stdout
//! and stderr share one pipe (interleaved as written, as on a terminal; there
//! is no pty, so programs see a pipe); stdin is `/dev/null`. The output is kept
//! in an [`Output`] buffer that drops from the front past its limit. Exit
//! statuses come from the supervisor's [`Reaper`]: nothing here waits on a
//! child.
//!
//! Environment: the agent's own environment (what the plan gave it: nothing
//! of the supervisor's or the daemon's), with the request's `env` on top. An
//! agent that passes only `NODE_ENV` still expects `PATH`, `HOME` and `LANG`,
//! and a terminal is the agent's delegate, so this widens nothing.

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::reaper::{Exit, Reaper};
use agentd_harden::Hardening;

/// Output kept per terminal when the agent sets no `outputByteLimit`, and
/// the most kept when it asks for more: a chatty build must not grow the
/// supervisor without bound.
pub const MAX_OUTPUT_BYTES: usize = 4 << 20;

/// Live terminals per agent. Each holds a process group and up to
/// [`MAX_OUTPUT_BYTES`]; an agent that never releases hits this first.
pub const MAX_TERMINALS: usize = 64;

/// How long `terminal/output` waits, once the command has exited, for the
/// rest of its output to be read from the pipe. A background process that
/// keeps the pipe open would otherwise hold the answer forever.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

const READ_CHUNK: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("{0}")]
    Params(String),
    #[error("no terminal {0} in this session (never created, or released)")]
    Unknown(String),
    #[error("command not found: {0}")]
    CommandNotFound(String),
    #[error("working directory {} {reason}", cwd.display())]
    Cwd { cwd: PathBuf, reason: &'static str },
    #[error("{MAX_TERMINALS} terminals are live: release some first")]
    TooMany,
    #[error("cannot run {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

impl TerminalError {
    /// Whether the agent's request is at fault.
    pub fn is_invalid_params(&self) -> bool {
        matches!(self, Self::Params(_) | Self::Cwd { .. })
    }

    /// Whether something named in the request does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Unknown(_) | Self::CommandNotFound(_))
    }
}

/// A terminal's retained output: at most `limit` bytes, the newest ones.
#[derive(Debug)]
pub struct Output {
    bytes: VecDeque<u8>,
    limit: usize,
    /// Whether any byte was ever dropped.
    truncated: bool,
    /// Whether the pipe reached its end: no character is still being written.
    complete: bool,
}

fn is_continuation(byte: u8) -> bool {
    byte & 0b1100_0000 == 0b1000_0000
}

/// How many bytes at the end of `bytes` start a UTF-8 character whose
/// remaining bytes have not arrived yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(4) {
        let byte = bytes[bytes.len() - back];
        if is_continuation(byte) {
            continue;
        }
        let width = match byte {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if width > back { back } else { 0 };
    }
    0
}

impl Output {
    pub fn new(limit: usize) -> Self {
        Self { bytes: VecDeque::new(), limit, truncated: false, complete: false }
    }

    /// Appends, then drops from the front what exceeds the limit, and the
    /// rest of a character cut there, so the text never starts mid-character
    /// (the spec's rule, even if that keeps slightly less than the limit).
    pub fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        if self.bytes.len() <= self.limit {
            return;
        }
        let mut cut = self.bytes.len() - self.limit;
        // At most three continuation bytes follow a character's first byte;
        // past that the output is not UTF-8 and there is no boundary to find.
        for _ in 0..3 {
            match self.bytes.get(cut) {
                Some(&b) if is_continuation(b) => cut += 1,
                _ => break,
            }
        }
        self.bytes.drain(..cut);
        self.truncated = true;
    }

    pub fn finish(&mut self) {
        self.complete = true;
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The retained output as text. Bytes that are not UTF-8 become U+FFFD;
    /// a character still being written is left for a later call.
    pub fn text(&mut self) -> String {
        let bytes = self.bytes.make_contiguous();
        let end = if self.complete { bytes.len() } else { bytes.len() - incomplete_tail(bytes) };
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    }
}

/// An exit as ACP reports it: a code, or the name of the signal.
pub fn exit_status(exit: Exit) -> Value {
    match exit {
        Exit::Code(code) => json!({"exitCode": code, "signal": null}),
        Exit::Signal(n) => {
            let name = Signal::try_from(n).map(|s| s.as_str().to_string()).unwrap_or_else(|_| n.to_string());
            json!({"exitCode": null, "signal": name})
        }
    }
}

#[derive(Deserialize)]
struct EnvVariable {
    name: String,
    value: String,
}

/// `terminal/create` params, as ACP v1 names them (`sessionId` is checked
/// by the caller).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateParams {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVariable>,
    #[serde(default)]
    cwd: Option<PathBuf>,
    #[serde(default)]
    output_byte_limit: Option<u64>,
}

struct Terminal {
    /// The session that created it: other sessions cannot see it.
    session_id: String,
    /// Also the process group id.
    pid: i32,
    output: Arc<Mutex<Output>>,
    exit: watch::Receiver<Option<Exit>>,
    /// True once the output pipe reached its end.
    drained: watch::Receiver<bool>,
    /// The task copying the pipe into `output`, stopped on release.
    reader: AbortHandle,
}

impl Terminal {
    fn kill(&self) {
        // After the leader is reaped the group may live on in its
        // background jobs, so the group is signalled either way. Its id is
        // not reused while any member lives.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
    }
}

/// One agent's terminals.
pub struct Terminals {
    reaper: Arc<Reaper>,
    /// The agent's hardening (its own seccomp filter, if it has one).
    hardening: Arc<Hardening>,
    /// The agent's environment, under each request's `env`.
    base_env: HashMap<String, String>,
    live: Mutex<HashMap<String, Arc<Terminal>>>,
    next_id: AtomicU64,
}

impl Terminals {
    pub fn new(reaper: Arc<Reaper>, hardening: Arc<Hardening>, base_env: HashMap<String, String>) -> Self {
        Self { reaper, hardening, base_env, live: Mutex::default(), next_id: AtomicU64::new(1) }
    }

    fn get(&self, session_id: &str, terminal_id: &str) -> Result<Arc<Terminal>, TerminalError> {
        match self.live.lock().unwrap().get(terminal_id) {
            Some(t) if t.session_id == session_id => Ok(Arc::clone(t)),
            _ => Err(TerminalError::Unknown(terminal_id.to_string())),
        }
    }

    /// `terminal/create`: starts the command and returns its terminal id.
    /// `default_cwd` is the session's working directory.
    pub fn create(&self, session_id: &str, default_cwd: &Path, params: CreateParams) -> Result<String, TerminalError> {
        if params.command.is_empty() {
            return Err(TerminalError::Params("command is empty".into()));
        }
        let cwd = params.cwd.unwrap_or_else(|| default_cwd.to_owned());
        if !cwd.is_absolute() {
            return Err(TerminalError::Cwd { cwd, reason: "is not absolute: ACP paths must be absolute" });
        }
        if !cwd.is_dir() {
            return Err(TerminalError::Cwd { cwd, reason: "is not an existing directory" });
        }
        let mut env = self.base_env.clone();
        for var in params.env {
            if var.name.is_empty() || var.name.contains(['=', '\0']) || var.value.contains('\0') {
                return Err(TerminalError::Params(format!("invalid environment variable {:?}", var.name)));
            }
            env.insert(var.name, var.value);
        }
        let limit = params.output_byte_limit.map_or(MAX_OUTPUT_BYTES, |l| l.min(MAX_OUTPUT_BYTES as u64) as usize);
        if self.live.lock().unwrap().len() >= MAX_TERMINALS {
            return Err(TerminalError::TooMany);
        }

        let spawn_error = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound => TerminalError::CommandNotFound(params.command.clone()),
            std::io::ErrorKind::InvalidInput => TerminalError::Params(format!("cannot run {:?}: {source}", params.command)),
            _ => TerminalError::Spawn { command: params.command.clone(), source },
        };
        // Both ends close on exec; the child gets its copies as fds 1 and 2.
        let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| spawn_error(e.into()))?;
        let write_copy = write_end.try_clone().map_err(spawn_error)?;
        let mut command = Command::new(&params.command);
        command
            .args(&params.args)
            .env_clear()
            .envs(&env)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::from(write_copy))
            .process_group(0);
        let hardening = Arc::clone(&self.hardening);
        // SAFETY: apply_in_child makes only async-signal-safe system calls and
        // allocates nothing (its contract), as a pre_exec hook must.
        unsafe { command.pre_exec(move || hardening.apply_in_child()) };
        let child = command.spawn().map_err(spawn_error)?;
        let pid = child.id() as i32;
        // Registered before anything can await, so the reaper cannot see the
        // exit first. The Child is dropped unwaited: PID 1 reaps.
        let exit = self.reaper.watch(pid);
        drop(child);
        // Our copies of the write end go with the Command: the pipe ends when
        // the command's group has closed it.
        drop(command);

        let output = Arc::new(Mutex::new(Output::new(limit)));
        let (drained_tx, drained) = watch::channel(false);
        let reader = match tokio::net::unix::pipe::Receiver::from_owned_fd(read_end) {
            Ok(pipe) => tokio::spawn(copy_output(pipe, Arc::clone(&output), drained_tx)).abort_handle(),
            Err(e) => {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(TerminalError::Spawn { command: params.command, source: e });
            }
        };
        let id = format!("term_{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        tracing::info!(terminal = id, pid, command = params.command, "terminal started");
        let terminal = Terminal { session_id: session_id.to_string(), pid, output, exit, drained, reader };
        self.live.lock().unwrap().insert(id.clone(), Arc::new(terminal));
        Ok(id)
    }

    /// `terminal/output`: the output so far, whether some was dropped, and
    /// the exit status once there is one.
    pub async fn output(&self, session_id: &str, terminal_id: &str) -> Result<Value, TerminalError> {
        let terminal = self.get(session_id, terminal_id)?;
        let exit = *terminal.exit.borrow();
        if exit.is_some() {
            let mut drained = terminal.drained.clone();
            let _ = tokio::time::timeout(DRAIN_GRACE, drained.wait_for(|d| *d)).await;
        }
        let (text, truncated) = {
            let mut output = terminal.output.lock().unwrap();
            (output.text(), output.truncated())
        };
        let mut answer = json!({"output": text, "truncated": truncated});
        if let Some(exit) = exit {
            answer["exitStatus"] = exit_status(exit);
        }
        Ok(answer)
    }

    /// `terminal/wait_for_exit`: waits (on the request's own task) until the
    /// command exits.
    pub async fn wait_for_exit(&self, session_id: &str, terminal_id: &str) -> Result<Value, TerminalError> {
        let terminal = self.get(session_id, terminal_id)?;
        let mut exit = terminal.exit.clone();
        let status = match exit.wait_for(|e| e.is_some()).await {
            Ok(e) => e.expect("waited for Some"),
            // The reaper dropped the watch without a status: it is gone.
            Err(_) => return Err(TerminalError::Unknown(terminal_id.to_string())),
        };
        Ok(exit_status(status))
    }

    /// `terminal/kill`: SIGKILL to the command's process group. The terminal
    /// stays: its output and exit status can still be asked for.
    pub fn kill(&self, session_id: &str, terminal_id: &str) -> Result<(), TerminalError> {
        self.get(session_id, terminal_id)?.kill();
        Ok(())
    }

    /// `terminal/release`: kills the command if it still runs and forgets
    /// the terminal; its id is unknown from then on.
    pub fn release(&self, session_id: &str, terminal_id: &str) -> Result<(), TerminalError> {
        self.get(session_id, terminal_id)?;
        let terminal = self.live.lock().unwrap().remove(terminal_id);
        if let Some(terminal) = terminal {
            terminal.kill();
            terminal.reader.abort();
        }
        Ok(())
    }

    /// Kills and forgets every terminal: the agent is gone.
    pub fn release_all(&self) {
        let all: Vec<_> = self.live.lock().unwrap().drain().collect();
        for (id, terminal) in all {
            tracing::debug!(terminal = id, "releasing terminal of a departed agent");
            terminal.kill();
            terminal.reader.abort();
        }
    }
}

impl Drop for Terminals {
    fn drop(&mut self) {
        self.release_all();
    }
}

async fn copy_output(mut pipe: tokio::net::unix::pipe::Receiver, output: Arc<Mutex<Output>>, drained: watch::Sender<bool>) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => output.lock().unwrap().push(&buf[..n]),
        }
    }
    output.lock().unwrap().finish();
    let _ = drained.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(limit: usize, pushes: &[&[u8]]) -> (String, bool) {
        let mut out = Output::new(limit);
        for p in pushes {
            out.push(p);
        }
        out.finish();
        (out.text(), out.truncated())
    }

    #[test]
    fn output_under_the_limit_is_kept_whole() {
        assert_eq!(kept(10, &[b"hello", b" you"]), ("hello you".into(), false));
        assert_eq!(kept(5, &[b"hello"]), ("hello".into(), false));
        assert_eq!(kept(0, &[]), (String::new(), false));
    }

    #[test]
    fn output_over_the_limit_keeps_the_newest_bytes() {
        assert_eq!(kept(5, &[b"hello", b" world"]), ("world".into(), true));
        assert_eq!(kept(3, &[b"abcdef"]), ("def".into(), true));
        assert_eq!(kept(0, &[b"abc"]), (String::new(), true));
    }

    #[test]
    fn truncation_never_splits_a_character() {
        // "é" is 2 bytes, "日" 3, "🙂" 4.
        let text = "aé日🙂b".as_bytes();
        for limit in 0..=text.len() {
            let (kept, truncated) = kept(limit, &[text]);
            assert!(kept.len() <= limit, "{limit}: {kept:?}");
            assert!("aé日🙂b".ends_with(&kept), "{limit}: {kept:?}");
            assert_eq!(truncated, limit < text.len());
            assert!(!kept.contains('\u{fffd}'), "{limit}: {kept:?}");
        }
        assert_eq!(kept(5, &[text]), ("🙂b".into(), true));
        assert_eq!(kept(4, &[text]), ("b".into(), true), "the emoji does not fit: less than the limit");
        // Pushed byte by byte, the same.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(kept(8, &bytes), ("日🙂b".into(), true));
    }

    #[test]
    fn binary_output_is_cut_at_the_limit_all_the_same() {
        let mut out = Output::new(2);
        out.push(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80]);
        assert!(out.bytes.len() <= 2);
        out.finish();
        assert!(out.text().chars().all(|c| c == '\u{fffd}'));
    }

    #[test]
    fn a_character_still_being_written_waits_for_its_end() {
        let mut out = Output::new(100);
        let smile = "🙂".as_bytes();
        out.push(b"hi ");
        out.push(&smile[..2]);
        assert_eq!(out.text(), "hi ");
        out.push(&smile[2..]);
        assert_eq!(out.text(), "hi 🙂");
        // At the end of the output a cut character is shown as such.
        out.push(&smile[..1]);
        out.finish();
        assert_eq!(out.text(), "hi 🙂\u{fffd}");
    }

    #[test]
    fn incomplete_tails() {
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail("é".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"é".as_bytes()[..1]), 1);
        assert_eq!(incomplete_tail(&"日".as_bytes()[..2]), 2);
        assert_eq!(incomplete_tail(&"🙂".as_bytes()[..3]), 3);
        assert_eq!(incomplete_tail("a🙂".as_bytes()), 0);
    }

    #[test]
    fn exit_statuses_as_acp_names_them() {
        assert_eq!(exit_status(Exit::Code(3)), json!({"exitCode": 3, "signal": null}));
        assert_eq!(exit_status(Exit::Signal(9)), json!({"exitCode": null, "signal": "SIGKILL"}));
    }
}

/// Real commands under a real reaper. The reaper reaps every child of the
/// process: nextest runs each test in a process of its own.
#[cfg(test)]
mod spawn_tests {
    use super::*;

    fn terminals(env: &[(&str, &str)]) -> Terminals {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Terminals::new(Reaper::start().unwrap(), Arc::new(Hardening::default_for_agents().unwrap()), env)
    }

    fn params(v: Value) -> CreateParams {
        serde_json::from_value(v).unwrap()
    }

    async fn run(t: &Terminals, v: Value) -> (Value, Value) {
        let id = t.create("s", Path::new("/"), params(v)).unwrap();
        let exit = t.wait_for_exit("s", &id).await.unwrap();
        let output = t.output("s", &id).await.unwrap();
        t.release("s", &id).unwrap();
        (exit, output)
    }

    #[tokio::test]
    async fn runs_a_command_and_reports_its_output_and_exit() {
        let t = terminals(&[("PATH", "/usr/bin:/bin")]);
        let (exit, output) = run(&t, json!({"command": "echo", "args": ["hi", "there"]})).await;
        assert_eq!(exit, json!({"exitCode": 0, "signal": null}));
        assert_eq!(output, json!({"output": "hi there\n", "truncated": false, "exitStatus": {"exitCode": 0, "signal": null}}));

        let (exit, output) = run(&t, json!({"command": "sh", "args": ["-c", "echo out; echo err >&2; exit 3"]})).await;
        assert_eq!(exit["exitCode"], 3);
        assert_eq!(output["output"], "out\nerr\n");
    }

    #[tokio::test]
    async fn env_cwd_and_limit_come_from_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let t = terminals(&[("PATH", "/usr/bin:/bin"), ("KEPT", "agent"), ("OVERRIDDEN", "agent")]);
        let script = "echo $KEPT $OVERRIDDEN $ADDED; pwd";
        let (_, output) = run(
            &t,
            json!({"command": "/bin/sh", "args": ["-c", script], "cwd": dir.path(),
                   "env": [{"name": "OVERRIDDEN", "value": "request"}, {"name": "ADDED", "value": "x"}]}),
        )
        .await;
        let pwd = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(output["output"], format!("agent request x\n{}\n", pwd.display()));

        // 10 × "日" is 30 bytes; 10 bytes keep 3 characters (9 bytes).
        let (_, output) = run(&t, json!({"command": "printf", "args": ["日日日日日日日日日日"], "outputByteLimit": 10})).await;
        assert_eq!(output["output"], "日日日");
        assert_eq!(output["truncated"], true);
    }

    #[tokio::test]
    async fn kill_ends_the_group_and_release_forgets_the_terminal() {
        let t = terminals(&[("PATH", "/usr/bin:/bin")]);
        // The background sleep is in the same group and dies with it.
        let id = t.create("s", Path::new("/"), params(json!({"command": "sh", "args": ["-c", "sleep 100 & echo started; wait"]}))).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while t.output("s", &id).await.unwrap()["output"] != "started\n" {
            assert!(tokio::time::Instant::now() < deadline, "no output");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pid = t.get("s", &id).unwrap().pid;
        assert!(t.output("s", &id).await.unwrap().get("exitStatus").is_none());
        t.kill("s", &id).unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(10), t.wait_for_exit("s", &id)).await.unwrap().unwrap();
        assert_eq!(exit, json!({"exitCode": null, "signal": "SIGKILL"}));
        // Still there after kill: output and status remain readable.
        let output = t.output("s", &id).await.unwrap();
        assert_eq!(output["output"], "started\n");
        assert_eq!(output["exitStatus"]["signal"], "SIGKILL");
        // The orphaned sleep is reaped by init here (by the supervisor in a
        // sandbox), a moment after the kill.
        while nix::sys::signal::killpg(Pid::from_raw(pid), None).is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "the group outlived the kill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Another session cannot see it; after release nobody can.
        assert!(matches!(t.output("other", &id).await, Err(TerminalError::Unknown(_))));
        t.release("s", &id).unwrap();
        assert!(matches!(t.output("s", &id).await, Err(TerminalError::Unknown(_))));
        assert!(matches!(t.release("s", &id), Err(TerminalError::Unknown(_))));
    }

    #[tokio::test]
    async fn release_kills_a_running_command() {
        let t = terminals(&[("PATH", "/usr/bin:/bin")]);
        let id = t.create("s", Path::new("/"), params(json!({"command": "sleep", "args": ["100"]}))).unwrap();
        let terminal = t.get("s", &id).unwrap();
        t.release("s", &id).unwrap();
        let mut exit = terminal.exit.clone();
        let status = tokio::time::timeout(Duration::from_secs(10), exit.wait_for(|e| e.is_some())).await.unwrap().unwrap();
        assert_eq!(*status, Some(Exit::Signal(9)));
    }

    #[tokio::test]
    async fn bad_requests_are_refused_clearly() {
        let t = terminals(&[("PATH", "/usr/bin:/bin")]);
        let e = t.create("s", Path::new("/"), params(json!({"command": "no-such-command-agentd"}))).unwrap_err();
        assert!(matches!(e, TerminalError::CommandNotFound(_)), "{e}");
        assert_eq!(e.to_string(), "command not found: no-such-command-agentd");
        let e = t.create("s", Path::new("/"), params(json!({"command": "true", "cwd": "relative"}))).unwrap_err();
        assert!(e.is_invalid_params(), "{e}");
        let e = t.create("s", Path::new("/"), params(json!({"command": "true", "cwd": "/no/such/dir"}))).unwrap_err();
        assert!(e.is_invalid_params(), "{e}");
        let e = t.create("s", Path::new("/"), params(json!({"command": "true", "env": [{"name": "A=B", "value": ""}]}))).unwrap_err();
        assert!(e.is_invalid_params(), "{e}");
        let e = t.create("s", Path::new("/"), params(json!({"command": ""}))).unwrap_err();
        assert!(e.is_invalid_params(), "{e}");
    }
}
