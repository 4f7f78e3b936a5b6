//! A turn's events as a terminal shows them: the agent's message text as
//! it streams (to stdout), everything else as one-line notes (to stderr):
//! tool calls and their status changes, plan entries as they are added or
//! change, mode changes, permission requests and how they were resolved.
//! Pure: it returns what to print, so tests read it back.

use std::collections::HashMap;

use serde_json::Value;

/// What to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// The agent's message text, printed as it comes, without a newline.
    Text(String),
    /// One line about something else.
    Note(String),
}

/// Remembers what a turn's notes refer back to: tool calls by id (an
/// update often carries only the id and its new status) and the plan (each
/// `plan` update is the whole plan again).
#[derive(Debug, Default)]
pub struct Renderer {
    /// `toolCallId` -> (title, last status shown).
    tools: HashMap<String, (String, String)>,
    /// The plan's entries as last shown: (content, status).
    plan: Vec<(String, String)>,
}

impl Renderer {
    /// A `session.update` event's data: `{"sessionId", "update": {...}}`.
    pub fn update(&mut self, data: &Value) -> Vec<Out> {
        let update = &data["update"];
        let text = |key: &str| update[key].as_str().unwrap_or_default().to_string();
        match update["sessionUpdate"].as_str().unwrap_or_default() {
            "agent_message_chunk" => content(&update["content"]).into_iter().collect(),
            "tool_call" => {
                let id = text("toolCallId");
                let title = non_empty(text("title")).unwrap_or_else(|| id.clone());
                let status = non_empty(text("status")).unwrap_or_else(|| "pending".into());
                let kind = match update["kind"].as_str() {
                    Some(kind) if kind != "other" => format!(" [{kind}]"),
                    _ => String::new(),
                };
                self.tools.insert(id, (title.clone(), status.clone()));
                vec![Out::Note(format!("tool: {title}{kind}: {status}"))]
            }
            "tool_call_update" => {
                let id = text("toolCallId");
                let (title, shown) = self.tools.entry(id.clone()).or_insert_with(|| (id.clone(), String::new()));
                if let Some(new_title) = non_empty(text("title")) {
                    *title = new_title;
                }
                match non_empty(text("status")) {
                    Some(status) if status != *shown => {
                        shown.clone_from(&status);
                        vec![Out::Note(format!("tool: {title}: {status}"))]
                    }
                    _ => vec![],
                }
            }
            "plan" => {
                let entries: Vec<(String, String)> = update["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| (e["content"].as_str().unwrap_or_default().to_string(), e["status"].as_str().unwrap_or("pending").to_string()))
                    .collect();
                let notes = entries
                    .iter()
                    .filter(|entry| !self.plan.contains(entry))
                    .map(|(content, status)| Out::Note(format!("plan: {} {content}", plan_mark(status))))
                    .collect();
                self.plan = entries;
                notes
            }
            "current_mode_update" => vec![Out::Note(format!("mode: {}", text("currentModeId")))],
            // Thoughts, echoed user messages, command lists, usage: not the answer.
            _ => vec![],
        }
    }

    /// The title a permission request's tool call goes by.
    pub fn tool_title(&self, tool_call: &Value) -> String {
        if let Some(title) = tool_call["title"].as_str().filter(|t| !t.is_empty()) {
            return title.to_string();
        }
        let id = tool_call["toolCallId"].as_str().unwrap_or_default();
        self.tools.get(id).map_or_else(|| if id.is_empty() { "a tool call".into() } else { id.to_string() }, |(title, _)| title.clone())
    }
}

/// A message chunk's content block: its text, or a note of what else it is.
fn content(block: &Value) -> Option<Out> {
    match block["type"].as_str().unwrap_or_default() {
        "text" => block["text"].as_str().filter(|t| !t.is_empty()).map(|t| Out::Text(t.to_string())),
        "resource_link" => Some(Out::Note(format!("link: {}", block["uri"].as_str().unwrap_or_default()))),
        "" => None,
        other => {
            let mime = block["mimeType"].as_str().map(|m| format!(" ({m})")).unwrap_or_default();
            Some(Out::Note(format!("the agent sent {other} content{mime}")))
        }
    }
}

fn plan_mark(status: &str) -> &'static str {
    match status {
        "completed" => "[x]",
        "in_progress" => "[~]",
        _ => "[ ]",
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// One permission option: its id, and how a person reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub id: String,
    pub label: String,
}

/// A `permission.requested` event's options, in the agent's order.
pub fn choices(options: &Value) -> Vec<Choice> {
    options
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let id = o["optionId"].as_str()?.to_string();
            let name = o["name"].as_str().filter(|n| !n.is_empty()).unwrap_or(&id);
            let label = match o["kind"].as_str() {
                Some(kind) => format!("{name} [{kind}]"),
                None => name.to_string(),
            };
            Some(Choice { id, label })
        })
        .collect()
}

/// What a typed answer picks: a number from 1, or an option id.
pub fn pick<'c>(choices: &'c [Choice], answer: &str) -> Option<&'c Choice> {
    let answer = answer.trim();
    match answer.parse::<usize>() {
        Ok(n) if n >= 1 => choices.get(n - 1),
        _ => choices.iter().find(|c| c.id == answer),
    }
}

/// A `permission.resolved` event as one line.
pub fn resolved(title: &str, data: &Value) -> String {
    let by = data["by"].as_str().unwrap_or("policy");
    match data["outcome"]["option_id"].as_str() {
        Some(option) => format!("permission: {title}: {option} (by {by})"),
        None => format!("permission: {title}: cancelled (by {by})"),
    }
}

/// Why a turn that did not end in `end_turn` ended, for its one line.
pub fn stop_reason(reason: &str) -> String {
    match reason {
        "cancelled" => "the turn was cancelled".into(),
        "refusal" => "the agent refused to go on (stop reason refusal)".into(),
        "max_tokens" => "the agent reached its token limit (stop reason max_tokens)".into(),
        "max_turn_requests" => "the agent reached its limit of requests in a turn (stop reason max_turn_requests)".into(),
        other => format!("the turn ended with stop reason {other}"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn update(u: Value) -> Value {
        json!({"sessionId": "sess_1", "update": u})
    }

    fn text(t: &str) -> Value {
        update(json!({"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": t}}))
    }

    #[test]
    fn message_chunks_are_text_as_they_come_and_thoughts_are_not() {
        let mut r = Renderer::default();
        let mut out: Vec<Out> = ["hello", " world"].iter().flat_map(|t| r.update(&text(t))).collect();
        out.extend(r.update(&update(json!({"sessionUpdate": "agent_thought_chunk", "content": {"type": "text", "text": "hmm"}}))));
        out.extend(r.update(&update(json!({"sessionUpdate": "user_message_chunk", "content": {"type": "text", "text": "hi"}}))));
        out.extend(r.update(&update(json!({"sessionUpdate": "some_future_kind", "x": 1}))));
        assert_eq!(out, [Out::Text("hello".into()), Out::Text(" world".into())]);
        let image = update(json!({"sessionUpdate": "agent_message_chunk", "content": {"type": "image", "mimeType": "image/png", "data": "..."}}));
        assert_eq!(r.update(&image), [Out::Note("the agent sent image content (image/png)".into())]);
    }

    #[test]
    fn a_tool_call_is_one_line_and_its_updates_one_line_per_status_change() {
        let mut r = Renderer::default();
        let call = update(json!({"sessionUpdate": "tool_call", "toolCallId": "t1", "title": "Read README.md", "kind": "read", "status": "pending"}));
        assert_eq!(r.update(&call), [Out::Note("tool: Read README.md [read]: pending".into())]);
        let progress = |status: Option<&str>| {
            let mut u = json!({"sessionUpdate": "tool_call_update", "toolCallId": "t1", "content": [{"type": "content", "content": {"type": "text", "text": "..."}}]});
            if let Some(s) = status {
                u["status"] = json!(s);
            }
            update(u)
        };
        assert_eq!(r.update(&progress(Some("in_progress"))), [Out::Note("tool: Read README.md: in_progress".into())]);
        assert_eq!(r.update(&progress(None)), [], "output without a new status says nothing");
        assert_eq!(r.update(&progress(Some("in_progress"))), [], "nor does the same status again");
        assert_eq!(r.update(&progress(Some("completed"))), [Out::Note("tool: Read README.md: completed".into())]);
        let unknown = update(json!({"sessionUpdate": "tool_call_update", "toolCallId": "t9", "status": "failed"}));
        assert_eq!(r.update(&unknown), [Out::Note("tool: t9: failed".into())], "an update of a call never seen is named by its id");
        let untitled = update(json!({"sessionUpdate": "tool_call", "toolCallId": "t2", "kind": "other"}));
        assert_eq!(r.update(&untitled), [Out::Note("tool: t2: pending".into())]);
        assert_eq!(r.tool_title(&json!({"toolCallId": "t1"})), "Read README.md");
        assert_eq!(r.tool_title(&json!({"toolCallId": "t1", "title": "rm -rf /"})), "rm -rf /");
    }

    #[test]
    fn plan_entries_are_shown_when_they_appear_or_change() {
        let mut r = Renderer::default();
        let plan = |entries: Value| update(json!({"sessionUpdate": "plan", "entries": entries}));
        let first = plan(json!([
            {"content": "read the code", "priority": "high", "status": "in_progress"},
            {"content": "write the fix", "priority": "high", "status": "pending"}]));
        assert_eq!(r.update(&first), [Out::Note("plan: [~] read the code".into()), Out::Note("plan: [ ] write the fix".into())]);
        let second = plan(json!([
            {"content": "read the code", "priority": "high", "status": "completed"},
            {"content": "write the fix", "priority": "high", "status": "pending"},
            {"content": "run the tests", "priority": "low", "status": "pending"}]));
        assert_eq!(r.update(&second), [Out::Note("plan: [x] read the code".into()), Out::Note("plan: [ ] run the tests".into())]);
        assert_eq!(r.update(&second), []);
    }

    #[test]
    fn permission_options_are_numbered_and_picked_by_number_or_id() {
        let options = json!([
            {"optionId": "allow", "name": "Allow", "kind": "allow_once"},
            {"optionId": "reject", "name": "Reject", "kind": "reject_once"},
            {"name": "no id"}]);
        let c = choices(&options);
        assert_eq!(c, [Choice { id: "allow".into(), label: "Allow [allow_once]".into() }, Choice { id: "reject".into(), label: "Reject [reject_once]".into() }]);
        assert_eq!(pick(&c, " 2\n").map(|c| c.id.as_str()), Some("reject"));
        assert_eq!(pick(&c, "allow").map(|c| c.id.as_str()), Some("allow"));
        assert_eq!(pick(&c, "0"), None);
        assert_eq!(pick(&c, "3"), None);
        assert_eq!(pick(&c, "maybe"), None);
        let by_client = json!({"by": "client", "request_id": "perm_1", "outcome": {"outcome": "selected", "option_id": "allow"}});
        assert_eq!(resolved("rm", &by_client), "permission: rm: allow (by client)");
        let timed_out = json!({"by": "cancel", "request_id": "perm_1", "outcome": {"outcome": "cancelled"}});
        assert_eq!(resolved("rm", &timed_out), "permission: rm: cancelled (by cancel)");
    }

    #[test]
    fn stop_reasons_read_as_sentences() {
        assert_eq!(stop_reason("cancelled"), "the turn was cancelled");
        assert_eq!(stop_reason("something_new"), "the turn ended with stop reason something_new");
    }
}
