//! `agentd events SESSION [--after N] [--follow]`: a session's events, one
//! JSON line each (`{"id", "kind", "data"}`). Without `--follow` it stops at
//! the session's latest event (its view's `last_event_id`, read first);
//! with it, it follows new events, reconnecting after the last one seen
//! when the stream drops, until the session ends.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::value::RawValue;

use super::follow::{Follow, WireEvent};
use super::http::{Api, segment};
use crate::cli::EventsArgs;

/// How long a listing without `--follow` may fail to reconnect.
const STREAM_OUTAGE: Duration = Duration::from_secs(30);
/// A ready session whose latest event id is unknown (its node did not
/// answer): the listing ends after this long without an event.
const QUIET_END: Duration = Duration::from_secs(2);

/// Where a listing stops.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// At this event id.
    At(u64),
    /// When nothing more comes for [`QUIET_END`].
    Quiet,
    /// When the stream ends (`--follow`: with the session).
    End,
}

pub fn run(args: EventsArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    super::block_on(async {
        let stop = if args.follow {
            Stop::End
        } else {
            let view = api.get(&format!("/v1/sessions/{}", segment(&args.session))).await?;
            match (view["last_event_id"].as_u64(), view["state"].as_str()) {
                (Some(last), _) => Stop::At(last),
                (None, Some("ready")) => {
                    eprintln!("agentd: the session's latest event id is unknown (its node did not answer); listing until the stream is quiet");
                    Stop::Quiet
                }
                // A closed session's stream replays its archive and ends.
                (None, _) => Stop::End,
            }
        };
        if let Stop::At(last) = stop
            && last <= args.after
        {
            return Ok(ExitCode::SUCCESS);
        }
        let outage = if args.follow { None } else { Some(STREAM_OUTAGE) };
        let mut events = Follow::new(&api, &args.session, args.after, outage);
        let mut stdout = std::io::stdout().lock();
        loop {
            let next = if stop == Stop::Quiet {
                match tokio::time::timeout(QUIET_END, events.next()).await {
                    Ok(next) => next?,
                    Err(_) => break,
                }
            } else {
                events.next().await?
            };
            let Some(event) = next else { break };
            // A reader that went away (`| head`) is no error.
            if writeln!(stdout, "{}", line(&event)).is_err() {
                break;
            }
            if matches!(stop, Stop::At(last) if event.id >= last) {
                break;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// One event as one JSON line: `{"id", "kind", "data"}`, the data as the
/// API sent it (the agent's key order kept), or as a string if it is not
/// JSON.
fn line(event: &WireEvent) -> String {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        id: u64,
        kind: &'a str,
        data: Data,
    }
    #[derive(serde::Serialize)]
    #[serde(untagged)]
    enum Data {
        Raw(Box<RawValue>),
        /// JSON over several lines, made one.
        Json(serde_json::Value),
        Text(String),
    }
    let data = match RawValue::from_string(event.data.trim().to_string()) {
        Ok(raw) if !raw.get().contains(['\n', '\r']) => Data::Raw(raw),
        Ok(raw) => serde_json::from_str(raw.get()).map_or_else(|_| Data::Text(event.data.clone()), Data::Json),
        Err(_) => Data::Text(event.data.clone()),
    };
    serde_json::to_string(&Line { id: event.id, kind: &event.kind, data }).expect("a line serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_json_line_with_its_data_as_json() {
        let e = WireEvent { id: 3, kind: "run.completed".into(), data: r#"{"run_id":"run_1","stop_reason":"end_turn"}"#.into() };
        assert_eq!(line(&e), r#"{"id":3,"kind":"run.completed","data":{"run_id":"run_1","stop_reason":"end_turn"}}"#);
        let odd = WireEvent { id: 4, kind: "message".into(), data: "not\njson".into() };
        assert_eq!(line(&odd), r#"{"id":4,"kind":"message","data":"not\njson"}"#);
        let spread = WireEvent { id: 5, kind: "message".into(), data: "{\"a\":\n 1}".into() };
        assert_eq!(line(&spread), r#"{"id":5,"kind":"message","data":{"a":1}}"#);
    }
}
