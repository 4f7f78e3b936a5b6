//! `agentd session create | ls | get | rm`.
//!
//! A create on a terminal shows one updating line while the sandbox is
//! built and the agent installed and started: it asks the API not to wait
//! (`Prefer: respond-async`, so it learns the session id at once), then
//! repeats the request under the same `Idempotency-Key`, which waits for
//! the outcome (201, or the create's problem with its code) while `GET
//! /v1/sessions/{id}` is polled for the agent's `installing` / `starting`.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::http::{Api, segment};
use super::table::{Table, age, cell, now_ms};
use crate::cli::{GetArgs, IdsArgs, ListArgs, SessionCommand, SessionCreateArgs};

/// How often the progress line asks how the create goes.
const PROGRESS_POLL: Duration = Duration::from_millis(250);

pub fn run(command: SessionCommand) -> anyhow::Result<ExitCode> {
    match command {
        SessionCommand::Create(args) => create(args),
        SessionCommand::Ls(args) => list(args),
        SessionCommand::Get(args) => get(args),
        SessionCommand::Rm(args) => remove(args),
    }
}

fn create(args: SessionCreateArgs) -> anyhow::Result<ExitCode> {
    let body = create_body(&args)?;
    let api = Api::new(&args.client)?;
    super::block_on(async {
        let view = if std::io::stderr().is_terminal() { create_watched(&api, &body).await? } else { api.post("/v1/sessions", &body).await?.1 };
        let id = view["id"].as_str().unwrap_or_default();
        if args.json {
            super::print_json(&view);
        } else {
            println!("{id}");
        }
        if view["state"] == "creating" {
            eprintln!("agentd: session {id} is still being created; `agentd session get {id}` shows how it goes");
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// The request body: the agent (by registry id, or its definition from a
/// file), the session's `--label`s, and either the container to open it in
/// or the new container's profile.
fn create_body(args: &SessionCreateArgs) -> anyhow::Result<Value> {
    let mut body = Map::new();
    match (&args.agent, &args.agent_file) {
        (Some(id), _) => {
            body.insert("agent_id".into(), json!(id));
        }
        (None, Some(file)) => {
            body.insert("manual_agent".into(), read_json(file, "agent")?);
        }
        (None, None) => anyhow::bail!("give --agent ID or --agent-file FILE"),
    }
    if !args.label.is_empty() {
        let labels: Map<String, Value> = args.label.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        body.insert("labels".into(), Value::Object(labels));
    }
    if let Some(container) = &args.container {
        body.insert("container_id".into(), json!(container));
        return Ok(Value::Object(body));
    }
    let profile = match &args.profile_file {
        Some(file) => read_json(file, "profile")?,
        None => json!({}),
    };
    if !profile.is_object() {
        anyhow::bail!("the profile in {} is not a JSON object", args.profile_file.as_deref().unwrap_or(Path::new("-")).display());
    }
    body.insert("container_profile".into(), profile);
    Ok(Value::Object(body))
}

/// A JSON file, `-` for stdin.
fn read_json(file: &Path, what: &str) -> anyhow::Result<Value> {
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).with_context(|| format!("cannot read the {what} from stdin"))?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read the {what} file {}", file.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("the {what} file {} is not JSON", file.display()))
}

/// A create that shows its progress on stderr; the session as the create's
/// answer gives it.
async fn create_watched(api: &Api, body: &Value) -> anyhow::Result<Value> {
    let key = format!("agentd-cli-{}", uuid::Uuid::new_v4());
    let started = Instant::now();
    let first = api
        .call(Method::POST, "/v1/sessions", |r| r.header("Prefer", "respond-async").header("Idempotency-Key", &key).json(body))
        .await?;
    let status = first.status();
    let view = api.json("/v1/sessions", first).await?;
    // Done already, or a server that always waits.
    if status != StatusCode::ACCEPTED {
        return Ok(view);
    }
    let id = view["id"].as_str().unwrap_or_default().to_string();
    let path = format!("/v1/sessions/{}", segment(&id));
    let outcome = api.post_keyed("/v1/sessions", &key, body);
    tokio::pin!(outcome);
    let mut line = Progress::default();
    line.show(&progress(&id, &view, started.elapsed()));
    let mut tick = tokio::time::interval(PROGRESS_POLL);
    let answer = loop {
        tokio::select! {
            answer = &mut outcome => break answer,
            _ = tick.tick() => {
                if let Ok(view) = api.get(&path).await {
                    line.show(&progress(&id, &view, started.elapsed()));
                }
            }
        }
    };
    line.clear();
    Ok(answer?.1)
}

/// One line, rewritten in place.
#[derive(Default)]
struct Progress {
    shown: bool,
}

impl Progress {
    fn show(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{text}");
        let _ = err.flush();
        self.shown = true;
    }

    fn clear(&mut self) {
        if std::mem::take(&mut self.shown) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

/// `creating ses_...: installing the agent (2.1 s)`.
fn progress(id: &str, view: &Value, elapsed: Duration) -> String {
    let stage = match (view["state"].as_str(), view["agent"]["state"].as_str()) {
        (Some("creating"), Some("installing")) => "installing the agent (fetching and unpacking its bundle)",
        (Some("creating"), Some("starting")) => "starting the agent",
        (Some("creating"), _) => "building the sandbox",
        (Some("ready"), _) => "ready",
        (Some(other), _) => other,
        (None, _) => "creating",
    };
    format!("session {id}: {stage} ({:.1} s)", elapsed.as_secs_f64())
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let mut answer = super::block_on(async { Ok(api.get("/v1/sessions").await?) })?;
    if !args.all
        && let Some(sessions) = answer["sessions"].as_array_mut()
    {
        sessions.retain(|s| s["state"] != "closed");
    }
    if args.json {
        super::print_json(&answer);
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_ms();
    let mut table = Table::new(&["SESSION", "STATE", "AGENT", "CONTAINER", "CREATED"]);
    for s in answer["sessions"].as_array().into_iter().flatten() {
        table.row(vec![cell(&s["id"]), state(s), agent(s), cell(&s["container_id"]), age(&s["created_at"], now)]);
    }
    print!("{}", table.render());
    Ok(ExitCode::SUCCESS)
}

/// The state, with the error code of a failed one.
fn state(s: &Value) -> String {
    match s["error_code"].as_str() {
        Some(code) if !code.is_empty() => format!("{} ({code})", cell(&s["state"])),
        _ => cell(&s["state"]),
    }
}

/// `id@version`, from a list row or a view.
fn agent(s: &Value) -> String {
    let id = s["agent_id"].as_str().or(s["agent"]["id"].as_str()).unwrap_or("-");
    match s["agent_version"].as_str().or(s["agent"]["version"].as_str()) {
        Some(v) if !v.is_empty() => format!("{id}@{v}"),
        _ => id.to_string(),
    }
}

fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let view = super::block_on(async { Ok(api.get(&format!("/v1/sessions/{}", segment(&args.id))).await?) })?;
    if args.json {
        super::print_json(&view);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", describe(&view, now_ms()));
    Ok(ExitCode::SUCCESS)
}

/// A session's view as a few lines and a table of its runs.
fn describe(v: &Value, now: i64) -> String {
    let a = &v["agent"];
    let mut agent_line = format!("{} ({})", agent(v), cell(&a["state"]));
    if let Some(pid) = a["pid"].as_i64().filter(|p| *p > 0) {
        agent_line.push_str(&format!(", pid {pid}"));
    }
    if let Some(n) = a["restarts"].as_i64().filter(|n| *n > 0) {
        agent_line.push_str(&format!(", {n} restarts"));
    }
    if let Some(e) = a["last_error"].as_str().filter(|e| !e.is_empty()) {
        agent_line.push_str(&format!(", last error: {e}"));
    }
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<12}{value}\n"));
    field("session", cell(&v["id"]));
    field("state", state(v));
    if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
        field("error", e.to_string());
    }
    field("container", cell(&v["container_id"]));
    field("agent", agent_line);
    field("acp session", cell(&v["acp_session_id"]));
    field("working dir", cell(&v["working_dir"]));
    if let Some(mode) = v["modes"]["currentModeId"].as_str() {
        field("mode", mode.to_string());
    }
    field("created", format!("{} ago", age(&v["created_at"], now)));
    field("last event", cell(&v["last_event_id"]));
    let runs = v["runs"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !runs.is_empty() {
        let mut table = Table::new(&["RUN", "STATE", "STOP REASON", "ERROR", "CREATED"]);
        for r in runs {
            let error = match (r["error_code"].as_str(), r["error"].as_str()) {
                (Some(code), Some(e)) => format!("{code}: {e}"),
                (None, Some(e)) => e.to_string(),
                _ => "-".into(),
            };
            table.row(vec![cell(&r["id"]), cell(&r["state"]), cell(&r["stop_reason"]), error, age(&r["created_at"], now)]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

fn remove(args: IdsArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    super::block_on(async {
        for id in &args.ids {
            api.delete(&format!("/v1/sessions/{}", segment(id))).await?;
            println!("{id}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ClientArgs;

    fn args() -> SessionCreateArgs {
        SessionCreateArgs {
            client: ClientArgs { server: None, token: None, state_dir: "/nonexistent".into() },
            agent: Some("echo".into()),
            agent_file: None,
            container: None,
            profile_file: None,
            label: vec![],
            json: false,
        }
    }

    #[test]
    fn a_create_names_the_agent_its_labels_and_the_profile() {
        assert_eq!(create_body(&args()).unwrap(), json!({"agent_id": "echo", "container_profile": {}}));
        let dir = tempfile::tempdir().unwrap();
        let profile = dir.path().join("profile.json");
        std::fs::write(&profile, r#"{"memory": "256M", "node_selector": {"disk": "ssd"}}"#).unwrap();
        let with = SessionCreateArgs { profile_file: Some(profile), label: vec![("zone".into(), "a".into())], ..args() };
        let body = create_body(&with).unwrap();
        assert_eq!(body["container_profile"], json!({"memory": "256M", "node_selector": {"disk": "ssd"}}));
        assert_eq!(body["labels"], json!({"zone": "a"}));
        let agent = dir.path().join("agent.json");
        std::fs::write(&agent, r#"{"id": "echo-local"}"#).unwrap();
        let further = SessionCreateArgs { agent: None, agent_file: Some(agent), container: Some("ctr_1".into()), ..args() };
        assert_eq!(create_body(&further).unwrap(), json!({"manual_agent": {"id": "echo-local"}, "container_id": "ctr_1"}));
        std::fs::write(dir.path().join("bad.json"), "{not json").unwrap();
        let bad = SessionCreateArgs { agent: None, agent_file: Some(dir.path().join("bad.json")), ..args() };
        assert!(format!("{:#}", create_body(&bad).unwrap_err()).contains("is not JSON"));
    }

    #[test]
    fn the_progress_line_names_the_stage() {
        let at = Duration::from_millis(2100);
        let view = |agent: Value| json!({"id": "ses_1", "state": "creating", "agent": agent});
        assert_eq!(progress("ses_1", &view(json!({"state": "installing"})), at), "session ses_1: installing the agent (fetching and unpacking its bundle) (2.1 s)");
        assert_eq!(progress("ses_1", &view(json!({"state": "starting"})), at), "session ses_1: starting the agent (2.1 s)");
        assert_eq!(progress("ses_1", &view(json!({"id": "echo"})), at), "session ses_1: building the sandbox (2.1 s)");
    }

    #[test]
    fn a_session_reads_as_lines_and_its_runs_as_a_table() {
        let now = 1_000_000;
        let v = json!({"id": "ses_1", "state": "ready", "container_id": "ctr_1", "acp_session_id": "sess_9", "working_dir": "/workspace",
            "agent": {"id": "echo", "version": "1.0", "state": "ready", "pid": 2, "restarts": 0},
            "created_at": now - 60_000, "last_event_id": 3, "modes": null,
            "runs": [{"id": "run_1", "state": "completed", "stop_reason": "end_turn", "error": null, "created_at": now - 5_000}]});
        let text = describe(&v, now);
        assert!(text.contains("agent       echo@1.0 (ready), pid 2\n"), "{text}");
        assert!(text.contains("last event  3\n"), "{text}");
        assert!(text.contains("run_1  completed  end_turn     -      5s\n"), "{text}");
    }
}
