//! The lifecycle state machines. Every state write in the store names the
//! states it may come from; anything else is an [`IllegalTransition`].

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Container,
    Session,
    Run,
    AgentInstance,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::Container => "container",
            Entity::Session => "session",
            Entity::Run => "run",
            Entity::AgentInstance => "agent_instance",
        })
    }
}

/// Container: provisioning -> ready <-> hibernated -> stopping -> deleted,
/// or failed on the way. `stopping` means a delete is under way (its
/// workflow step removes the sandbox, then records it deleted).
pub mod container {
    pub const PROVISIONING: &str = "provisioning";
    pub const STOPPING: &str = "stopping";
    pub const READY: &str = "ready";
    /// Frozen: every process stopped, memory intact.
    pub const HIBERNATED: &str = "hibernated";
    pub const FAILED: &str = "failed";
    pub const DELETED: &str = "deleted";
    /// Not final: what the metrics gauge (final states only ever grow).
    pub const LIVE: &[&str] = &[PROVISIONING, READY, HIBERNATED, STOPPING];
}

/// Session: creating -> ready -> closed, or failed.
pub mod session {
    pub const CREATING: &str = "creating";
    pub const READY: &str = "ready";
    pub const FAILED: &str = "failed";
    pub const CLOSED: &str = "closed";
    /// Not final: what the metrics gauge.
    pub const LIVE: &[&str] = &[CREATING, READY];
}

/// Run: queued (its dispatch waits for a runner) -> dispatching (handed to
/// the node) -> streaming (the node started it: events flow) -> completed |
/// cancelled | failed. A prompt whose dispatch the API runs itself starts
/// at dispatching.
pub mod run {
    pub const QUEUED: &str = "queued";
    pub const DISPATCHING: &str = "dispatching";
    pub const STREAMING: &str = "streaming";
    /// Not ended: at most one per session.
    pub const ACTIVE: &[&str] = &[QUEUED, DISPATCHING, STREAMING];
    pub const COMPLETED: &str = "completed";
    pub const CANCELLED: &str = "cancelled";
    pub const FAILED: &str = "failed";
}

/// Agent instance, as its supervisor reports it (observed by the control
/// plane when the agent starts and at each node check, so a short state
/// may be missed): installing -> starting -> ready <-> running, with
/// auth_required on the way; a crash is exited, and a restart starting
/// again; failed (the restart budget spent) and stopped (its container or
/// last session gone) are final.
pub mod agent_instance {
    pub const INSTALLING: &str = "installing";
    pub const STARTING: &str = "starting";
    pub const READY: &str = "ready";
    pub const RUNNING: &str = "running";
    pub const AUTH_REQUIRED: &str = "auth_required";
    pub const EXITED: &str = "exited";
    pub const FAILED: &str = "failed";
    pub const STOPPED: &str = "stopped";

    /// Every state an instance can be observed in.
    pub const ALL: &[&str] = &[INSTALLING, STARTING, READY, RUNNING, AUTH_REQUIRED, EXITED, FAILED, STOPPED];
}

/// The states each target state may be entered from.
pub fn sources(entity: Entity, to: &str) -> &'static [&'static str] {
    match (entity, to) {
        (Entity::Container, container::READY) => &[container::PROVISIONING, container::HIBERNATED],
        (Entity::Container, container::HIBERNATED) => &[container::READY],
        (Entity::Container, container::FAILED) => &[container::PROVISIONING, container::READY, container::HIBERNATED],
        (Entity::Container, container::STOPPING) => {
            &[container::PROVISIONING, container::READY, container::HIBERNATED, container::FAILED]
        }
        (Entity::Container, container::DELETED) => {
            &[container::PROVISIONING, container::READY, container::HIBERNATED, container::FAILED, container::STOPPING]
        }
        (Entity::Session, session::READY) => &[session::CREATING],
        (Entity::Session, session::FAILED) => &[session::CREATING, session::READY],
        (Entity::Session, session::CLOSED) => &[session::CREATING, session::READY, session::FAILED],
        (Entity::Run, run::DISPATCHING) => &[run::QUEUED],
        (Entity::Run, run::STREAMING) => &[run::QUEUED, run::DISPATCHING],
        (Entity::Run, run::COMPLETED | run::CANCELLED | run::FAILED) => run::ACTIVE,
        (Entity::AgentInstance, to) => agent_instance_sources(to),
        _ => &[],
    }
}

fn agent_instance_sources(to: &str) -> &'static [&'static str] {
    use agent_instance::*;
    match to {
        STARTING => &[INSTALLING, READY, RUNNING, AUTH_REQUIRED, EXITED],
        // From starting or installing when the observation missed a step.
        READY => &[INSTALLING, STARTING, RUNNING, AUTH_REQUIRED],
        RUNNING => &[INSTALLING, STARTING, READY, AUTH_REQUIRED],
        AUTH_REQUIRED => &[INSTALLING, STARTING, READY, RUNNING],
        EXITED => &[INSTALLING, STARTING, READY, RUNNING, AUTH_REQUIRED],
        FAILED => &[INSTALLING, STARTING, READY, RUNNING, AUTH_REQUIRED, EXITED],
        STOPPED => &[INSTALLING, STARTING, READY, RUNNING, AUTH_REQUIRED, EXITED],
        _ => &[],
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entity} {id} is {current}; it cannot become {to}")]
pub struct IllegalTransition {
    pub entity: Entity,
    pub id: String,
    pub current: String,
    pub to: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_have_no_way_out() {
        for to in [container::READY, container::FAILED] {
            assert!(!sources(Entity::Container, to).contains(&container::DELETED));
        }
        for to in [run::COMPLETED, run::CANCELLED, run::FAILED] {
            for from in [run::COMPLETED, run::CANCELLED, run::FAILED] {
                assert!(!sources(Entity::Run, to).contains(&from));
            }
        }
        assert!(sources(Entity::Session, session::READY).iter().all(|s| *s == session::CREATING));
        for to in agent_instance::ALL {
            for from in [agent_instance::FAILED, agent_instance::STOPPED] {
                assert!(!sources(Entity::AgentInstance, to).contains(&from), "{from} -> {to}");
            }
        }
    }

    #[test]
    fn unknown_targets_are_unreachable() {
        assert!(sources(Entity::Run, "exploded").is_empty());
        assert!(sources(Entity::Container, run::STREAMING).is_empty());
    }
}
