//! What a container's creation or its agent's start is doing right now, so
//! that a client looking at a session being created sees `installing` (a
//! bundle fetched and unpacked, or an npx/uvx launcher installing its
//! package before the agent answers `initialize`) apart from `starting`.
//! A workflow runs a container's steps one at a time, so one stage per
//! container is enough.

use std::collections::HashMap;
use std::sync::Mutex;

pub use agentd_proto::node::setup_stage::Stage as Kind;

pub const INSTALLING: Kind = Kind::Installing;
pub const STARTING: Kind = Kind::Starting;

#[derive(Default)]
pub struct Setups {
    table: Mutex<HashMap<String, Kind>>,
}

/// Holds a container's stage until dropped.
pub struct Stage<'a> {
    setups: &'a Setups,
    container_id: String,
}

impl Setups {
    pub fn enter(&self, container_id: &str, stage: Kind) -> Stage<'_> {
        self.table.lock().unwrap().insert(container_id.to_string(), stage);
        Stage { setups: self, container_id: container_id.to_string() }
    }

    pub fn get(&self, container_id: &str) -> Option<Kind> {
        self.table.lock().unwrap().get(container_id).copied()
    }
}

impl Drop for Stage<'_> {
    fn drop(&mut self) {
        self.setups.table.lock().unwrap().remove(&self.container_id);
    }
}

/// Whether an agent's command is a launcher that installs its package
/// before running it (the plan compiler emits `npx -y` and `uvx`).
pub fn installs(command: &str) -> bool {
    matches!(std::path::Path::new(command).file_name().and_then(|n| n.to_str()), Some("npx" | "uvx"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_lasts_as_long_as_its_guard() {
        let setups = Setups::default();
        {
            let _stage = setups.enter("ctr_1", INSTALLING);
            assert_eq!(setups.get("ctr_1"), Some(INSTALLING));
        }
        assert_eq!(setups.get("ctr_1"), None);
        assert!(installs("/usr/bin/npx") && installs("uvx") && !installs("/opt/agentd/agents/x/bin/agent"));
    }
}
