//! What only an operator may ask for: whatever reaches the node's own files
//! or network. A `file://` bundle, an executable already on the node and a
//! root filesystem read host paths; a seccomp policy loosens the kernel's
//! guard; `network: host` (named, or implied by an npx/uvx agent that
//! downloads its package) opens the host's network, its loopback services
//! included; a registry sync from a path or a URL of the caller's choice
//! reads a host file or makes the control plane fetch anything.
//!
//! An admin token (or an API run without tokens, on loopback by the
//! operator's choice) may do all of it. Other callers may use host paths
//! under `allowed_host_paths` and registry sources in
//! `allowed_registry_sources`, both the operator's config. Agents of the
//! synced registry are the operator's choice already and are not checked.

use std::path::{Component, Path, PathBuf};

use agentd_plan::{Network, Profile};

use crate::agent_spec::{AgentSpec, Launch};
use crate::domain::{Class, Code, Refusal};

/// Who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// An admin token, or an API without tokens.
    Operator,
    /// A `read` or `write` token.
    User,
}

/// The operator's config: what other callers may use.
#[derive(Debug, Clone, Default)]
pub struct Allowances {
    /// Host directories (or files) whose paths any writer may name.
    pub host_paths: Vec<PathBuf>,
    /// Registry sources (paths or URLs, exactly as written) any writer may
    /// sync from.
    pub registry_sources: Vec<String>,
}

impl Allowances {
    fn allows_path(&self, path: &Path) -> bool {
        // `..` would climb out of an allowed directory; callers' paths are
        // checked to have none, this holds it for anything else.
        let plain = path.is_absolute() && !path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir));
        plain && self.host_paths.iter().any(|allowed| path.starts_with(allowed))
    }
}

const CODE: Code = Code::OperatorPower;

fn refuse(field: &str, what: &str) -> Refusal {
    Refusal::new(
        Class::Forbidden,
        CODE,
        format!("{field}: {what} is an operator power: it needs a token of scope admin"),
    )
}

fn refuse_path(field: &str, path: &str) -> Refusal {
    Refusal::new(
        Class::Forbidden,
        CODE,
        format!(
            "{field}: {path:?} is a path on the node: it needs a token of scope admin, or a path under the operator's allowed_host_paths"
        ),
    )
}

/// Checks a new container's profile. `prefix` names it as the request did
/// (`container_profile` or `profile`); `network_given`: the request named a
/// network (else an agent that downloads its package gets the host's).
pub fn check_profile(
    who: Authority,
    allow: &Allowances,
    prefix: &str,
    profile: &Profile,
    network_given: bool,
    agent_needs_network: bool,
) -> Result<(), Refusal> {
    if who == Authority::Operator {
        return Ok(());
    }
    if let Some(rootfs) = &profile.rootfs
        && !allow.allows_path(rootfs)
    {
        return Err(refuse_path(&format!("{prefix}.rootfs"), &rootfs.display().to_string()));
    }
    if profile.seccomp.is_some() {
        return Err(refuse(&format!("{prefix}.seccomp"), "a seccomp policy of the caller's"));
    }
    // The node's secrets go to the upstream the profile names, dialled from
    // the node's own network: a caller choosing it could send a key anywhere
    // the node reaches.
    if !profile.secrets.is_empty() {
        return Err(refuse(&format!("{prefix}.secrets"), "the node's secrets, sent to an upstream of the caller's choosing,"));
    }
    match profile.network {
        Network::Host => return Err(refuse(&format!("{prefix}.network"), "the host's network")),
        Network::None if agent_needs_network && !network_given => {
            return Err(refuse(
                &format!("{prefix}.network"),
                "the host's network, which an npx or uvx agent gets to download its package unless the profile names a network,",
            ));
        }
        Network::None => {}
        // An allow-list confines the sandbox: no power needed.
        Network::Egress(_) => {}
    }
    Ok(())
}

/// Checks an agent the caller defined (`manual_agent`), as it launches on
/// `platform`.
pub fn check_manual_agent(who: Authority, allow: &Allowances, agent: &AgentSpec, platform: &str) -> Result<(), Refusal> {
    if who == Authority::Operator {
        return Ok(());
    }
    match agent.launch_for(platform) {
        Ok(Launch::Archive(target)) => match target.archive.strip_prefix("file://") {
            Some(path) if !allow.allows_path(Path::new(path)) => Err(refuse_path("manual_agent.distribution.binary.url", path)),
            _ => Ok(()),
        },
        Ok(Launch::Local(local)) if !allow.allows_path(Path::new(&local.executable)) => {
            Err(refuse_path("manual_agent.distribution.binary.executable", &local.executable))
        }
        // npx/uvx need the network: `check_profile` rules on it; no launch
        // for this platform is refused where the plan is made.
        _ => Ok(()),
    }
}

/// Checks a registry sync's `source` (`None`: the configured registry).
pub fn check_registry_source(who: Authority, allow: &Allowances, source: Option<&str>) -> Result<(), Refusal> {
    match source {
        Some(source) if who == Authority::User && !allow.registry_sources.iter().any(|s| s == source) => Err(Refusal::new(
            Class::Forbidden,
            CODE,
            format!(
                "source: syncing from {source:?} is an operator power: it needs a token of scope admin, or a source in the operator's allowed_registry_sources (without a source the configured registry syncs)"
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn profile(value: serde_json::Value) -> Profile {
        Profile::from_json(&value).unwrap()
    }

    fn allow(paths: &[&str]) -> Allowances {
        Allowances { host_paths: paths.iter().map(PathBuf::from).collect(), registry_sources: vec!["https://r.example/a.json".into()] }
    }

    fn field(r: Result<(), Refusal>) -> String {
        let r = r.unwrap_err();
        assert_eq!((r.class, r.code), (Class::Forbidden, CODE));
        r.detail.split(':').next().unwrap().to_string()
    }

    #[test]
    fn users_are_refused_host_powers_naming_the_field() {
        let none = allow(&[]);
        let user = Authority::User;
        assert_eq!(field(check_profile(user, &none, "container_profile", &profile(json!({"network": "host"})), true, false)), "container_profile.network");
        assert_eq!(field(check_profile(user, &none, "profile", &profile(json!({"rootfs": "/srv/root"})), false, false)), "profile.rootfs");
        let seccomp = profile(json!({"seccomp": {"main": {"default_action": "allow", "filter_action": {"errno": 1}, "filter": [{"syscall": "acct"}]}}}));
        assert_eq!(field(check_profile(user, &none, "container_profile", &seccomp, false, false)), "container_profile.seccomp");
        // npx without a named network would get the host's.
        assert_eq!(field(check_profile(user, &none, "container_profile", &Profile::default(), false, true)), "container_profile.network");
        assert!(check_profile(user, &none, "container_profile", &profile(json!({"network": "none"})), true, true).is_ok());
        assert!(check_profile(user, &none, "container_profile", &Profile::default(), false, false).is_ok());
        let secret = profile(json!({"secrets": [{"name": "API_KEY", "upstream": "https://api.example.com", "header": "x-api-key", "env": "API_BASE_URL"}]}));
        assert_eq!(field(check_profile(user, &none, "container_profile", &secret, false, false)), "container_profile.secrets");
        assert!(check_profile(Authority::Operator, &none, "container_profile", &secret, false, false).is_ok());
    }

    #[test]
    fn operators_may_do_anything() {
        let host = profile(json!({"network": "host", "rootfs": "/srv/root"}));
        assert!(check_profile(Authority::Operator, &allow(&[]), "container_profile", &host, true, false).is_ok());
        assert!(check_registry_source(Authority::Operator, &allow(&[]), Some("/etc/passwd")).is_ok());
    }

    #[test]
    fn allowed_host_paths_admit_paths_under_them_only() {
        let a = allow(&["/srv/agents"]);
        assert!(a.allows_path(Path::new("/srv/agents/echo")));
        assert!(a.allows_path(Path::new("/srv/agents")));
        assert!(!a.allows_path(Path::new("/srv/agents-evil/echo")));
        assert!(!a.allows_path(Path::new("/srv/agents/../../etc/shadow")));
        assert!(!a.allows_path(Path::new("/etc/shadow")));
        let rooted = profile(json!({"rootfs": "/srv/agents/root"}));
        assert!(check_profile(Authority::User, &a, "container_profile", &rooted, false, false).is_ok());
    }

    #[test]
    fn manual_agents_from_host_paths_need_an_allowance() {
        let local = AgentSpec::from_json(&json!({"id": "e", "version": "1",
            "distribution": {"type": "binary", "binary": {"url": "file:///opt/echo", "executable": "/opt/echo"}}}))
        .unwrap();
        let platform = crate::agent_spec::this_platform();
        assert_eq!(field(check_manual_agent(Authority::User, &allow(&[]), &local, &platform)), "manual_agent.distribution.binary.executable");
        assert!(check_manual_agent(Authority::User, &allow(&["/opt"]), &local, &platform).is_ok());
        let archive = AgentSpec::from_json(&json!({"id": "e", "version": "1",
            "distribution": {"type": "binary", "binary": {"url": "file:///srv/echo.tar.gz", "executable": "bin/echo"}}}))
        .unwrap();
        assert_eq!(field(check_manual_agent(Authority::User, &allow(&[]), &archive, &platform)), "manual_agent.distribution.binary.url");
        let fetched = AgentSpec::from_json(&json!({"id": "e", "version": "1",
            "distribution": {"type": "binary", "binary": {"url": "https://example.org/echo.tar.gz", "executable": "bin/echo"}}}))
        .unwrap();
        assert!(check_manual_agent(Authority::User, &allow(&[]), &fetched, &platform).is_ok());
    }

    #[test]
    fn registry_sources_of_the_callers_choice_need_an_allowance() {
        let a = allow(&[]);
        assert!(check_registry_source(Authority::User, &a, None).is_ok());
        assert!(check_registry_source(Authority::User, &a, Some("https://r.example/a.json")).is_ok());
        assert_eq!(field(check_registry_source(Authority::User, &a, Some("/etc/shadow"))), "source");
    }
}
