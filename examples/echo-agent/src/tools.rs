//! Runs the prompt commands of [`crate::commands`] against the client, with
//! the SDK's typed agent-to-client requests, and streams the results back.
//!
//! What the client answered, or the JSON-RPC error it gave (as
//! `error CODE: MESSAGE`), comes back as `agent_message_chunk` text, so a test
//! reading the session's updates sees it. A method the client did not
//! advertise in `initialize` is never called: the turn says so instead.
//! Terminal commands also report a `tool_call` (kind `execute`) that shows
//! the terminal while it runs and ends `completed` with the exit status,
//! output and truncation flag in `rawOutput`.

use agent_client_protocol::v1::ConnectionTo;
use agent_client_protocol::{Client, Error};
use agent_client_protocol_schema::v1::{
    ClientCapabilities, ContentBlock, ContentChunk, CreateTerminalRequest, EnvVariable,
    KillTerminalRequest, PermissionOption, PermissionOptionKind, ReadTextFileRequest,
    RequestPermissionOutcome, RequestPermissionRequest, ReleaseTerminalRequest, SessionId,
    SessionNotification, SessionUpdate, StopReason, Terminal, TerminalExitStatus, TerminalId,
    TerminalOutputRequest, TerminalOutputResponse, TextContent, ToolCall, ToolCallContent,
    ToolCallId, ToolCallStatus, ToolCallUpdate, ToolCallUpdateFields, ToolKind,
    WaitForTerminalExitRequest, WriteTextFileRequest,
};
use serde_json::json;

use crate::agent::TurnCancel;
use crate::commands::{Command, RunSpec};

/// One turn's view of the client.
pub struct Tools<'a> {
    pub cx: &'a ConnectionTo<Client>,
    pub session_id: &'a SessionId,
    pub caps: &'a ClientCapabilities,
    /// Unique within the connection: tool call ids name one call.
    pub tool_call_id: ToolCallId,
}

/// How a client's error reads in the turn's text.
pub fn describe(error: &Error) -> String {
    format!("error {}: {}", i32::from(error.code), error.message)
}

/// The line that ends a terminal's report: `[exit code 3]`,
/// `[signal SIGKILL]`, with ` [truncated]` when output was dropped.
pub fn status_line(exit: Option<&TerminalExitStatus>, truncated: bool) -> String {
    let mut line = match exit {
        Some(TerminalExitStatus {
            exit_code: Some(code),
            ..
        }) => format!("[exit code {code}]"),
        Some(TerminalExitStatus {
            signal: Some(signal),
            ..
        }) => format!("[signal {signal}]"),
        Some(_) => "[exited]".to_string(),
        None => "[running]".to_string(),
    };
    if truncated {
        line.push_str(" [truncated]");
    }
    line
}

impl Tools<'_> {
    pub async fn run(
        &self,
        command: Command,
        cancel: &mut TurnCancel,
    ) -> Result<StopReason, Error> {
        match command {
            Command::Usage(usage) => self.say(usage)?,
            Command::Crash { .. } | Command::Emit(_) | Command::Logout | Command::Mcp | Command::Dirs => unreachable!("the agent's own commands, run by State"),
            Command::Read { path, line, limit } => self.read(path, line, limit).await?,
            Command::Write { path, content } => self.write(path, content).await?,
            Command::Run(spec) => return self.terminal(spec, false, cancel).await,
            Command::Kill { command, args } => {
                let spec = RunSpec {
                    command,
                    args,
                    ..RunSpec::default()
                };
                return self.terminal(spec, true, cancel).await;
            }
            Command::Output { terminal_id } => self.output(terminal_id).await?,
            Command::Ask { title, cancel_after_ms } => return self.ask(title, cancel_after_ms).await,
        }
        Ok(StopReason::EndTurn)
    }

    fn say(&self, text: &str) -> Result<(), Error> {
        if text.is_empty() {
            return Ok(());
        }
        self.update(SessionUpdate::AgentMessageChunk(ContentChunk::new(
            ContentBlock::Text(TextContent::new(text)),
        )))
    }

    fn update(&self, update: SessionUpdate) -> Result<(), Error> {
        self.cx
            .send_notification(SessionNotification::new(self.session_id.clone(), update))
    }

    /// Marks the tool call failed and says why.
    fn tool_failed(&self, text: &str) -> Result<(), Error> {
        self.tool_update(ToolCallUpdateFields::new().status(ToolCallStatus::Failed).raw_output(json!({"error": text})))?;
        self.say(text)
    }

    fn tool_update(&self, fields: ToolCallUpdateFields) -> Result<(), Error> {
        self.update(SessionUpdate::ToolCallUpdate(ToolCallUpdate::new(
            self.tool_call_id.clone(),
            fields,
        )))
    }

    async fn read(&self, path: String, line: Option<u32>, limit: Option<u32>) -> Result<(), Error> {
        if !self.caps.fs.read_text_file {
            return self.say("error: the client does not offer fs/read_text_file");
        }
        let request = ReadTextFileRequest::new(self.session_id.clone(), path)
            .line(line)
            .limit(limit);
        match self.cx.send_request(request).block_task().await {
            Ok(response) => self.say(&response.content),
            Err(e) => self.say(&describe(&e)),
        }
    }

    async fn write(&self, path: String, content: String) -> Result<(), Error> {
        if !self.caps.fs.write_text_file {
            return self.say("error: the client does not offer fs/write_text_file");
        }
        let bytes = content.len();
        let request = WriteTextFileRequest::new(self.session_id.clone(), path.clone(), content);
        match self.cx.send_request(request).block_task().await {
            Ok(_) => self.say(&format!("wrote {bytes} bytes to {path}")),
            Err(e) => self.say(&describe(&e)),
        }
    }

    /// Asks the client for permission and says which option it chose:
    /// `permission: selected ID` or `permission: cancelled`. A cancelled
    /// answer means the client cancelled the turn, which then ends
    /// `cancelled`, as the spec asks of agents.
    async fn ask(&self, title: String, cancel_after_ms: Option<u64>) -> Result<StopReason, Error> {
        let tool_call = ToolCallUpdate::new(self.tool_call_id.clone(), ToolCallUpdateFields::new().title(title));
        let options = vec![
            PermissionOption::new("allow", "Allow", PermissionOptionKind::AllowOnce),
            PermissionOption::new("reject", "Reject", PermissionOptionKind::RejectOnce),
        ];
        let request = RequestPermissionRequest::new(self.session_id.clone(), tool_call, options);
        let sent = self.cx.send_request(request);
        let withdraw = sent.cancellation_handle();
        let answer = sent.block_task();
        let answer = match cancel_after_ms {
            None => answer.await,
            Some(ms) => {
                tokio::pin!(answer);
                tokio::select! {
                    answer = &mut answer => answer,
                    () = tokio::time::sleep(std::time::Duration::from_millis(ms)) => {
                        // `$/cancel_request`; the client still answers (-32800).
                        withdraw.cancel()?;
                        answer.await
                    }
                }
            }
        };
        match answer {
            Ok(response) => match response.outcome {
                RequestPermissionOutcome::Selected(selected) => self.say(&format!("permission: selected {}", selected.option_id))?,
                _ => {
                    self.say("permission: cancelled")?;
                    return Ok(StopReason::Cancelled);
                }
            },
            Err(e) => self.say(&describe(&e))?,
        }
        Ok(StopReason::EndTurn)
    }

    async fn output(&self, terminal_id: String) -> Result<(), Error> {
        if !self.caps.terminal {
            return self.say("error: the client does not offer terminals");
        }
        let request = TerminalOutputRequest::new(self.session_id.clone(), terminal_id);
        match self.cx.send_request(request).block_task().await {
            Ok(out) => self.report(&out),
            Err(e) => self.say(&describe(&e)),
        }
    }

    fn report(&self, out: &TerminalOutputResponse) -> Result<(), Error> {
        self.say(&out.output)?;
        let newline = if out.output.is_empty() || out.output.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        let status = status_line(out.exit_status.as_ref(), out.truncated);
        self.say(&format!("{newline}{status}"))
    }

    /// `/run` (and `/kill` with `kill` set): create, [kill,] wait for the
    /// exit, read the output, release.
    async fn terminal(
        &self,
        spec: RunSpec,
        kill: bool,
        cancel: &mut TurnCancel,
    ) -> Result<StopReason, Error> {
        if !self.caps.terminal {
            self.say("error: the client does not offer terminals")?;
            return Ok(StopReason::EndTurn);
        }
        let title = std::iter::once(spec.command.as_str())
            .chain(spec.args.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        self.update(SessionUpdate::ToolCall(
            ToolCall::new(self.tool_call_id.clone(), title)
                .kind(ToolKind::Execute)
                .status(ToolCallStatus::Pending)
                .raw_input(json!({
                    "command": spec.command, "args": spec.args, "cwd": spec.cwd,
                    "outputByteLimit": spec.output_byte_limit, "kill": kill,
                })),
        ))?;
        let env = spec
            .env
            .into_iter()
            .map(|(name, value)| EnvVariable::new(name, value))
            .collect();
        let request = CreateTerminalRequest::new(self.session_id.clone(), spec.command)
            .args(spec.args)
            .env(env)
            .cwd(spec.cwd.map(std::path::PathBuf::from))
            .output_byte_limit(spec.output_byte_limit);
        let terminal_id = match self.cx.send_request(request).block_task().await {
            Ok(created) => created.terminal_id,
            Err(e) => {
                self.tool_failed(&describe(&e))?;
                return Ok(StopReason::EndTurn);
            }
        };
        self.tool_update(
            ToolCallUpdateFields::new()
                .status(ToolCallStatus::InProgress)
                .content(vec![ToolCallContent::Terminal(Terminal::new(
                    terminal_id.clone(),
                ))]),
        )?;
        let stop = self.finish_terminal(&terminal_id, kill, cancel).await;
        // Released whatever happened, so nothing outlives the turn.
        let release = ReleaseTerminalRequest::new(self.session_id.clone(), terminal_id);
        if let Err(e) = self.cx.send_request(release).block_task().await {
            self.say(&format!("release failed: {}", describe(&e)))?;
        }
        stop
    }

    async fn finish_terminal(
        &self,
        terminal_id: &TerminalId,
        kill: bool,
        cancel: &mut TurnCancel,
    ) -> Result<StopReason, Error> {
        if kill {
            let request = KillTerminalRequest::new(self.session_id.clone(), terminal_id.clone());
            if let Err(e) = self.cx.send_request(request).block_task().await {
                self.say(&format!("kill failed: {}", describe(&e)))?;
            }
        }
        let wait = WaitForTerminalExitRequest::new(self.session_id.clone(), terminal_id.clone());
        let waited = tokio::select! {
            waited = self.cx.send_request(wait).block_task() => waited,
            () = cancel.cancelled() => {
                let request = KillTerminalRequest::new(self.session_id.clone(), terminal_id.clone());
                let _ = self.cx.send_request(request).block_task().await;
                self.tool_update(ToolCallUpdateFields::new().status(ToolCallStatus::Failed))?;
                return Ok(StopReason::Cancelled);
            }
        };
        if let Err(e) = waited {
            self.say(&format!("wait failed: {}", describe(&e)))?;
        }
        let request = TerminalOutputRequest::new(self.session_id.clone(), terminal_id.clone());
        match self.cx.send_request(request).block_task().await {
            Ok(out) => {
                self.report(&out)?;
                let exit = out.exit_status.as_ref();
                self.tool_update(
                    ToolCallUpdateFields::new()
                        .status(ToolCallStatus::Completed)
                        .raw_output(json!({
                            "output": out.output,
                            "truncated": out.truncated,
                            "exitCode": exit.and_then(|e| e.exit_code),
                            "signal": exit.and_then(|e| e.signal.clone()),
                        })),
                )?;
            }
            Err(e) => {
                self.tool_failed(&describe(&e))?;
            }
        }
        Ok(StopReason::EndTurn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        let code = TerminalExitStatus::new().exit_code(3);
        assert_eq!(status_line(Some(&code), false), "[exit code 3]");
        let signal = TerminalExitStatus::new().signal("SIGKILL".to_string());
        assert_eq!(
            status_line(Some(&signal), true),
            "[signal SIGKILL] [truncated]"
        );
        assert_eq!(status_line(None, false), "[running]");
    }
}
