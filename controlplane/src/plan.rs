//! Compiles a session request into the plans a node executes. Northbound
//! payloads never reach a node: only what this module emits does.
//!
//! The agent comes in as a validated [`AgentSpec`] (from the registry or a
//! session's `manual_agent`); [`compile`] picks its distribution for the
//! node's platform and turns it into mounts, bundles and a command:
//! - an archive: a [`BundleMount`] the node fetches, checks and unpacks into
//!   its cache, bound read-only at `/opt/agentd/agents/<id>`; the command is
//!   `cmd` under that mount point;
//! - an executable on the node: bound read-only at
//!   `/opt/agentd/agents/<id>/<file name>`;
//! - npx / uvx: `npx -y <package> args` or `uvx <package> args` run inside the
//!   sandbox from the host's `/usr`, with their caches in the workspace and
//!   the host's network (they download the package) unless the profile names
//!   a network mode itself.

use std::collections::HashMap;
use std::path::{Component, Path};

use agentd_proto::node::{AgentFiles, AgentPlan, BundleMount, Mount, Resources, SandboxPlan, agent_files, mount};
use agentd_plan::Network;
use agentd_plan::Profile;
use serde::Deserialize;

use crate::agent_spec::{AgentSpec, Launch, SpecError};

/// Where agent executables and bundles are mounted inside the sandbox.
const AGENT_MOUNT_ROOT: &str = "/opt/agentd/agents";
pub const WORKSPACE: &str = "/workspace";

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SessionOptions {
    #[serde(default)]
    pub working_dir: Option<String>,
    /// ACP `mcpServers` for `session/new` / `session/load` (see [`crate::mcp`]).
    #[serde(default)]
    pub mcp_servers: Option<serde_json::Value>,
    /// An ACP session id the agent keeps: `session/load` it (its history
    /// replayed on the new session's stream) instead of `session/new`.
    #[serde(default)]
    pub load_session_id: Option<String>,
    /// An ACP session id the agent keeps: `session/resume` it (no replay).
    #[serde(default)]
    pub resume_session_id: Option<String>,
    /// Further roots of the session's files besides the working directory
    /// (see [`additional_directories`]).
    #[serde(default)]
    pub additional_directories: Option<Vec<String>>,
}

/// Most additional directories a session takes.
pub const MAX_ADDITIONAL_DIRECTORIES: usize = 32;

/// Kernel interfaces an agent's files must never reach through the
/// supervisor: `/proc/self` there is the supervisor itself.
const NOT_FILES: &[&str] = &["/proc", "/sys", "/dev"];

/// Checks `session.additional_directories`: absolute sandbox paths without
/// `.` or `..`, not `/` (it would lift the confinement), nothing under
/// `/proc`, `/sys` or `/dev`, no repeats, at most
/// [`MAX_ADDITIONAL_DIRECTORIES`]. Whether each exists is the sandbox's
/// business: the supervisor creates missing ones (so they must lie where
/// the sandbox can write, e.g. under `/workspace` or `/tmp`, unless they
/// exist) and a failure there fails the session. Returns them normalized
/// (no trailing or doubled `/`).
pub fn additional_directories(session: &SessionOptions) -> Result<Vec<String>, String> {
    let Some(dirs) = &session.additional_directories else { return Ok(Vec::new()) };
    if dirs.len() > MAX_ADDITIONAL_DIRECTORIES {
        return Err(format!("session.additional_directories has {} entries; at most {MAX_ADDITIONAL_DIRECTORIES}", dirs.len()));
    }
    let mut normalized: Vec<String> = Vec::with_capacity(dirs.len());
    for (i, dir) in dirs.iter().enumerate() {
        let bad = |why: &str| format!("session.additional_directories[{i}] {dir:?} {why}");
        let path = Path::new(dir);
        if !path.is_absolute() {
            return Err(bad("is not an absolute path"));
        }
        if dir.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("has a `.` or `..` component"));
        }
        let clean: std::path::PathBuf = path.components().collect();
        if clean == Path::new("/") {
            return Err(bad("is the sandbox's root: that would lift the confinement of the session's files"));
        }
        if NOT_FILES.iter().any(|k| clean.starts_with(k)) {
            return Err(bad("is under /proc, /sys or /dev: not a directory of files"));
        }
        let clean = clean.display().to_string();
        if normalized.contains(&clean) {
            return Err(bad("is given twice"));
        }
        normalized.push(clean);
    }
    Ok(normalized)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("{field} must be an absolute path, got {value:?}")]
    NotAbsolute { field: &'static str, value: String },
    #[error(transparent)]
    NoDistribution(SpecError),
    #[error(
        "an {0} agent fetches its package over the host's network, which a sandbox with secrets cannot have: name container_profile.network (\"none\" with a warmed cache)"
    )]
    SecretsNeedOwnNetwork(&'static str),
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

/// The container profile as the plan needs it.
pub struct ProfileInput<'a> {
    pub profile: &'a Profile,
    /// Whether the request named a network mode; if not, npx and uvx agents
    /// get the host's network to download their package.
    pub network_given: bool,
}

/// A session's working directory: absolute, or relative to the workspace
/// (the original agentd's `"working_dir": "."` is the workspace itself).
fn working_dir(given: Option<&str>) -> Result<String, PlanError> {
    let dir = match given {
        None | Some("." | "./" | "") => return Ok(WORKSPACE.to_string()),
        Some(d) if d.starts_with('/') => d.to_string(),
        Some(d) => format!("{WORKSPACE}/{}", d.trim_start_matches("./").trim_end_matches('/')),
    };
    absolute("session.working_dir", &dir)?;
    Ok(dir)
}

fn absolute(field: &'static str, value: &str) -> Result<(), PlanError> {
    let p = Path::new(value);
    if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(PlanError::NotAbsolute { field, value: value.to_string() });
    }
    Ok(())
}

/// What the chosen distribution adds to the plan.
struct Launched {
    command: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<Mount>,
    bundles: Vec<BundleMount>,
    needs_network: bool,
}

fn launch(agent: &AgentSpec, platform: &str) -> Result<Launched, PlanError> {
    let mount_root = format!("{AGENT_MOUNT_ROOT}/{}", agent.id);
    let chosen = agent.launch_for(platform).map_err(PlanError::NoDistribution)?;
    let own_env = |env: &std::collections::BTreeMap<String, String>| env.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>();
    Ok(match chosen {
        Launch::Archive(t) => {
            // The spec holds cmd to plain components, so this stays under the mount.
            let cmd: std::path::PathBuf = Path::new(&t.cmd).components().filter(|c| matches!(c, Component::Normal(_))).collect();
            Launched {
                command: format!("{mount_root}/{}", cmd.display()),
                args: t.args.clone(),
                env: own_env(&t.env),
                mounts: Vec::new(),
                bundles: vec![BundleMount {
                    archive_url: t.archive.clone(),
                    sha256: t.sha256.clone().unwrap_or_default().to_ascii_lowercase(),
                    target: mount_root,
                }],
                needs_network: false,
            }
        }
        Launch::Local(l) => {
            let file_name = Path::new(&l.executable).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let command = format!("{mount_root}/{file_name}");
            Launched {
                mounts: vec![Mount { source: l.executable.clone(), target: command.clone(), read_only: true, role: mount::Role::Agent.into() }],
                command,
                args: l.args.clone(),
                env: own_env(&l.env),
                bundles: Vec::new(),
                needs_network: false,
            }
        }
        Launch::Npx(p) => {
            let mut args = vec!["-y".to_string(), p.package.clone()];
            args.extend(p.args.iter().cloned());
            let mut env = vec![
                ("npm_config_cache".to_string(), format!("{WORKSPACE}/.npm")),
                ("npm_config_update_notifier".to_string(), "false".to_string()),
                // npx -y would post the package's tree to the registry's
                // audit endpoint at every start: time, and no one reads it.
                ("npm_config_audit".to_string(), "false".to_string()),
                ("npm_config_fund".to_string(), "false".to_string()),
                ("NO_UPDATE_NOTIFIER".to_string(), "1".to_string()),
            ];
            env.extend(own_env(&p.env));
            Launched { command: "npx".into(), args, env, mounts: Vec::new(), bundles: Vec::new(), needs_network: true }
        }
        Launch::Uvx(p) => {
            let mut args = vec![p.package.clone()];
            args.extend(p.args.iter().cloned());
            let mut env = vec![("UV_CACHE_DIR".to_string(), format!("{WORKSPACE}/.cache/uv"))];
            env.extend(own_env(&p.env));
            Launched { command: "uvx".into(), args, env, mounts: Vec::new(), bundles: Vec::new(), needs_network: true }
        }
    })
}

pub fn compile(
    container_id: &str,
    agent: &AgentSpec,
    platform: &str,
    session: &SessionOptions,
    profile: ProfileInput<'_>,
    defaults: &PlanDefaults,
) -> Result<Compiled, PlanError> {
    let working_dir = working_dir(session.working_dir.as_deref())?;
    let launched = launch(agent, platform)?;

    // The agent's whole environment: nothing of the daemon's is inherited.
    let mut env: HashMap<String, String> = HashMap::from([
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), WORKSPACE.into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TMPDIR".into(), "/tmp".into()),
    ]);
    env.extend(launched.env);

    let network = match &profile.profile.network {
        Network::None if launched.needs_network && !profile.network_given => {
            // The secrets proxy would listen on the host's loopback.
            if !profile.profile.secrets.is_empty() {
                return Err(PlanError::SecretsNeedOwnNetwork(if launched.command == "npx" { "npx" } else { "uvx" }));
            }
            Network::Host
        }
        other => other.clone(),
    };
    let mut sandbox = compile_sandbox(container_id, profile.profile);
    let (mode, egress) = agentd_proto::convert::network_plan(&network);
    sandbox.network = mode.into();
    sandbox.egress = egress;
    sandbox.mounts = launched.mounts;
    sandbox.bundles = launched.bundles;
    let agent_plan = AgentPlan {
        agent_id: agent.id.clone(),
        version: agent.version.clone(),
        command: launched.command,
        args: launched.args,
        env,
        cwd: working_dir.clone(),
        initialize_timeout_ms: defaults.initialize_timeout_ms,
        ..Default::default()
    };
    Ok(Compiled { sandbox, agent: agent_plan, working_dir })
}

/// The plan of a sandbox shaped by `profile` alone, with no agent yet (a
/// container made on its own: its sessions' agents bring their files).
pub fn compile_sandbox(container_id: &str, profile: &Profile) -> SandboxPlan {
    let (network, egress) = agentd_proto::convert::network_plan(&profile.network);
    SandboxPlan {
        container_id: container_id.to_string(),
        hostname: "sandbox".into(),
        mounts: Vec::new(),
        workspace_path: WORKSPACE.into(),
        resources: Some(Resources {
            memory_bytes: profile.memory_bytes.unwrap_or(0),
            pids_max: profile.pids_max.unwrap_or(0),
            cpus: profile.cpus.unwrap_or(0.0),
        }),
        network: network.into(),
        egress,
        rootfs: profile.rootfs.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        bundles: Vec::new(),
        seccomp: profile.seccomp.as_ref().map(agentd_proto::convert::seccomp_message),
        secrets: profile.secrets.iter().map(agentd_proto::convert::secret_message).collect(),
    }
}

/// The agent plan of `compiled` for a container that already runs: its
/// sandbox may have been built without this agent's files (mounts and
/// bundles are made at create), so they go with the plan
/// (`AgentPlan::files`) for the node to put in the workspace when the
/// command is not in the sandbox. An agent with no files of its own (npx,
/// uvx) is unchanged.
pub fn delivered(compiled: &Compiled) -> AgentPlan {
    let mut plan = compiled.agent.clone();
    let root = format!("{AGENT_MOUNT_ROOT}/{}/", plan.agent_id);
    let source = if let Some(b) = compiled.sandbox.bundles.iter().find(|b| format!("{}/", b.target) == root) {
        agent_files::Source::Bundle(b.clone())
    } else if let Some(m) = compiled.sandbox.mounts.iter().find(|m| m.role() == mount::Role::Agent) {
        agent_files::Source::HostExecutable(m.source.clone())
    } else {
        return plan;
    };
    let Some(relative) = plan.command.strip_prefix(&root).map(str::to_string) else { return plan };
    plan.files = Some(AgentFiles {
        source: Some(source),
        workspace_path: compiled.sandbox.workspace_path.clone(),
        relative_dir: format!(".agentd/agents/{}", plan.agent_id),
        relative_command: relative,
    });
    plan
}

#[cfg(test)]
mod tests {
    use agentd_proto::node::NetworkMode;
    use serde_json::{Value, json};

    use super::*;

    const DEFAULTS: PlanDefaults = PlanDefaults { initialize_timeout_ms: 1000 };
    const SHA: &str = "2B7E1B9D4B4E4C0C7F0A8A0B6F1C1D2E3F405162738495A6B7C8D9EAFB0C1D2E";

    fn spec(value: Value) -> AgentSpec {
        AgentSpec::from_json(&value).unwrap()
    }

    fn local(executable: &str) -> AgentSpec {
        spec(json!({
            "id": "echo-local", "version": "1.0.0", "source": "manual",
            "protocol": {"auth_modes": ["agent"]},
            "distribution": {"type": "binary", "binary": {"url": format!("file://{executable}"), "executable": executable,
                "env": {"ECHO_MODE": "fast"}}}
        }))
    }

    fn build(agent: &AgentSpec, profile: &Profile, network_given: bool) -> Result<Compiled, PlanError> {
        compile("ctr_1", agent, "linux-x86_64", &SessionOptions::default(), ProfileInput { profile, network_given }, &DEFAULTS)
    }

    #[test]
    fn compiles_an_executable_on_the_node() {
        let c = build(&local("/opt/bin/echo-agent"), &Profile::default(), false).unwrap();
        assert_eq!(c.agent.command, "/opt/agentd/agents/echo-local/echo-agent");
        assert_eq!(c.sandbox.mounts[0].source, "/opt/bin/echo-agent");
        assert!(c.sandbox.mounts[0].read_only);
        assert!(c.sandbox.bundles.is_empty());
        assert_eq!(c.sandbox.network(), NetworkMode::None);
        assert_eq!(c.agent.cwd, "/workspace");
        assert_eq!(c.agent.env["ECHO_MODE"], "fast");
        assert_eq!(c.agent.env["PATH"], "/usr/local/bin:/usr/bin:/bin");
        assert_eq!(c.agent.env.len(), 5, "only the plan's variables: {:?}", c.agent.env);
    }

    #[test]
    fn a_relative_working_dir_is_in_the_workspace() {
        assert_eq!(working_dir(None).unwrap(), "/workspace");
        assert_eq!(working_dir(Some(".")).unwrap(), "/workspace");
        assert_eq!(working_dir(Some("src/app")).unwrap(), "/workspace/src/app");
        assert_eq!(working_dir(Some("./src")).unwrap(), "/workspace/src");
        assert_eq!(working_dir(Some("/srv")).unwrap(), "/srv");
        assert!(working_dir(Some("../etc")).is_err());
    }

    #[test]
    fn an_agent_for_a_running_container_carries_its_files() {
        let c = build(&local("/opt/bin/echo-agent"), &Profile::default(), false).unwrap();
        let plan = delivered(&c);
        assert_eq!(plan.command, "/opt/agentd/agents/echo-local/echo-agent", "where a sandbox built with it has it");
        let files = plan.files.unwrap();
        assert_eq!(files.relative_command, "echo-agent");
        assert_eq!(files.source, Some(agent_files::Source::HostExecutable("/opt/bin/echo-agent".into())));
        assert_eq!((files.workspace_path.as_str(), files.relative_dir.as_str()), ("/workspace", ".agentd/agents/echo-local"));

        let archive = spec(json!({"id": "codex-acp", "version": "1", "distribution": {"binary": {"linux-x86_64":
            {"archive": "https://example.invalid/codex.tar.gz", "sha256": SHA, "cmd": "./bin/codex-acp"}}}}));
        let plan = delivered(&build(&archive, &Profile::default(), false).unwrap());
        assert_eq!(plan.files.as_ref().unwrap().relative_command, "bin/codex-acp");
        assert!(matches!(plan.files.unwrap().source, Some(agent_files::Source::Bundle(b)) if b.archive_url.ends_with("codex.tar.gz")));

        let npx = spec(json!({"id": "g", "version": "1", "distribution": {"npx": {"package": "p@1"}}}));
        let plan = delivered(&build(&npx, &Profile::default(), false).unwrap());
        assert!(plan.files.is_none() && plan.command == "npx", "nothing to deliver");
    }

    #[test]
    fn compiles_a_registry_archive_into_a_bundle_mount() {
        let agent = spec(json!({"id": "codex-acp", "name": "Codex", "version": "0.5.1", "description": "",
            "distribution": {"binary": {"linux-x86_64": {"archive": "https://example.invalid/codex.tar.gz", "sha256": SHA,
                "cmd": "./bin/codex-acp", "args": ["--acp"], "env": {"RUST_LOG": "warn"}}}}}));
        let c = build(&agent, &Profile::default(), false).unwrap();
        assert_eq!(c.sandbox.bundles.len(), 1);
        let b = &c.sandbox.bundles[0];
        assert_eq!((b.archive_url.as_str(), b.sha256.as_str(), b.target.as_str()),
            ("https://example.invalid/codex.tar.gz", SHA.to_ascii_lowercase().as_str(), "/opt/agentd/agents/codex-acp"));
        assert_eq!(c.agent.command, "/opt/agentd/agents/codex-acp/bin/codex-acp");
        assert_eq!(c.agent.args, ["--acp"]);
        assert_eq!(c.agent.env["RUST_LOG"], "warn");
        assert!(c.sandbox.mounts.is_empty());
        assert_eq!(c.sandbox.network(), NetworkMode::None, "a bundle needs no network");
    }

    #[test]
    fn compiles_npx_and_uvx_to_run_inside_the_sandbox() {
        let npx = spec(json!({"id": "gemini", "version": "1", "distribution": {"npx": {"package": "@google/gemini-cli@1.0.0",
            "args": ["--experimental-acp"], "env": {"GEMINI_API_KEY": "k"}}}}));
        let c = build(&npx, &Profile::default(), false).unwrap();
        assert_eq!(c.agent.command, "npx");
        assert_eq!(c.agent.args, ["-y", "@google/gemini-cli@1.0.0", "--experimental-acp"]);
        assert_eq!(c.agent.env["HOME"], "/workspace");
        assert_eq!(c.agent.env["npm_config_cache"], "/workspace/.npm");
        assert_eq!(c.agent.env["npm_config_audit"], "false");
        assert_eq!(c.agent.env["GEMINI_API_KEY"], "k");
        assert_eq!(c.sandbox.network(), NetworkMode::Host, "npx downloads its package");
        assert!(c.sandbox.mounts.is_empty() && c.sandbox.bundles.is_empty());

        // A profile that names its network keeps it (an offline, warmed cache).
        let offline = Profile::from_json(&json!({"network": "none"})).unwrap();
        assert_eq!(build(&npx, &offline, true).unwrap().sandbox.network(), NetworkMode::None);

        let uvx = spec(json!({"id": "fast-agent", "version": "1", "distribution": {"type": "uvx", "uvx": {"package": "fast-agent-acp==0.2", "args": ["serve"]}}}));
        let c = build(&uvx, &Profile::default(), false).unwrap();
        assert_eq!((c.agent.command.as_str(), c.agent.args.as_slice()), ("uvx", &["fast-agent-acp==0.2".to_string(), "serve".to_string()][..]));
        assert_eq!(c.agent.env["UV_CACHE_DIR"], "/workspace/.cache/uv");
        assert_eq!(c.sandbox.network(), NetworkMode::Host);
    }

    /// Secrets travel as references; the host's network, which would share
    /// their proxy with the host, is never chosen for them.
    #[test]
    fn secrets_travel_as_references_and_keep_the_sandbox_off_the_host_network() {
        let secret = json!({"name": "GEMINI_API_KEY", "upstream": "https://generativelanguage.googleapis.com", "header": "x-goog-api-key",
            "env": "GOOGLE_GEMINI_BASE_URL"});
        let with_secret = Profile::from_json(&json!({"secrets": [secret]})).unwrap();
        let c = build(&local("/opt/bin/echo-agent"), &with_secret, false).unwrap();
        assert_eq!(c.sandbox.secrets.len(), 1);
        assert_eq!(c.sandbox.secrets[0].upstream, "https://generativelanguage.googleapis.com");
        assert_eq!(agentd_proto::convert::secrets(&c.sandbox.secrets).unwrap(), with_secret.secrets);

        let npx = spec(json!({"id": "gemini", "version": "1", "distribution": {"npx": {"package": "@google/gemini-cli@1.0.0"}}}));
        let e = build(&npx, &with_secret, false).err().unwrap();
        assert!(matches!(e, PlanError::SecretsNeedOwnNetwork("npx")), "{e}");
        let offline = Profile::from_json(&json!({"secrets": [secret], "network": "none"})).unwrap();
        assert_eq!(build(&npx, &offline, true).unwrap().sandbox.network(), NetworkMode::None);
    }

    #[test]
    fn an_agent_without_a_distribution_for_the_platform_is_refused() {
        let agent = spec(json!({"id": "mac-only", "version": "1", "distribution": {"binary": {"darwin-aarch64": {"archive": "https://x/a.tar.gz", "cmd": "a"}}}}));
        assert!(matches!(build(&agent, &Profile::default(), false), Err(PlanError::NoDistribution(SpecError::NoDistributionForPlatform { .. }))));
    }

    #[test]
    fn checks_additional_directories() {
        let dirs = |list: &[&str]| {
            let s = SessionOptions { additional_directories: Some(list.iter().map(|d| d.to_string()).collect()), ..Default::default() };
            additional_directories(&s)
        };
        assert_eq!(dirs(&["/workspace/shared/", "//tmp//notes"]).unwrap(), ["/workspace/shared", "/tmp/notes"]);
        assert_eq!(additional_directories(&SessionOptions::default()).unwrap(), Vec::<String>::new());
        for (bad, why) in [
            (vec!["shared"], "absolute"),
            (vec!["/workspace/../etc"], ".."),
            (vec!["/workspace/./x"], ".."),
            (vec!["/"], "root"),
            (vec!["/proc/1"], "/proc"),
            (vec!["/dev"], "/proc"),
            (vec!["/tmp/a", "/tmp/a/"], "twice"),
        ] {
            let e = dirs(&bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let many: Vec<String> = (0..=MAX_ADDITIONAL_DIRECTORIES).map(|i| format!("/tmp/{i}")).collect();
        assert!(dirs(&many.iter().map(String::as_str).collect::<Vec<_>>()).unwrap_err().contains("at most"));
    }

    #[test]
    fn refuses_a_relative_working_dir() {
        let s = SessionOptions { working_dir: Some("../etc".into()), ..Default::default() };
        let r = compile("ctr_1", &local("/bin/x"), "linux-x86_64", &s, ProfileInput { profile: &Profile::default(), network_given: false }, &DEFAULTS);
        assert!(matches!(r, Err(PlanError::NotAbsolute { .. })));
    }
}
