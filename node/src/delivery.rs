//! An agent's files for a sandbox built without them: a session opened in a
//! container that already runs names an agent whose executable or bundle
//! was not among the sandbox's mounts. The node puts the files under the
//! sandbox's workspace (from the host side: the workspace is a directory of
//! the node's), linked where the file system allows (bundles are
//! content-addressed and read-only), and the agent runs from there. Files
//! stay root's and read-only to the sandbox; the agent may remove its copy,
//! which is its own business.

use std::path::{Component, Path, PathBuf};

use agentd_proto::error::status;
use agentd_proto::node::{AgentPlan, agent_files};
use tonic::{Code, Status};

use crate::Node;
use crate::sandboxes::Sandbox;

fn plain_relative(path: &str) -> bool {
    let p = Path::new(path);
    !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

fn internal(what: &str, e: std::io::Error) -> Status {
    status(Code::Internal, "internal", format!("cannot deliver the agent's files ({what}): {e}"))
}

/// Links `from` to `to`, or copies it when they are on different file
/// systems; keeps the mode.
fn place_file(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map(drop)
}

/// `from`'s tree under `to` (made), files linked or copied, symlinks kept.
fn place_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            place_tree(&source, &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&source)?, &target)?;
        } else if kind.is_file() {
            place_file(&source, &target)?;
        }
    }
    Ok(())
}

/// The command the agent of `plan` runs in `sandbox`: its own when the
/// sandbox has it, else the one under the files delivered for it now.
pub async fn command(node: &Node, sandbox: &Sandbox, plan: &AgentPlan) -> Result<String, Status> {
    let Some(files) = &plan.files else { return Ok(plan.command.clone()) };
    // Host root sees into the sandbox's root through its PID 1.
    let in_sandbox = |p: &str| PathBuf::from(format!("/proc/{}/root{}", sandbox.pid, p));
    if plan.command.starts_with('/') && in_sandbox(&plan.command).is_file() {
        return Ok(plan.command.clone());
    }
    if !plain_relative(&files.relative_dir) || !plain_relative(&files.relative_command) || !files.workspace_path.starts_with('/') {
        return Err(status(Code::InvalidArgument, "invalid_request", "the agent's files name paths outside the workspace"));
    }
    let host_dir = sandbox.dir.join("workspace").join(&files.relative_dir);
    let placed = host_dir.join(&files.relative_command);
    if !placed.is_file() {
        match &files.source {
            Some(agent_files::Source::Bundle(b)) => {
                let digest = (!b.sha256.is_empty()).then_some(b.sha256.as_str());
                let tree = node.sandboxes.bundles().ensure(&b.archive_url, digest).await.map_err(|e| e.status())?;
                place_tree(&tree, &host_dir).map_err(|e| internal("bundle", e))?;
            }
            Some(agent_files::Source::HostExecutable(path)) => {
                let source = Path::new(path);
                if !source.is_absolute() || !source.is_file() {
                    return Err(status(Code::FailedPrecondition, "agent_executable_not_found", format!("agent executable {path} does not exist on node")));
                }
                let parent = placed.parent().unwrap_or(&host_dir);
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(|e| internal("directory", e))?;
                place_file(source, &placed).map_err(|e| internal("executable", e))?;
            }
            None => return Err(status(Code::InvalidArgument, "invalid_request", "the agent's files name no source")),
        }
    }
    if !placed.is_file() {
        return Err(status(Code::FailedPrecondition, "agent_executable_not_found", format!("{} is not in the agent's files", files.relative_command)));
    }
    Ok(format!("{}/{}/{}", files.workspace_path.trim_end_matches('/'), files.relative_dir, files.relative_command))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_are_taken() {
        assert!(plain_relative(".agentd/agents/echo") && plain_relative("bin/agent"));
        for bad in ["", "/abs", "../up", "a/../b", "./x"] {
            assert!(!plain_relative(bad), "{bad}");
        }
    }

    #[test]
    fn trees_are_placed_with_files_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("bundle");
        std::fs::create_dir_all(from.join("bin")).unwrap();
        std::fs::write(from.join("bin/agent"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(from.join("bin/agent"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("bin/agent", from.join("agent")).unwrap();
        let to = dir.path().join("ws/.agentd/agents/a");
        place_tree(&from, &to).unwrap();
        assert_eq!(std::fs::read_to_string(to.join("bin/agent")).unwrap(), "#!/bin/sh\n");
        assert_eq!(std::fs::metadata(to.join("bin/agent")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_link(to.join("agent")).unwrap(), Path::new("bin/agent"));
    }
}
