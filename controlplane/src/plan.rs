//! Compiles a session request into the plans a node executes. Northbound
//! payloads never reach a node: only what this module emits does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use agentd_proto::node::{AgentPlan, Mount, Resources, SandboxPlan};
use agentd_runtime::sandbox::Network;
use agentd_runtime::sandbox::profile::Profile;
use serde::Deserialize;

/// Where agent executables are mounted inside the sandbox.
const AGENT_MOUNT_ROOT: &str = "/opt/agentd/agents";
pub const WORKSPACE: &str = "/workspace";

/// An agent given inline, in the original agentd's shape.
#[derive(Debug, Clone, Deserialize)]
pub struct ManualAgent {
    pub id: String,
    pub version: String,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub protocol: Option<serde_json::Value>,
    pub distribution: Distribution,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Distribution {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub binary: Option<BinaryDistribution>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BinaryDistribution {
    #[serde(default)]
    pub url: Option<String>,
    pub executable: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SessionOptions {
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("distribution type {0:?} is not supported yet (supported: \"binary\")")]
    UnsupportedDistribution(String),
    #[error("distribution.binary is required for type \"binary\"")]
    MissingBinary,
    #[error("{field} must be an absolute path, got {value:?}")]
    NotAbsolute { field: &'static str, value: String },
    #[error("agent id {0:?} may only use letters, digits, '.', '_' and '-'")]
    BadAgentId(String),
    #[error("environment variable name {0:?} is invalid")]
    BadEnvName(String),
}

pub struct Compiled {
    pub sandbox: SandboxPlan,
    pub agent: AgentPlan,
    pub working_dir: String,
}

/// Settings of the control plane that shape every plan.
#[derive(Debug, Clone)]
pub struct PlanDefaults {
    pub initialize_timeout_ms: u32,
}

fn absolute(field: &'static str, value: &str) -> Result<(), PlanError> {
    let p = Path::new(value);
    if !p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(PlanError::NotAbsolute { field, value: value.to_string() });
    }
    Ok(())
}

pub fn compile(
    container_id: &str,
    agent: &ManualAgent,
    session: &SessionOptions,
    profile: &Profile,
    defaults: &PlanDefaults,
) -> Result<Compiled, PlanError> {
    if agent.id.is_empty() || !agent.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(PlanError::BadAgentId(agent.id.clone()));
    }
    if agent.distribution.kind != "binary" {
        return Err(PlanError::UnsupportedDistribution(agent.distribution.kind.clone()));
    }
    let binary = agent.distribution.binary.as_ref().ok_or(PlanError::MissingBinary)?;
    absolute("distribution.binary.executable", &binary.executable)?;
    let working_dir = session.working_dir.clone().unwrap_or_else(|| WORKSPACE.to_string());
    absolute("session.working_dir", &working_dir)?;

    let file_name = Path::new(&binary.executable).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let command = format!("{AGENT_MOUNT_ROOT}/{}/{file_name}", agent.id);

    // The agent's whole environment: nothing of the daemon's is inherited.
    let mut env: HashMap<String, String> = HashMap::from([
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), WORKSPACE.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TMPDIR".into(), "/tmp".into()),
    ]);
    for (name, value) in &binary.env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(PlanError::BadEnvName(name.clone()));
        }
        env.insert(name.clone(), value.clone());
    }

    let sandbox = SandboxPlan {
        container_id: container_id.to_string(),
        hostname: "sandbox".into(),
        mounts: vec![Mount { source: binary.executable.clone(), target: command.clone(), read_only: true, role: "agent".into() }],
        workspace_path: WORKSPACE.into(),
        resources: Some(Resources {
            memory_bytes: profile.memory_bytes.unwrap_or(0),
            pids_max: profile.pids_max.unwrap_or(0),
            cpus: profile.cpus.unwrap_or(0.0),
        }),
        network: match profile.network {
            Network::None => "none".into(),
            Network::Host => "host".into(),
        },
        rootfs: profile.rootfs.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
    };
    let agent_plan = AgentPlan {
        agent_id: agent.id.clone(),
        version: agent.version.clone(),
        command,
        args: binary.args.clone(),
        env,
        cwd: working_dir.clone(),
        initialize_timeout_ms: defaults.initialize_timeout_ms,
        seccomp_json: profile.seccomp_json.clone().unwrap_or_default(),
        ..Default::default()
    };
    Ok(Compiled { sandbox, agent: agent_plan, working_dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(executable: &str) -> ManualAgent {
        serde_json::from_value(serde_json::json!({
            "id": "echo-local", "version": "1.0.0", "source": "manual",
            "protocol": {"auth_modes": ["agent"]},
            "distribution": {"type": "binary", "binary": {"url": format!("file://{executable}"), "executable": executable,
                "env": {"ECHO_MODE": "fast"}}}
        }))
        .unwrap()
    }

    const DEFAULTS: PlanDefaults = PlanDefaults { initialize_timeout_ms: 1000 };

    #[test]
    fn compiles_the_manual_agent_shape() {
        let c = compile("ctr_1", &agent("/opt/bin/echo-agent"), &SessionOptions::default(), &Profile::default(), &DEFAULTS).unwrap();
        assert_eq!(c.agent.command, "/opt/agentd/agents/echo-local/echo-agent");
        assert_eq!(c.sandbox.mounts[0].source, "/opt/bin/echo-agent");
        assert!(c.sandbox.mounts[0].read_only);
        assert_eq!(c.agent.cwd, "/workspace");
        assert_eq!(c.agent.env["ECHO_MODE"], "fast");
        assert_eq!(c.agent.env["PATH"], "/usr/local/bin:/usr/bin:/bin");
        assert_eq!(c.agent.env.len(), 5, "only the plan's variables: {:?}", c.agent.env);
    }

    #[test]
    fn refuses_relative_paths_and_unknown_distributions() {
        let e = compile("ctr_1", &agent("echo-agent"), &SessionOptions::default(), &Profile::default(), &DEFAULTS).err();
        assert!(matches!(e, Some(PlanError::NotAbsolute { .. })));
        let mut a = agent("/bin/x");
        a.distribution.kind = "npx".into();
        assert_eq!(compile("ctr_1", &a, &SessionOptions::default(), &Profile::default(), &DEFAULTS).err(), Some(PlanError::UnsupportedDistribution("npx".into())));
        let s = SessionOptions { working_dir: Some("../etc".into()) };
        assert!(matches!(compile("ctr_1", &agent("/bin/x"), &s, &Profile::default(), &DEFAULTS), Err(PlanError::NotAbsolute { .. })));
    }

    #[test]
    fn refuses_agent_ids_that_could_escape_the_mount_root() {
        let mut a = agent("/bin/x");
        a.id = "../../etc".into();
        assert!(matches!(compile("ctr_1", &a, &SessionOptions::default(), &Profile::default(), &DEFAULTS), Err(PlanError::BadAgentId(_))));
    }
}
