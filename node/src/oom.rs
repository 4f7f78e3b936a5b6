//! OOM kills never pass silently: a node-wide watcher reads each sandbox's OOM
//! kill counter and, when it grows, appends a `sandbox.oom` event to every
//! session log of that sandbox. The turn that lost its agent then fails with a
//! reason that names the OOM (see `service::pump_turn`).

use std::sync::Weak;
use std::time::Duration;

use agentd_proto::node::SandboxOom;
use agentd_proto::node::session_event::Event;

use crate::Node;

/// Polling a counter file is cheap; the kernel offers no portable
/// notification across v1 and v2.
const PERIOD: Duration = Duration::from_millis(250);

pub fn watch(node: Weak<Node>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PERIOD).await;
            let Some(node) = node.upgrade() else { return };
            for sandbox in node.sandboxes.list() {
                let Some(grown) = sandbox.note_oom_kills() else { continue };
                tracing::warn!(container = sandbox.id, oom_kills = grown, "OOM kill in sandbox");
                let oom = SandboxOom { container_id: sandbox.id.clone(), oom_kills: grown, memory_max: sandbox.memory_max().unwrap_or(0) };
                for session in node.sessions.of_container(&sandbox.id) {
                    let run = session.active_run().unwrap_or_default();
                    session.log.append(&run, Event::SandboxOom(oom.clone()));
                }
            }
        }
    });
}
