//! Session archives: a session's history outlives its sandbox. Closing one
//! session of several (the session.close step) and deleting the last one
//! (the container.delete step) both copy its event log into the store, and
//! its event stream replays it, from any event id, then ends.

use crate::support::{Agentd, SseEvent, in_container, said, session_body, turn};

/// Everything the closed session's stream replays, until it ends.
async fn replayed(agentd: &Agentd, id: &str, last_event_id: Option<u64>) -> Vec<(u64, String, String)> {
    let mut events = agentd.events(id, last_event_id).await;
    let mut out = Vec::new();
    while let Some(e) = events.next().await {
        out.push((e.id.unwrap(), e.event, e.data));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_replay_their_archived_history() {
    let agentd = Agentd::start().await;
    let (first, mut first_events) = agentd.create_streaming(&session_body(&[])).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{first}")).await;
    let container = view["container_id"].as_str().unwrap().to_string();
    let (second, mut second_events) = agentd.create_streaming(&in_container(&container, &[])).await;

    let mut live = turn(&agentd, &first, &mut first_events, "remember this").await;
    live.extend(turn(&agentd, &first, &mut first_events, "and this").await);
    let live: Vec<(u64, String, String)> = live.into_iter().map(|e| (e.id.unwrap(), e.event, e.data)).collect();
    let said_second = turn(&agentd, &second, &mut second_events, "second session").await;
    assert_eq!(said(&said_second), "second session");

    // Closing one session of two: archived by its close step.
    let (status, _) = agentd.delete(&format!("/v1/sessions/{first}")).await;
    assert!(status.is_success(), "{status}");
    let (_, closed) = agentd.get(&format!("/v1/sessions/{first}")).await;
    assert_eq!(closed["state"], "closed");
    assert_eq!(replayed(&agentd, &first, None).await, live, "the same events, ids and data as live");
    let tail = replayed(&agentd, &first, Some(2)).await;
    assert_eq!(tail, live[2..].to_vec(), "resumed after event 2");

    // The last session: archived by the container's delete step.
    let (status, _) = agentd.delete(&format!("/v1/sessions/{second}")).await;
    assert!(status.is_success(), "{status}");
    agentd.wait_for(&format!("/v1/containers/{container}"), |c| c["state"] == "deleted").await;
    let history: Vec<SseEvent> = replayed(&agentd, &second, None).await.into_iter().map(|(id, event, data)| SseEvent { id: Some(id), event, data }).collect();
    assert_eq!(history.first().map(|e| e.event.as_str()), Some("run.started"), "{history:?}");
    assert_eq!(history.last().map(|e| e.event.as_str()), Some("run.completed"), "{history:?}");
    assert_eq!(said(&history), "second session");
}
