//! Closed sessions' files on the node: kept for the node's retention
//! (`--closed-session-retention-ms`) after the session closed, then
//! removed. The control plane archives a session's log before closing it;
//! the node's copy is what is left when that archive failed or was cut
//! (it keeps the newest 64 MiB), for an operator to read. A sandbox's
//! delete removes its sessions' files whatever the retention.

use std::path::Path;
use std::sync::Weak;
use std::time::Duration;

use crate::Node;
use crate::event_log::now_ms;
use crate::sessions::SessionFile;

/// How often closed sessions are looked for, at most.
const PERIOD: Duration = Duration::from_secs(60);

/// Removes, every period until the node goes, the files of sessions closed
/// longer than `retention` ago in every sandbox.
pub fn watch(node: Weak<Node>, retention: Duration) {
    let period = PERIOD.min(retention.max(Duration::from_secs(1)));
    tokio::spawn(async move {
        loop {
            let Some(dirs) = node.upgrade().map(|n| n.sandboxes.list().iter().map(|s| s.sessions_dir()).collect::<Vec<_>>()) else { return };
            let _ = tokio::task::spawn_blocking(move || {
                for dir in dirs {
                    sweep(&dir, retention, now_ms());
                }
            })
            .await;
            tokio::time::sleep(period).await;
        }
    });
}

/// Removes the state and log files of the sessions in `dir` closed more than
/// `retention` before `now_ms`; returns their ids.
pub fn sweep(dir: &Path, retention: Duration, now_ms: i64) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return removed };
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(file) = SessionFile::read(&path) else { continue };
        let Some(closed) = file.closed_at_ms else { continue };
        if now_ms.saturating_sub(closed) < retention_ms {
            continue;
        }
        let _ = std::fs::remove_file(SessionFile::log_path(dir, &file.session_id));
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(session = file.session_id, "closed session's files removed (past the retention)");
            removed.push(file.session_id);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sessions_closed_longer_than_the_retention_go() {
        let dir = tempfile::tempdir().unwrap();
        let session = |id: &str, closed_at_ms| {
            let file = SessionFile {
                session_id: id.into(),
                container_id: "ctr_1".into(),
                agent_instance_id: "agi_1".into(),
                acp_session_id: "acp".into(),
                created_at_ms: 0,
                closed_at_ms,
            };
            file.write(&SessionFile::path(dir.path(), id)).unwrap();
            std::fs::write(SessionFile::log_path(dir.path(), id), "{}\n").unwrap();
        };
        session("ses_open", None);
        session("ses_old", Some(1_000));
        session("ses_recent", Some(9_500));
        assert_eq!(sweep(dir.path(), Duration::from_secs(1), 10_000), ["ses_old"]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["ses_open.json", "ses_open.jsonl", "ses_recent.json", "ses_recent.jsonl"]);
    }
}
