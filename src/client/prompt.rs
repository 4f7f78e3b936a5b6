//! `agentd prompt SESSION TEXT`: sends the prompt and streams the turn.
//!
//! The stream starts after the session's `last_event_id`, read before the
//! prompt is sent, so no event of this turn is missed; events before this
//! turn's `run.started` (another client's turn ending late) are skipped, and
//! the turn's end (`run.completed` / `run.failed` with its run id) ends the
//! command: exit 0 for `end_turn`, 1 with one line on stderr otherwise.
//!
//! The agent's message text goes to stdout as it comes; tool calls, plan
//! entries, permission requests and their outcomes are one line each on
//! stderr ([`super::render`]). A permission request is asked on the
//! terminal when stdin is one; otherwise it is left to the session's policy
//! and its timeout. Ctrl-C asks the agent to cancel the turn
//! (`POST /v1/sessions/{id}:cancel`); a second one quits at once.

use std::collections::VecDeque;
use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::follow::{Follow, WireEvent};
use super::http::{Api, segment};
use super::render::{self, Choice, Out, Renderer};
use crate::cli::PromptArgs;

/// How long the stream may stay broken during a turn before the command
/// gives up (the turn goes on; `agentd events` shows it).
const STREAM_OUTAGE: Duration = Duration::from_secs(120);

/// The exit of a command stopped by a second Ctrl-C, as shells count it.
const INTERRUPTED: u8 = 130;

pub fn run(args: PromptArgs) -> anyhow::Result<ExitCode> {
    let text = if args.text == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("cannot read the prompt from stdin")?;
        text
    } else {
        args.text.clone()
    };
    let api = Api::new(&args.client)?;
    super::block_on(prompt(&api, &args.session, text))
}

async fn prompt(api: &Api, session: &str, text: String) -> anyhow::Result<ExitCode> {
    let path = format!("/v1/sessions/{}", segment(session));
    let view = api.get(&path).await?;
    // Unknown when the node did not answer: then from the first event,
    // this turn's found by its run id.
    let after = view["last_event_id"].as_u64().unwrap_or(0);
    // From here Ctrl-C is ours.
    let mut interrupts = signal(SignalKind::interrupt()).context("cannot catch Ctrl-C")?;
    let mut out = Terminal::new();
    let (prompt_path, body) = (format!("{path}:prompt"), json!({"prompt": text}));
    let post = api.post(&prompt_path, &body);
    tokio::pin!(post);
    let mut interrupted = false;
    let answer = loop {
        tokio::select! {
            answer = &mut post => break answer?.1,
            _ = interrupts.recv() => {
                if interrupted {
                    out.note("agentd: interrupted while the prompt was being sent; the turn may still run");
                    return Ok(ExitCode::from(INTERRUPTED));
                }
                interrupted = true;
                out.note("cancelling the turn once it starts (Ctrl-C again to quit)");
            }
        }
    };
    let run_id = answer["run_id"].as_str().context("the prompt's answer has no run_id")?.to_string();
    if interrupted {
        cancel(api, &path, &mut out).await;
    }
    let mut turn = Turn { run_id, started: false, renderer: Renderer::default(), asker: Asker::new(std::io::stdin().is_terminal()) };
    let mut events = Follow::new(api, session, after, Some(STREAM_OUTAGE));
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event? else {
                    out.finish();
                    eprintln!("agentd: the session ended before the turn did ({})", ended(api, &path, &turn.run_id).await);
                    return Ok(ExitCode::FAILURE);
                };
                if let Some(code) = turn.event(&event, &mut out) {
                    return Ok(code);
                }
            }
            _ = interrupts.recv() => {
                turn.asker.close_line();
                if interrupted {
                    out.finish();
                    eprintln!("agentd: interrupted; run {} may still be running (`agentd events {session} --follow` shows it)", turn.run_id);
                    return Ok(ExitCode::from(INTERRUPTED));
                }
                interrupted = true;
                out.note("cancelling the turn (Ctrl-C again to quit)");
                cancel(api, &path, &mut out).await;
            }
            Some(line) = turn.asker.next_line() => turn.asker.answer(api, &path, &line, &mut out).await,
        }
    }
}

/// `POST :cancel`; a turn that already ended is no error.
async fn cancel(api: &Api, path: &str, out: &mut Terminal) {
    match api.post(&format!("{path}:cancel"), &json!({})).await {
        Ok(_) => {}
        Err(e) if e.code() == Some("no_active_run") => {}
        Err(e) => out.note(&format!("agentd: cannot cancel the turn: {e}")),
    }
}

/// How the run ended, as the store recorded it, when the stream ended first.
async fn ended(api: &Api, path: &str, run_id: &str) -> String {
    let Ok(view) = api.get(path).await else { return format!("session state unknown; run {run_id}") };
    let run = view["runs"].as_array().and_then(|runs| runs.iter().find(|r| r["id"] == run_id));
    let run_state = run.and_then(|r| r["state"].as_str()).unwrap_or("unknown");
    format!("session {}, run {run_id} {run_state}", view["state"].as_str().unwrap_or("unknown"))
}

/// One turn being shown.
struct Turn {
    run_id: String,
    /// Whether this turn's `run.started` went by: what comes before it is
    /// another turn's.
    started: bool,
    renderer: Renderer,
    asker: Asker,
}

impl Turn {
    /// Shows one event; the command's exit once the turn is over.
    fn event(&mut self, event: &WireEvent, out: &mut Terminal) -> Option<ExitCode> {
        let data = event.json();
        let ours = data["run_id"].as_str() == Some(self.run_id.as_str());
        if self.started && event.kind != "permission.requested" {
            // Whatever is said next goes on a line of its own.
            self.asker.close_line();
        }
        match event.kind.as_str() {
            "run.started" if ours => self.started = true,
            _ if !self.started => {}
            "session.update" => {
                for o in self.renderer.update(&data) {
                    match o {
                        Out::Text(text) => out.text(&text),
                        Out::Note(note) => out.note(&note),
                    }
                }
            }
            "permission.requested" => self.asker.requested(&data, &self.renderer, out),
            "permission.resolved" => self.asker.resolved(&data, &self.renderer, out),
            "agent.protocol_error" => out.note(&format!("agent protocol error: {}", data["error"].as_str().unwrap_or_default())),
            "sandbox.oom" => out.note(&format!("sandbox: out of memory ({} OOM kills)", data["oom_kills"])),
            "run.completed" if ours => {
                out.finish();
                return Some(match data["stop_reason"].as_str().unwrap_or_default() {
                    "end_turn" => ExitCode::SUCCESS,
                    reason => {
                        eprintln!("agentd: {}", render::stop_reason(reason));
                        ExitCode::FAILURE
                    }
                });
            }
            "run.failed" if ours => {
                out.finish();
                let error = data["error"].as_str().unwrap_or("no reason given");
                match data["code"].as_str().filter(|c| !c.is_empty()) {
                    Some(code) => eprintln!("agentd: the turn failed: {code}: {error}"),
                    None => eprintln!("agentd: the turn failed: {error}"),
                }
                return Some(ExitCode::FAILURE);
            }
            _ => {}
        }
        None
    }
}

/// stdout for the answer's text, stderr for notes, kept readable together
/// on one terminal.
struct Terminal {
    /// Whether stdout's text so far ends a line.
    at_line_start: bool,
    stdout_is_terminal: bool,
}

impl Terminal {
    fn new() -> Terminal {
        Terminal { at_line_start: true, stdout_is_terminal: std::io::stdout().is_terminal() }
    }

    fn text(&mut self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
        self.at_line_start = text.ends_with('\n');
    }

    /// A line on stderr, on a line of its own when both go to a terminal.
    fn note(&mut self, note: &str) {
        if !self.at_line_start && self.stdout_is_terminal {
            self.text("\n");
        }
        eprintln!("{note}");
    }

    /// Ends the answer's last line.
    fn finish(&mut self) {
        if !self.at_line_start {
            self.text("\n");
        }
    }
}

/// A permission request waiting for its answer.
struct Pending {
    request_id: String,
    title: String,
    choices: Vec<Choice>,
}

/// Asks permission requests on the terminal, one at a time, from lines
/// read off stdin by a thread of their own (started at the first request).
struct Asker {
    interactive: bool,
    lines: Option<mpsc::UnboundedReceiver<String>>,
    /// Requests not yet answered; the first is the one asked.
    queue: VecDeque<Pending>,
    /// Whether the question's line waits for its answer, unended.
    line_open: bool,
}

impl Asker {
    fn new(interactive: bool) -> Asker {
        Asker { interactive, lines: None, queue: VecDeque::new(), line_open: false }
    }

    /// The next line typed, while a request waits for one.
    async fn next_line(&mut self) -> Option<String> {
        match (&mut self.lines, self.queue.is_empty()) {
            (Some(lines), false) => lines.recv().await,
            _ => std::future::pending().await,
        }
    }

    fn requested(&mut self, data: &Value, renderer: &Renderer, out: &mut Terminal) {
        let title = renderer.tool_title(&data["tool_call"]);
        let choices = render::choices(&data["options"]);
        if !self.interactive {
            let names: Vec<&str> = choices.iter().map(|c| c.id.as_str()).collect();
            let timeout = match data["timeout_ms"].as_u64().filter(|t| *t > 0) {
                Some(ms) => format!(" (it times out after {} s)", ms / 1000),
                None => String::new(),
            };
            out.note(&format!(
                "permission: {title} [{}]: stdin is not a terminal, so it stays unanswered here: the session's policy decides{timeout}",
                names.join(", ")
            ));
            return;
        }
        if self.lines.is_none() {
            self.lines = Some(read_lines());
        }
        self.queue.push_back(Pending { request_id: data["request_id"].as_str().unwrap_or_default().to_string(), title, choices });
        if self.queue.len() == 1 {
            self.ask(out);
        }
    }

    fn ask(&mut self, out: &mut Terminal) {
        // Lines typed before the question are no answer to it.
        if let Some(lines) = &mut self.lines {
            while lines.try_recv().is_ok() {}
        }
        let Some(p) = self.queue.front() else { return };
        out.note(&format!("permission: the agent asks for {}", p.title));
        for (i, c) in p.choices.iter().enumerate() {
            eprintln!("  {}) {}", i + 1, c.label);
        }
        eprint!("answer 1-{} (Enter leaves it to the session's policy): ", p.choices.len());
        let _ = std::io::stderr().flush();
        self.line_open = true;
    }

    /// Ends the question's line, when something else is to be said.
    fn close_line(&mut self) {
        if std::mem::take(&mut self.line_open) {
            eprintln!();
        }
    }

    async fn answer(&mut self, api: &Api, path: &str, line: &str, out: &mut Terminal) {
        let Some(p) = self.queue.front() else { return };
        // The terminal echoed the line's end.
        self.line_open = false;
        let (request_id, title) = (p.request_id.clone(), p.title.clone());
        if line.trim().is_empty() {
            out.note(&format!("permission: {title}: left to the session's policy"));
            self.queue.pop_front();
            self.ask(out);
            return;
        }
        let Some(choice) = render::pick(&p.choices, line).map(|c| c.id.clone()) else {
            eprint!("answer 1-{} or Enter: ", p.choices.len());
            let _ = std::io::stderr().flush();
            self.line_open = true;
            return;
        };
        let url = format!("{path}/permissions/{}", segment(&request_id));
        match api.post(&url, &json!({"option_id": choice})).await {
            // Its outcome is shown with its `permission.resolved`.
            Ok(_) => {}
            Err(e) if e.code() == Some("permission_request_not_found") => out.note(&format!("permission: {title}: already resolved")),
            Err(e) => out.note(&format!("agentd: cannot answer the permission request: {e}")),
        }
        self.queue.retain(|p| p.request_id != request_id);
        self.ask(out);
    }

    fn resolved(&mut self, data: &Value, renderer: &Renderer, out: &mut Terminal) {
        let request_id = data["request_id"].as_str().unwrap_or_default();
        let title = renderer.tool_title(&data["tool_call"]);
        let was_asked = self.queue.front().is_some_and(|p| p.request_id == request_id);
        self.queue.retain(|p| p.request_id != request_id);
        self.close_line();
        out.note(&render::resolved(&title, data));
        if was_asked {
            self.ask(out);
        }
    }
}

/// stdin's lines, read by a thread (a blocking read cannot be cancelled);
/// it ends with stdin.
fn read_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line.clone()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}
