//! Node ids and the DNS names certificates carry.
//!
//! A certificate's role lives in its extended key usage (see `ca.rs`); its name says
//! which node it is. Node ids become a DNS label, so they are held to one.

/// The one name every control-plane certificate carries. Nodes do not check it (any
/// CA-issued clientAuth certificate is a control plane to them); it is there so the
/// certificate names what it is.
pub const CONTROL_PLANE_DNS_NAME: &str = "control-plane.agentd";

/// Node certificates are issued for `<node_id>` followed by this suffix.
pub const NODE_DNS_SUFFIX: &str = ".node.agentd";

/// Whether `id` may name a node: a lowercase DNS label, `[a-z0-9][a-z0-9-]{0,62}`,
/// that does not end in `-` (a label that does is not a valid DNS name, and the
/// control plane could not dial it by name).
pub fn valid_node_id(id: &str) -> bool {
    agentd_plan::ids::valid_node_id(id)
}

/// A node id that [`valid_node_id`] refuses.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid node id {0:?}: expected a lowercase DNS label ([a-z0-9][a-z0-9-]{{0,62}}, not ending in '-')"
)]
pub struct InvalidNodeId(pub String);

/// [`valid_node_id`] as a `Result`, for the functions that take a node id.
pub fn check_node_id(id: &str) -> Result<(), InvalidNodeId> {
    if valid_node_id(id) {
        Ok(())
    } else {
        Err(InvalidNodeId(id.to_owned()))
    }
}

/// The DNS name a node's certificate carries: `<node_id>.node.agentd`. The id is not
/// checked here; every function that issues or expects a node certificate checks it.
pub fn node_dns_name(node_id: &str) -> String {
    format!("{node_id}{NODE_DNS_SUFFIX}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids() {
        for ok in ["n1", "0", "node-7", "a".repeat(63).as_str(), "9abc-def0"] {
            assert!(valid_node_id(ok), "{ok:?} should be valid");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "-n1",
            "n1-",
            "N1",
            "n_1",
            "n1.x",
            "n 1",
            "é",
            long.as_str(),
        ] {
            assert!(!valid_node_id(bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn dns_name() {
        assert_eq!(node_dns_name("n1"), "n1.node.agentd");
    }
}
