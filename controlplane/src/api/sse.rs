//! How every event stream is served: a `retry:` hint first, keep-alive
//! comments while nothing happens, the open-subscriber gauge, and for live
//! streams a bound on how far a subscriber may fall behind.
//!
//! The bound: a live stream is read from its node by a task of its own into
//! a buffer of `buffer` events, which the subscriber's connection drains. A
//! subscriber that stops reading fills the buffer; once it has stayed full
//! for [`LAG_GRACE`], the reader stops (releasing the node's stream), and
//! the subscriber gets what the buffer holds, then a final `stream.lagged`
//! event naming the last event id it was sent: it resumes from there with
//! `Last-Event-ID`. Nothing a subscriber does slows the agent or the other
//! subscribers: the node appends to the session's log whoever reads it, and
//! each subscriber reads it on its own stream.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::metrics::Metrics;

/// How long a full buffer may stay full before its subscriber is cut off:
/// a burst (a resumed stream's history) fills it for moments only.
pub const LAG_GRACE: Duration = Duration::from_secs(2);

/// The reconnect delay suggested to clients (`retry:`): a stream cut by a
/// proxy or a restart is picked up again within a second, with
/// `Last-Event-ID`, by browsers and the dashboard alike.
pub const RETRY_HINT: Duration = Duration::from_millis(1000);

pub use crate::context::SseConfig;

/// An event and its id (`None`: not part of the session's log).
pub type Item = (Option<u64>, Event);

/// The response for `events`: the hint, the events (through the bound if
/// `live`), keep-alives; counted in `agentd_sse_subscribers` while open.
pub fn respond<S>(metrics: &Arc<Metrics>, config: SseConfig, events: S, live: bool) -> Response
where
    S: Stream<Item = Item> + Send + 'static,
{
    let guard = metrics.sse_subscriber();
    let events: futures::stream::BoxStream<'static, Item> =
        if live { bounded(events, config.buffer, LAG_GRACE, Arc::clone(metrics)).boxed() } else { events.boxed() };
    let hint = futures::stream::once(async { Event::default().retry(RETRY_HINT) });
    let body = hint.chain(events.map(|(_, e)| e)).map(move |e| {
        // The guard lives as long as the stream the connection holds.
        let _ = &guard;
        Ok::<_, Infallible>(e)
    });
    Sse::new(body).keep_alive(KeepAlive::new().interval(config.keep_alive)).into_response()
}

/// `events`, read ahead by a task of its own into a buffer of `buffer`;
/// cut off with a `stream.lagged` event when the buffer stays full `grace`.
pub fn bounded<S>(events: S, buffer: usize, grace: Duration, metrics: Arc<Metrics>) -> impl Stream<Item = Item> + Send + 'static
where
    S: Stream<Item = Item> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Item>(buffer.max(1));
    let lagged = Arc::new(AtomicBool::new(false));
    let reader_lagged = Arc::clone(&lagged);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(events);
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                // The subscriber went away: stop reading its node stream.
                _ = tx.closed() => return,
            };
            let Some(item) = next else { return };
            match tx.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(item)) => match tokio::time::timeout(grace, tx.send(item)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        reader_lagged.store(true, Ordering::Release);
                        metrics.sse_lagged();
                        return;
                    }
                },
            }
        }
    });
    async_stream::stream! {
        let mut last_id: Option<u64> = None;
        while let Some((id, event)) = rx.recv().await {
            if id.is_some() {
                last_id = id;
            }
            yield (id, event);
        }
        if lagged.load(Ordering::Acquire) {
            let data = serde_json::json!({
                "last_event_id": last_id,
                "buffer": buffer,
                "detail": "this subscriber fell too far behind the session's events and is cut off: reconnect with Last-Event-ID to resume",
            });
            yield (None, Event::default().event(agentd_proto::events::STREAM_LAGGED).data(data.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: u64) -> impl Stream<Item = Item> + Send + 'static {
        futures::stream::iter((1..=n).map(|i| (Some(i), Event::default().id(i.to_string()).data("x"))))
    }

    /// An event as a client reads it.
    async fn encoded(e: Event) -> String {
        let response = Sse::new(futures::stream::iter([Ok::<_, Infallible>(e)])).into_response();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_subscriber_that_keeps_up_gets_everything_and_no_cut_off() {
        let metrics = Arc::new(Metrics::default());
        let out: Vec<Item> = bounded(numbered(50), 4, Duration::from_secs(5), Arc::clone(&metrics)).collect().await;
        let ids: Vec<u64> = out.iter().filter_map(|(id, _)| *id).collect();
        assert_eq!(ids, (1..=50).collect::<Vec<_>>());
        assert_eq!(out.len(), 50, "no stream.lagged event");
        assert!(metrics.encode().contains("agentd_sse_lagged_total 0"), "{}", metrics.encode());
    }

    #[tokio::test]
    async fn a_stalled_subscriber_is_cut_off_after_its_buffer_with_a_final_event() {
        let metrics = Arc::new(Metrics::default());
        let mut stream = Box::pin(bounded(numbered(1000), 4, Duration::from_millis(50), Arc::clone(&metrics)));
        // The subscriber reads nothing while the buffer fills and the grace passes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut out = Vec::new();
        while let Some(item) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("the stream ends") {
            out.push(item);
        }
        let ids: Vec<u64> = out.iter().filter_map(|(id, _)| *id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4], "what the buffer held, in order");
        let (id, last) = out.pop().unwrap();
        assert_eq!(id, None, "the final event is not part of the log");
        let text = encoded(last).await;
        assert!(text.starts_with("event: stream.lagged\ndata: {"), "{text}");
        assert!(text.contains(r#""last_event_id":4"#), "{text}");
        assert!(metrics.encode().contains("agentd_sse_lagged_total 1"), "{}", metrics.encode());
    }

    #[tokio::test]
    async fn the_reader_stops_when_the_subscriber_goes_away() {
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // An endless source that tells when it is dropped.
        let source = async_stream::stream! {
            let _dropped = scopeguard(tx);
            let mut i = 0u64;
            loop {
                i += 1;
                yield (Some(i), Event::default().data("x"));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let mut stream = Box::pin(bounded(source, 4, Duration::from_secs(60), metrics));
        assert!(stream.next().await.is_some());
        drop(stream);
        tokio::time::timeout(Duration::from_secs(5), rx).await.expect("the source is dropped").ok();
    }

    /// Sends on `tx` when dropped.
    fn scopeguard(tx: tokio::sync::oneshot::Sender<()>) -> impl Drop {
        struct Guard(Option<tokio::sync::oneshot::Sender<()>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(());
                }
            }
        }
        Guard(Some(tx))
    }
}
