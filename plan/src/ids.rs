//! Ids of the entities agentd keeps.

/// A new id: a kind prefix and a time-ordered UUID (v7), so ids sort by birth.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}
