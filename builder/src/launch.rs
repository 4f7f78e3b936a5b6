//! The node's side of sandbox creation: run `agentd sandbox-init` and read its
//! report. The sandbox's PID 1 is a descendant: once `sandbox-init` exits it is
//! re-parented to the nearest subreaper, which the node makes itself.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::init::InitReport;
use crate::zygote::{NO_PARKED_WORKER, Request};
use crate::spec::{SandboxSpec, SpecError};

/// How long the kernel work may take before the node gives up. It normally
/// takes a few milliseconds; a stuck mount is the only thing that takes longer.
const INIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Launched {
    /// Host pid of the supervisor, PID 1 inside the sandbox.
    pub pid: i32,
    /// How long each step of the creation took, microseconds.
    pub steps: Vec<crate::init::Step>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("invalid sandbox spec: {0}")]
    Spec(#[from] SpecError),
    #[error("cannot run sandbox-init: {0}")]
    Spawn(std::io::Error),
    #[error("sandbox-init timed out after {0:?}")]
    Timeout(Duration),
    #[error("sandbox setup failed at {stage}: {message}")]
    Failed { stage: String, message: String },
    #[error("sandbox-init gave no report (exit {status}): {stderr}")]
    NoReport { status: String, stderr: String },
}

/// Builds the sandbox `spec` describes, with `exe` as the agentd binary.
pub async fn launch(exe: &Path, spec: &SandboxSpec) -> Result<Launched, LaunchError> {
    spec.validate()?;
    let input = serde_json::to_vec(spec).expect("spec serializes");
    let mut child = Command::new(exe)
        .arg("sandbox-init")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(LaunchError::Spawn)?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let run = async move {
        stdin.write_all(&input).await?;
        drop(stdin);
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(INIT_TIMEOUT, run)
        .await
        .map_err(|_| LaunchError::Timeout(INIT_TIMEOUT))?
        .map_err(LaunchError::Spawn)?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout.lines().rev().find_map(|l| serde_json::from_str::<InitReport>(l).ok());
    match report {
        Some(report) => launched(report),
        None => Err(LaunchError::NoReport {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }),
    }
}

/// A build's report as its result.
fn launched(report: InitReport) -> Result<Launched, LaunchError> {
    match report {
        InitReport::Ready { pid, steps } => Ok(Launched { pid, steps }),
        InitReport::Failed { stage, message } => Err(LaunchError::Failed { stage, message }),
        InitReport::Parked { pid } => {
            Err(LaunchError::NoReport { status: format!("a worker {pid} parked"), stderr: "not a build's report".into() })
        }
    }
}

/// The node's way to make sandboxes: one `agentd sandbox-init --zygote`
/// started on first use and kept ([`super::zygote`]), which forks a worker
/// per sandbox, so no sandbox pays for executing the agentd binary. Falls
/// back to a one-shot [`launch`] when the zygote cannot be started or fed;
/// a zygote that fails mid-request is dropped (killed) and replaced next time.
pub struct Launcher {
    exe: PathBuf,
    zygote: tokio::sync::Mutex<ZygoteState>,
}

#[derive(Default)]
struct ZygoteState {
    zygote: Option<Zygote>,
    /// Whether a zygote ever answered. One that exits before its first
    /// answer (a binary without `--zygote`, say) turns the zygote off.
    answered: bool,
    disabled: bool,
}

struct Zygote {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
}

impl Zygote {
    fn spawn(exe: &Path) -> std::io::Result<Self> {
        let mut child = Command::new(exe)
            .args(["sandbox-init", "--zygote"])
            .env_clear()
            // Its own process group: a terminal's Ctrl-C reaches the daemon
            // alone, which then stops (or, with live restore, leaves) its
            // sandboxes as it means to, rather than the zygote dying under it.
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
        Ok(Self { child, stdin, stdout })
    }

    async fn request(&mut self, request: &Request) -> Result<InitReport, LaunchError> {
        use tokio::io::AsyncBufReadExt;
        let input = serde_json::to_vec(request).expect("request serializes");
        let len = u32::try_from(input.len()).map_err(|_| LaunchError::Spawn(std::io::ErrorKind::InvalidInput.into()))?;
        let mut frame = len.to_le_bytes().to_vec();
        frame.extend_from_slice(&input);
        self.stdin.write_all(&frame).await.map_err(LaunchError::Spawn)?;
        self.stdin.flush().await.map_err(LaunchError::Spawn)?;
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).await.map_err(LaunchError::Spawn)?;
        serde_json::from_str(line.trim_end()).map_err(|_| LaunchError::NoReport {
            status: if n == 0 { "zygote exited".into() } else { "zygote answered garbage".into() },
            stderr: line.trim().to_string(),
        })
    }
}

impl Launcher {
    pub fn new(exe: PathBuf) -> Self {
        Self { exe, zygote: tokio::sync::Mutex::new(ZygoteState::default()) }
    }

    /// Ends the zygote, if one runs, and waits for it: at the node's stop,
    /// before its cgroup subtree goes (on pure v2 the zygote sits in the
    /// daemon's leaf, which cannot be removed while it lives). A later
    /// launch starts another.
    pub async fn stop(&self) {
        let zygote = self.zygote.lock().await.zygote.take();
        if let Some(mut z) = zygote {
            let _ = z.child.kill().await;
        }
    }

    /// Builds the sandbox `spec` describes.
    pub async fn launch(&self, spec: &SandboxSpec) -> Result<Launched, LaunchError> {
        spec.validate()?;
        match self.ask(&Request::Create(spec.clone())).await? {
            Some(report) => launched(report),
            None => launch(&self.exe, spec).await,
        }
    }

    /// Builds the sandbox `spec` describes with the worker parked in its
    /// cgroups ([`Self::park`]); `spec.cgroup_procs` lists only those the
    /// sandbox must still join. Fails at stage [`NO_PARKED_WORKER`] having
    /// done nothing when there is no such worker.
    pub async fn launch_parked(&self, spec: &SandboxSpec) -> Result<Launched, LaunchError> {
        spec.validate()?;
        match self.ask(&Request::CreateParked(spec.clone())).await? {
            Some(report) => launched(report),
            None => Err(LaunchError::Failed { stage: NO_PARKED_WORKER.into(), message: "no zygote".into() }),
        }
    }

    /// Has the zygote fork a worker that moves itself into these cgroups
    /// (`cgroup.procs` files) and waits there for [`Self::launch_parked`];
    /// returns its pid.
    pub async fn park(&self, cgroup_procs: Vec<std::path::PathBuf>) -> Result<i32, LaunchError> {
        match self.ask(&Request::Park { cgroup_procs }).await? {
            Some(InitReport::Parked { pid }) => Ok(pid),
            Some(InitReport::Failed { stage, message }) => Err(LaunchError::Failed { stage, message }),
            Some(InitReport::Ready { pid, .. }) => {
                Err(LaunchError::NoReport { status: format!("a sandbox {pid} built"), stderr: "not a park's answer".into() })
            }
            None => Err(LaunchError::Failed { stage: NO_PARKED_WORKER.into(), message: "no zygote".into() }),
        }
    }

    /// Sends `request` to the zygote, started if need be; `None` when there
    /// is no zygote to ask (it cannot be started, or never answered).
    async fn ask(&self, request: &Request) -> Result<Option<InitReport>, LaunchError> {
        let mut state = self.zygote.lock().await;
        if state.zygote.is_none() && !state.disabled {
            match Zygote::spawn(&self.exe) {
                Ok(z) => state.zygote = Some(z),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the sandbox-init zygote; executing sandbox-init per sandbox");
                    state.disabled = true;
                }
            }
        }
        let Some(z) = state.zygote.as_mut() else { return Ok(None) };
        match tokio::time::timeout(INIT_TIMEOUT, z.request(request)).await {
            Ok(Ok(report)) => {
                state.answered = true;
                Ok(Some(report))
            }
            Ok(Err(e)) => {
                // Killed on drop; its workers die with it.
                state.zygote = None;
                if !state.answered {
                    tracing::warn!(error = %e, "the sandbox-init zygote never answered; executing sandbox-init per sandbox");
                    state.disabled = true;
                    return Ok(None);
                }
                Err(e)
            }
            Err(_) => {
                state.zygote = None;
                Err(LaunchError::Timeout(INIT_TIMEOUT))
            }
        }
    }
}
