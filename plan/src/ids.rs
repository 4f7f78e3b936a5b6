//! Ids of the entities agentd keeps.

/// A node id: a DNS label (`[a-z0-9]`, then `[a-z0-9-]`, not ending in
/// `-`, at most 63), since it names the node's certificate
/// (`<id>.node.agentd`).
pub fn valid_node_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A label `key=value` of a node or a selector.
pub fn valid_label(key: &str, value: &str) -> bool {
    let key_ok = !key.is_empty() && key.len() <= 63 && key.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_/".contains(&c));
    let value_ok = value.len() <= 63 && value.bytes().all(|c| c.is_ascii_graphic());
    key_ok && value_ok
}

/// A new id: a kind prefix and a time-ordered UUID (v7), so ids sort by birth.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
