//! Egress denials made visible: each one an egress gateway reports (already
//! rate-limited per sandbox, see `agentd_egress::gateway`) becomes a
//! `sandbox.egress_denied` event on every session log of its sandbox, and a
//! line in the node's log.

use std::sync::Weak;

use agentd_egress::{Denial, Protocol};
use agentd_proto::node::session_event::Event;
use agentd_proto::node::{EgressProtocol, SandboxEgressDenied};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::Node;

pub fn event(container_id: &str, d: &Denial) -> SandboxEgressDenied {
    SandboxEgressDenied {
        container_id: container_id.to_string(),
        protocol: match d.protocol {
            Protocol::Tcp => EgressProtocol::Tcp,
            Protocol::Udp => EgressProtocol::Udp,
            Protocol::Dns => EgressProtocol::Dns,
        }
        .into(),
        destination: d.destination.clone(),
        port: u32::from(d.port),
        name: d.name.clone(),
        missing_rule: d.missing_rule.clone(),
        reason: d.reason.clone(),
        suppressed: d.suppressed,
    }
}

pub fn report(node: Weak<Node>, mut denials: UnboundedReceiver<(String, Denial)>) {
    tokio::spawn(async move {
        while let Some((container_id, denial)) = denials.recv().await {
            let Some(node) = node.upgrade() else { return };
            tracing::info!(
                container = container_id,
                destination = denial.destination,
                port = denial.port,
                missing_rule = denial.missing_rule,
                reason = denial.reason,
                "egress denied"
            );
            let event = event(&container_id, &denial);
            for session in node.sessions.of_container(&container_id) {
                let run = session.active_run().unwrap_or_default();
                session.log.append(&run, Event::SandboxEgressDenied(event.clone()));
            }
        }
    });
}
