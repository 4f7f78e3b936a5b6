//! The node's side of sandbox creation: run `agentd sandbox-init` and read its
//! report. The sandbox's PID 1 is a descendant: once `sandbox-init` exits it is
//! re-parented to the nearest subreaper, which the node makes itself.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::init::InitReport;
use super::spec::{SandboxSpec, SpecError};

/// How long the kernel work may take before the node gives up. It normally
/// takes a few milliseconds; a stuck mount is the only thing that takes longer.
const INIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy)]
pub struct Launched {
    /// Host pid of the supervisor, PID 1 inside the sandbox.
    pub pid: i32,
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
        Some(InitReport::Ready { pid }) => Ok(Launched { pid }),
        Some(InitReport::Failed { stage, message }) => Err(LaunchError::Failed { stage, message }),
        None => Err(LaunchError::NoReport {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }),
    }
}
