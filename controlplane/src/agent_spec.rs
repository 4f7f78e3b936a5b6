//! Agent definitions, in the two shapes agentd accepts, made into one
//! validated [`AgentSpec`].
//!
//! - The ACP registry's shape (`agentclientprotocol/registry`, `agent.json`):
//!   `{id, name, version, description, distribution: {binary: {"linux-x86_64":
//!   {archive, cmd, args?, env?}}, npx: {package, args?, env?}, uvx: {...}}}`.
//!   agentd also reads a `sha256` beside `archive`.
//! - The original agentd's `manual_agent` shape: `{id, version, source?,
//!   protocol?, distribution: {type: "binary" | "npx" | "uvx", binary: {url?,
//!   executable, sha256?, args?, env?}, npx: {...}, uvx: {...}}}`. A `binary`
//!   whose `executable` is absolute names an executable already on the node;
//!   one whose `executable` is relative is a `cmd` inside the archive at `url`.
//!
//! Which shape a value has is decided by `distribution.type`: present in the
//! manual shape, absent in the registry's. Both shapes are accepted in registry
//! files and as a session's `manual_agent`. An `AgentSpec` that exists is valid.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The registry's platform key of this machine: `linux-x86_64`, `linux-aarch64`.
pub fn this_platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentSpec {
    pub id: String,
    pub name: String,
    pub version: String,
    pub description: String,
    pub distribution: Distributions,
}

/// Every way the agent can be had; at least one is present.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Distributions {
    /// Archives per platform key (`linux-x86_64`, ...).
    pub binary: BTreeMap<String, ArchiveTarget>,
    pub npx: Option<PackageLaunch>,
    pub uvx: Option<PackageLaunch>,
    /// An executable already on the node, bound into the sandbox as it is.
    pub local: Option<LocalExecutable>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveTarget {
    /// http://, https:// or file:// URL of a .tar.gz, .tgz or .tar.
    pub archive: String,
    /// Hex SHA-256 of the archive; checked by the node when given.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The agent's executable, relative to the unpacked archive.
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// An npm (npx) or PyPI (uvx) package run inside the sandbox.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PackageLaunch {
    pub package: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalExecutable {
    /// Absolute host path of the executable.
    pub executable: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// How an agent is launched on one platform, chosen by [`AgentSpec::launch_for`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Launch<'a> {
    Archive(&'a ArchiveTarget),
    Local(&'a LocalExecutable),
    Npx(&'a PackageLaunch),
    Uvx(&'a PackageLaunch),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("agent definition: {0}")]
    Shape(String),
    #[error("agent id {0:?} may only use letters, digits, '.', '_' and '-' (at most 128)")]
    BadId(String),
    #[error("agent {0}: version must not be empty")]
    NoVersion(String),
    #[error("agent {0}: distribution has none of binary, npx, uvx")]
    NoDistribution(String),
    #[error("agent {id}: {field} {value:?}: {why}")]
    BadField { id: String, field: String, value: String, why: &'static str },
    #[error("agent {id} has no distribution for {platform} (it has: {available})")]
    NoDistributionForPlatform { id: String, platform: String, available: String },
}

// The registry's shape.
#[derive(Deserialize)]
struct RegistryEntry {
    id: String,
    #[serde(default)]
    name: Option<String>,
    version: String,
    #[serde(default)]
    description: Option<String>,
    distribution: RegistryDistribution,
}

/// Unknown distribution kinds are ignored, so that a registry that grows one
/// still syncs; an entry with none agentd knows is refused.
#[derive(Deserialize)]
struct RegistryDistribution {
    #[serde(default)]
    binary: BTreeMap<String, ArchiveTarget>,
    #[serde(default)]
    npx: Option<PackageLaunch>,
    #[serde(default)]
    uvx: Option<PackageLaunch>,
}

// The original agentd's shape.
#[derive(Deserialize)]
struct ManualEntry {
    id: String,
    version: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    source: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    protocol: Option<Value>,
    distribution: ManualDistribution,
}

#[derive(Deserialize)]
struct ManualDistribution {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    binary: Option<ManualBinary>,
    #[serde(default)]
    npx: Option<PackageLaunch>,
    #[serde(default)]
    uvx: Option<PackageLaunch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManualBinary {
    #[serde(default)]
    url: Option<String>,
    executable: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

const ARCHIVE_SUFFIXES: &[&str] = &[".tar.gz", ".tgz", ".tar"];

fn looks_like_archive(url: &str) -> bool {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    ARCHIVE_SUFFIXES.iter().any(|s| path.ends_with(s))
}

impl AgentSpec {
    /// Reads either shape and validates it.
    pub fn from_json(value: &Value) -> Result<Self, SpecError> {
        let shape = |e: serde_json::Error| SpecError::Shape(e.to_string());
        let manual = value.get("distribution").and_then(|d| d.get("type")).is_some();
        let spec = if manual {
            let entry: ManualEntry = serde_json::from_value(value.clone()).map_err(shape)?;
            Self::from_manual(entry)?
        } else {
            let entry: RegistryEntry = serde_json::from_value(value.clone()).map_err(shape)?;
            AgentSpec {
                name: entry.name.unwrap_or_else(|| entry.id.clone()),
                description: entry.description.unwrap_or_default(),
                id: entry.id,
                version: entry.version,
                distribution: Distributions {
                    binary: entry.distribution.binary,
                    npx: entry.distribution.npx,
                    uvx: entry.distribution.uvx,
                    local: None,
                },
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    fn from_manual(entry: ManualEntry) -> Result<Self, SpecError> {
        let mut distribution = Distributions::default();
        let missing = |what: &str| SpecError::Shape(format!("distribution.{what} is required for type {what:?}"));
        match entry.distribution.kind.as_str() {
            "binary" => {
                let b = entry.distribution.binary.ok_or_else(|| missing("binary"))?;
                if Path::new(&b.executable).is_absolute() {
                    distribution.local = Some(LocalExecutable { executable: b.executable, args: b.args, env: b.env });
                } else {
                    let url = b.url.filter(|u| looks_like_archive(u)).ok_or_else(|| SpecError::BadField {
                        id: entry.id.clone(),
                        field: "distribution.binary.executable".into(),
                        value: b.executable.clone(),
                        why: "must be an absolute path on the node, or a path inside the archive that url names (.tar.gz, .tgz or .tar)",
                    })?;
                    let target = ArchiveTarget { archive: url, sha256: b.sha256, cmd: b.executable, args: b.args, env: b.env };
                    distribution.binary.insert(this_platform(), target);
                }
            }
            "npx" => distribution.npx = Some(entry.distribution.npx.ok_or_else(|| missing("npx"))?),
            "uvx" => distribution.uvx = Some(entry.distribution.uvx.ok_or_else(|| missing("uvx"))?),
            other => {
                return Err(SpecError::Shape(format!("distribution type {other:?} is not supported (supported: binary, npx, uvx)")));
            }
        }
        Ok(AgentSpec {
            name: entry.name.unwrap_or_else(|| entry.id.clone()),
            description: entry.description.unwrap_or_default(),
            id: entry.id,
            version: entry.version,
            distribution,
        })
    }

    fn validate(&self) -> Result<(), SpecError> {
        let id = &self.id;
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) || id == "." || id == ".." {
            return Err(SpecError::BadId(id.clone()));
        }
        if self.version.trim().is_empty() {
            return Err(SpecError::NoVersion(id.clone()));
        }
        let d = &self.distribution;
        if d.binary.is_empty() && d.npx.is_none() && d.uvx.is_none() && d.local.is_none() {
            return Err(SpecError::NoDistribution(id.clone()));
        }
        let bad = |field: String, value: &str, why: &'static str| SpecError::BadField { id: id.clone(), field, value: value.to_string(), why };
        for (platform, t) in &d.binary {
            let field = |name: &str| format!("distribution.binary.{platform}.{name}");
            let scheme = t.archive.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
            if !matches!(scheme.as_deref(), Some("http" | "https" | "file")) {
                return Err(bad(field("archive"), &t.archive, "must be an http://, https:// or file:// URL"));
            }
            if let Some(sha) = &t.sha256
                && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(bad(field("sha256"), sha, "must be 64 hexadecimal digits"));
            }
            let cmd = Path::new(&t.cmd);
            let inside = !t.cmd.is_empty() && cmd.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if !inside || cmd.file_name().is_none() {
                return Err(bad(field("cmd"), &t.cmd, "must be a relative path inside the archive"));
            }
            check_env(id, &field("env"), &t.env)?;
        }
        for (kind, p) in [("npx", &d.npx), ("uvx", &d.uvx)] {
            if let Some(p) = p {
                if p.package.trim().is_empty() || p.package.starts_with('-') || p.package.chars().any(char::is_whitespace) {
                    return Err(bad(format!("distribution.{kind}.package"), &p.package, "must be a package name (not an option)"));
                }
                check_env(id, &format!("distribution.{kind}.env"), &p.env)?;
            }
        }
        if let Some(l) = &d.local {
            let p = Path::new(&l.executable);
            if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir)) || p.file_name().is_none() {
                return Err(bad("distribution.binary.executable".into(), &l.executable, "must be an absolute path without '..'"));
            }
            check_env(id, "distribution.binary.env", &l.env)?;
        }
        Ok(())
    }

    /// How to launch the agent on `platform`: its archive for that platform,
    /// else an executable on the node, else npx, else uvx.
    pub fn launch_for(&self, platform: &str) -> Result<Launch<'_>, SpecError> {
        let d = &self.distribution;
        if let Some(t) = d.binary.get(platform) {
            return Ok(Launch::Archive(t));
        }
        if let Some(l) = &d.local {
            return Ok(Launch::Local(l));
        }
        if let Some(p) = &d.npx {
            return Ok(Launch::Npx(p));
        }
        if let Some(p) = &d.uvx {
            return Ok(Launch::Uvx(p));
        }
        let available = d.binary.keys().map(|k| format!("binary {k}")).collect::<Vec<_>>().join(", ");
        Err(SpecError::NoDistributionForPlatform { id: self.id.clone(), platform: platform.to_string(), available })
    }
}

fn check_env(id: &str, field: &str, env: &BTreeMap<String, String>) -> Result<(), SpecError> {
    for (name, value) in env {
        if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0') {
            return Err(SpecError::BadField { id: id.to_string(), field: field.to_string(), value: name.clone(), why: "is not a valid environment variable" });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SHA: &str = "2b7e1b9d4b4e4c0c7f0a8a0b6f1c1d2e3f405162738495a6b7c8d9eafb0c1d2e";

    fn registry_entry() -> Value {
        json!({
            "id": "codex-acp", "name": "Codex", "version": "0.5.1", "description": "OpenAI's agent",
            "repository": "https://example.invalid/codex", "authors": ["someone"], "license": "Apache-2.0",
            "distribution": {
                "binary": {
                    "linux-x86_64": {"archive": "https://example.invalid/codex-x86_64.tar.gz", "sha256": SHA, "cmd": "./codex-acp", "args": ["--acp"], "env": {"RUST_LOG": "warn"}},
                    "darwin-aarch64": {"archive": "https://example.invalid/codex-mac.tar.gz", "cmd": "./codex-acp"}
                },
                "npx": {"package": "@example/codex-acp@0.5.1", "args": ["--stdio"]},
                "future-kind": {"whatever": true}
            }
        })
    }

    #[test]
    fn reads_the_registry_shape() {
        let spec = AgentSpec::from_json(&registry_entry()).unwrap();
        assert_eq!((spec.id.as_str(), spec.name.as_str(), spec.version.as_str()), ("codex-acp", "Codex", "0.5.1"));
        let t = &spec.distribution.binary["linux-x86_64"];
        assert_eq!((t.cmd.as_str(), t.sha256.as_deref(), t.args.as_slice()), ("./codex-acp", Some(SHA), &["--acp".to_string()][..]));
        assert_eq!(spec.launch_for("linux-x86_64").unwrap(), Launch::Archive(t));
        // No archive for this platform: npx is next.
        assert!(matches!(spec.launch_for("linux-riscv64").unwrap(), Launch::Npx(p) if p.package == "@example/codex-acp@0.5.1"));
    }

    #[test]
    fn reads_the_manual_shape_in_its_three_forms() {
        let local = AgentSpec::from_json(&json!({"id": "echo", "version": "1", "source": "manual", "protocol": {"auth_modes": ["agent"]},
            "distribution": {"type": "binary", "binary": {"url": "file:///opt/echo", "executable": "/opt/echo", "args": ["-v"]}}}))
        .unwrap();
        assert!(matches!(local.launch_for("linux-x86_64").unwrap(), Launch::Local(l) if l.executable == "/opt/echo" && l.args == ["-v"]));

        let archive = AgentSpec::from_json(&json!({"id": "echo", "version": "1",
            "distribution": {"type": "binary", "binary": {"url": "file:///srv/echo.tar.gz", "sha256": SHA, "executable": "bin/echo"}}}))
        .unwrap();
        let Launch::Archive(t) = archive.launch_for(&this_platform()).unwrap() else { panic!("archive expected") };
        assert_eq!((t.archive.as_str(), t.cmd.as_str()), ("file:///srv/echo.tar.gz", "bin/echo"));

        let npx = AgentSpec::from_json(&json!({"id": "gem", "version": "1", "distribution": {"type": "npx", "npx": {"package": "@google/gemini-cli", "args": ["--experimental-acp"]}}})).unwrap();
        assert!(matches!(npx.launch_for("linux-x86_64").unwrap(), Launch::Npx(_)));
        let uvx = AgentSpec::from_json(&json!({"id": "py", "version": "1", "distribution": {"type": "uvx", "uvx": {"package": "fast-agent-acp"}}})).unwrap();
        assert!(matches!(uvx.launch_for("linux-x86_64").unwrap(), Launch::Uvx(_)));
    }

    #[test]
    fn refuses_what_cannot_be_run_safely() {
        let with = |path: &str, value: Value| {
            let mut entry = registry_entry();
            let mut cursor = &mut entry;
            let parts: Vec<&str> = path.split('/').collect();
            for p in &parts[..parts.len() - 1] {
                cursor = &mut cursor[*p];
            }
            cursor[parts[parts.len() - 1]] = value;
            AgentSpec::from_json(&entry)
        };
        let bad_field = |r: Result<AgentSpec, SpecError>, field: &str| match r {
            Err(SpecError::BadField { field: f, .. }) => assert!(f.ends_with(field), "{f}"),
            other => panic!("expected a bad {field}, got {other:?}"),
        };
        bad_field(with("distribution/binary/linux-x86_64/cmd", json!("../../bin/sh")), "cmd");
        bad_field(with("distribution/binary/linux-x86_64/cmd", json!("/bin/sh")), "cmd");
        bad_field(with("distribution/binary/linux-x86_64/archive", json!("ftp://x/a.tar.gz")), "archive");
        bad_field(with("distribution/binary/linux-x86_64/sha256", json!("abc")), "sha256");
        bad_field(with("distribution/binary/linux-x86_64/env", json!({"A=B": "c"})), "env");
        bad_field(with("distribution/npx/package", json!("--registry=http://evil")), "package");
        assert!(matches!(with("id", json!("../etc")), Err(SpecError::BadId(_))));
        assert!(matches!(with("version", json!(" ")), Err(SpecError::NoVersion(_))));
        assert!(matches!(with("distribution", json!({"pipx": {"package": "x"}})), Err(SpecError::NoDistribution(_))));
        assert!(matches!(with("distribution/binary/linux-x86_64/shasum", json!("x")), Err(SpecError::Shape(_))));
        match AgentSpec::from_json(&json!({"id": "x"})) {
            Err(SpecError::Shape(e)) => assert!(e.contains("version"), "{e}"),
            other => panic!("{other:?}"),
        }
        let relative = json!({"id": "e", "version": "1", "distribution": {"type": "binary", "binary": {"url": "file:///bin/echo", "executable": "echo"}}});
        bad_field(AgentSpec::from_json(&relative), "executable");
        let unknown = json!({"id": "e", "version": "1", "distribution": {"type": "docker"}});
        assert!(matches!(AgentSpec::from_json(&unknown), Err(SpecError::Shape(e)) if e.contains("docker")));
    }

    #[test]
    fn no_distribution_for_the_platform_names_what_there_is() {
        let mut entry = registry_entry();
        entry["distribution"] = json!({"binary": {"darwin-aarch64": {"archive": "https://x/a.tar.gz", "cmd": "a"}}});
        let spec = AgentSpec::from_json(&entry).unwrap();
        match spec.launch_for("linux-x86_64") {
            Err(e @ SpecError::NoDistributionForPlatform { .. }) => assert!(e.to_string().contains("binary darwin-aarch64"), "{e}"),
            other => panic!("{other:?}"),
        }
    }
}
