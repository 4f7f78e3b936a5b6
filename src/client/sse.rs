//! Server-sent events, parsed as the HTML standard's "event stream
//! interpretation" says: lines end in LF, CRLF or CR; `field: value` (one
//! space after the colon dropped); a line starting with `:` is a comment
//! (agentd's keep-alives); `data` lines join with `\n`; a blank line
//! dispatches the event, unless it has no data; the `id` persists as the
//! last event id for a reconnect's `Last-Event-ID`. Bytes come in as the
//! network cuts them: a line, a UTF-8 character or a CRLF may be split.
//!
//! Small enough to own: the crates that do this bring their own HTTP
//! client or an executor with them.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The last event id when it was dispatched (its own `id:`, or an
    /// earlier event's).
    pub id: Option<String>,
    /// `event:`, `message` when it had none.
    pub kind: String,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct Parser {
    /// Bytes not yet ending in a line break.
    pending: Vec<u8>,
    /// The first line's byte order mark is not part of it.
    started: bool,
    /// The event being read.
    kind: String,
    data: String,
    /// Whether `data` has had a `data:` line (an empty one counts).
    has_data: bool,
    /// Persists across events, as the standard's "last event ID buffer".
    last_id: Option<String>,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Takes the next bytes of the stream; the events they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.pending.len() {
            let end = match self.pending[i] {
                b'\n' => i + 1,
                // A CR last in the buffer may be half of a CRLF: wait.
                b'\r' if i + 1 == self.pending.len() => break,
                b'\r' if self.pending[i + 1] == b'\n' => i + 2,
                b'\r' => i + 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let line = String::from_utf8_lossy(&self.pending[start..i]).into_owned();
            if let Some(event) = self.line(&line) {
                events.push(event);
            }
            start = end;
            i = end;
        }
        self.pending.drain(..start);
        events
    }

    fn line(&mut self, line: &str) -> Option<Event> {
        let line = if self.started {
            line
        } else {
            self.started = true;
            line.strip_prefix('\u{feff}').unwrap_or(line)
        };
        if line.is_empty() {
            return self.dispatch();
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => self.kind = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // An id with a NUL is ignored, by the standard.
            "id" if !value.contains('\0') => self.last_id = Some(value.to_string()),
            // `retry` and unknown fields: agentd's client paces its own reconnects.
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<Event> {
        let kind = std::mem::take(&mut self.kind);
        let data = std::mem::take(&mut self.data);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        let kind = if kind.is_empty() { "message".to_string() } else { kind };
        Some(Event { id: self.last_id.clone(), kind, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: Option<&str>, kind: &str, data: &str) -> Event {
        Event { id: id.map(str::to_string), kind: kind.into(), data: data.into() }
    }

    #[test]
    fn agentds_events_parse_with_their_ids_and_kinds() {
        let mut p = Parser::new();
        let got = p.feed(b"id: 1\nevent: run.started\ndata: {\"run_id\":\"run_1\"}\n\n: keep-alive\n\nid:2\nevent:session.update\ndata:{}\n\n");
        assert_eq!(got, [event(Some("1"), "run.started", r#"{"run_id":"run_1"}"#), event(Some("2"), "session.update", "{}")]);
    }

    #[test]
    fn data_lines_join_with_newlines_and_only_one_space_is_dropped() {
        let mut p = Parser::new();
        let got = p.feed(b"data: first\ndata:  second\ndata\ndata: \n\n");
        assert_eq!(got, [event(None, "message", "first\n second\n\n")]);
    }

    #[test]
    fn every_line_ending_works_and_a_crlf_may_be_split() {
        let mut p = Parser::new();
        assert!(p.feed(b"id: 7\r").is_empty(), "a CR last may be half a CRLF");
        assert!(p.feed(b"\ndata: a\r\r").is_empty());
        let got = p.feed(b"\ndata: b\rdata: c\n\n");
        assert_eq!(got, [event(Some("7"), "message", "a"), event(Some("7"), "message", "b\nc")]);
    }

    #[test]
    fn bytes_cut_anywhere_give_the_same_events() {
        let stream = "\u{feff}: hello\n\nid: 1\nevent: session.update\ndata: {\"text\":\"h\u{e9}llo \u{1f600}\"}\n\nid: 2\ndata: x\n\n".as_bytes();
        let mut whole = Parser::new();
        let expected = whole.feed(stream);
        assert_eq!(expected.len(), 2);
        assert_eq!(expected[0].data, "{\"text\":\"h\u{e9}llo \u{1f600}\"}");
        for cut in 1..stream.len() {
            let mut p = Parser::new();
            let mut got = p.feed(&stream[..cut]);
            got.extend(p.feed(&stream[cut..]));
            assert_eq!(got, expected, "cut at {cut}");
        }
        let mut p = Parser::new();
        let got: Vec<Event> = stream.iter().flat_map(|b| p.feed(std::slice::from_ref(b))).collect();
        assert_eq!(got, expected, "one byte at a time");
    }

    #[test]
    fn comments_and_events_without_data_dispatch_nothing_but_ids_persist() {
        let mut p = Parser::new();
        assert!(p.feed(b": keep-alive\n\nid: 5\nevent: nothing\n\nretry: 10\nbogus: 1\n\n").is_empty());
        assert_eq!(p.feed(b"data: later\n\n"), [event(Some("5"), "message", "later")], "the id persists, the kind does not");
        assert_eq!(p.feed(b"id: a\0b\ndata: x\n\n"), [event(Some("5"), "message", "x")], "an id with NUL is ignored");
    }

    #[test]
    fn an_event_cut_off_by_the_end_of_the_stream_is_not_dispatched() {
        let mut p = Parser::new();
        assert!(p.feed(b"id: 9\nevent: run.completed\ndata: {}\n").is_empty());
    }
}
