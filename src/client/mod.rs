//! The client commands: `agentd session`, `prompt`, `container`, `node ls`
//! and `events`, over the HTTP API of a running agentd (`--server` /
//! `AGENTD_URL`), with a bearer token when one is known (`--token` /
//! `AGENTD_TOKEN`, else `<state-dir>/admin.token`).
//!
//! Layout: [`http`] (the server, the token, problem+json answers as
//! [`http::ApiError`]), [`sse`] (the event stream's parser), [`follow`] (a
//! session's stream across reconnects), [`render`] (a turn's events as text
//! and one-line notes), [`table`] (listings); one module per command group:
//! [`session`], [`prompt`], [`container`], [`node`], [`events`].
//!
//! Every refusal is one line, `agentd: <code>: <detail>` (exit 1), printed by
//! `main` from the [`http::ApiError`] a command returns.

pub mod container;
pub mod events;
pub mod follow;
pub mod http;
pub mod node;
pub mod prompt;
pub mod render;
pub mod session;
pub mod sse;
pub mod table;

use std::future::Future;

use serde_json::Value;

/// Runs a command's future on a runtime of its own: one thread is plenty
/// for a client, and starts faster than the daemon's.
fn block_on<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(future)
}

/// The API's JSON as `--json` prints it.
fn print_json(value: &Value) {
    println!("{}", serde_json::to_string_pretty(value).expect("JSON values serialize"));
}
