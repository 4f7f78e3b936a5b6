//! A session's event stream that outlives dropped connections: each
//! reconnect asks for what came after the last event seen
//! (`Last-Event-ID`), with a backoff that doubles up to a bound; the stream
//! ends when the session does (its archive replayed, or `session_closed`).

use std::collections::VecDeque;
use std::time::Duration;

use reqwest::{Method, Response};
use tokio::time::Instant;

use super::http::{Api, ApiError, segment};
use super::sse::Parser;

/// The first wait before a reconnect, doubled each time it fails again.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between two reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// agentd sends a keep-alive every 15 s: this long without a byte is a
/// connection that died without saying so.
const IDLE: Duration = Duration::from_secs(45);

/// One event as the API numbers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireEvent {
    pub id: u64,
    pub kind: String,
    /// JSON, as the API sent it.
    pub data: String,
}

impl WireEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or(serde_json::Value::Null)
    }
}

pub struct Follow<'a> {
    api: &'a Api,
    /// `/v1/sessions/{id}`.
    path: String,
    /// The last event id seen, 0 before the first.
    after: u64,
    response: Option<Response>,
    parser: Parser,
    /// Events parsed and not yet handed out.
    queue: VecDeque<WireEvent>,
    /// How long reconnecting may keep failing before the stream gives up;
    /// `None`: for ever.
    give_up_after: Option<Duration>,
    /// The next reconnect's wait.
    backoff: Duration,
    /// When the current outage began (the first failed attempt).
    outage: Option<Instant>,
    /// Whether the stream was ever opened: a first connect that fails is
    /// the command's error, not a drop.
    opened: bool,
}

impl<'a> Follow<'a> {
    /// The events of `session` after event `after`.
    pub fn new(api: &'a Api, session: &str, after: u64, give_up_after: Option<Duration>) -> Follow<'a> {
        Follow {
            api,
            path: format!("/v1/sessions/{}", segment(session)),
            after,
            response: None,
            parser: Parser::new(),
            queue: VecDeque::new(),
            give_up_after,
            backoff: FIRST_BACKOFF,
            outage: None,
            opened: false,
        }
    }

    /// The next event, or `None` once the session's stream has ended for
    /// good (the session is closed or failed and its events are all out).
    /// Cancel-safe: dropping the future loses no event.
    pub async fn next(&mut self) -> Result<Option<WireEvent>, ApiError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                self.after = event.id;
                return Ok(Some(event));
            }
            let Some(response) = self.response.as_mut() else {
                match self.connect().await {
                    Ok(Some(response)) => {
                        self.response = Some(response);
                        self.parser = Parser::new();
                        self.opened = true;
                        self.outage = None;
                        self.backoff = FIRST_BACKOFF;
                    }
                    Ok(None) => return Ok(None),
                    Err(e) => self.wait_after(e).await?,
                }
                continue;
            };
            match tokio::time::timeout(IDLE, response.chunk()).await {
                Ok(Ok(Some(bytes))) => {
                    for e in self.parser.feed(&bytes) {
                        // agentd numbers every event; one without a number
                        // cannot be resumed after, so it keeps the last.
                        let id = e.id.as_deref().and_then(|id| id.parse().ok()).unwrap_or(self.after);
                        if id > self.after || e.id.is_none() {
                            self.queue.push_back(WireEvent { id, kind: e.kind, data: e.data });
                        }
                    }
                }
                // The server ended the stream: a closed session's replay, or
                // a session that just ended; else it went away.
                Ok(Ok(None)) => {
                    self.response = None;
                    if self.session_over().await? {
                        return Ok(None);
                    }
                    self.wait_after(ApiError::Transport { url: self.api.url(&self.path), reason: "the event stream ended".into() }).await?;
                }
                Ok(Err(e)) => {
                    self.response = None;
                    let e = self.api.transport_error(&self.api.url(&self.path), &e);
                    self.wait_after(e).await?;
                }
                Err(_) => {
                    self.response = None;
                    let reason = format!("nothing came for {} s", IDLE.as_secs());
                    self.wait_after(ApiError::Transport { url: self.api.url(&self.path), reason }).await?;
                }
            }
        }
    }

    /// Opens the stream after the last event seen; `None` when the session's
    /// events are gone (it closed without an archive).
    async fn connect(&self) -> Result<Option<Response>, ApiError> {
        let path = format!("{}/events", self.path);
        let after = self.after;
        let answer = self
            .api
            .call(Method::GET, &path, |r| {
                let r = r.header(reqwest::header::ACCEPT, "text/event-stream");
                if after > 0 { r.header("Last-Event-ID", after.to_string()) } else { r }
            })
            .await;
        match answer {
            Ok(response) => Ok(Some(response)),
            Err(e) if e.code() == Some("session_closed") && self.opened => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the session has ended, so its stream will not go on.
    async fn session_over(&self) -> Result<bool, ApiError> {
        match self.api.get(&self.path).await {
            Ok(view) => Ok(view["state"].as_str().is_some_and(|s| s != "ready")),
            Err(e) if e.is_transient() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// After a failed connect or a broken stream: gives up on a refusal, on
    /// a first connect that fails, or past the outage bound; else waits
    /// before the next attempt.
    async fn wait_after(&mut self, e: ApiError) -> Result<(), ApiError> {
        if !e.is_transient() || !self.opened {
            return Err(e);
        }
        let began = *self.outage.get_or_insert_with(|| {
            eprintln!("agentd: the event stream broke ({e}); reconnecting after event {}", self.after);
            Instant::now()
        });
        if self.give_up_after.is_some_and(|bound| began.elapsed() >= bound) {
            return Err(e);
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::cli::ClientArgs;

    /// A server that answers each request from `answers` in turn, the body
    /// ending with the connection; the requests it got, as "PATH LAST-EVENT-ID".
    async fn serve(answers: Vec<(&'static str, &'static str)>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            for (content_type, body) in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8];
                    if conn.read(&mut byte).await.unwrap() == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                let last = head.lines().find_map(|l| l.strip_prefix("last-event-id: ")).unwrap_or("-").trim().to_string();
                log.lock().unwrap().push(format!("{path} {last}"));
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\nconnection: close\r\n\r\n{body}");
                conn.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_dropped_stream_resumes_after_the_last_event_and_ends_with_the_session() {
        const SSE: &str = "text/event-stream";
        const JSON: &str = "application/json";
        let (url, seen) = serve(vec![
            (SSE, ": hello\n\nid: 1\nevent: run.started\ndata: {}\n\nid: 2\nevent: session.update\ndata: {}\n\nid: 3\nevent: cut"),
            (JSON, r#"{"state": "ready"}"#),
            (SSE, "id: 3\nevent: run.completed\ndata: {}\n\n"),
            (JSON, r#"{"state": "closed"}"#),
        ])
        .await;
        let api = Api::new(&ClientArgs { server: Some(url), token: None, state_dir: "/nonexistent".into() }).unwrap();
        let mut follow = Follow::new(&api, "ses_1", 0, Some(Duration::from_secs(10)));
        let mut got = Vec::new();
        while let Some(e) = follow.next().await.unwrap() {
            got.push((e.id, e.kind));
        }
        assert_eq!(got, [(1, "run.started".to_string()), (2, "session.update".into()), (3, "run.completed".into())]);
        assert_eq!(*seen.lock().unwrap(), ["/v1/sessions/ses_1/events -", "/v1/sessions/ses_1 -", "/v1/sessions/ses_1/events 2", "/v1/sessions/ses_1 -"]);
    }

    #[tokio::test]
    async fn a_first_connect_that_fails_is_the_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let api = Api::new(&ClientArgs { server: Some(url.clone()), token: None, state_dir: "/nonexistent".into() }).unwrap();
        let e = Follow::new(&api, "ses_1", 5, None).next().await.unwrap_err();
        assert!(matches!(&e, ApiError::Unreachable { url: u, .. } if *u == url), "{e}");
    }
}
