//! `agentd node ls`: the fleet's nodes (`GET /v1/nodes`).

use std::process::ExitCode;

use serde_json::Value;

use super::http::Api;
use super::table::{Table, age, bytes, cell, now_ms};
use crate::cli::NodeCommand;

pub fn run(command: NodeCommand) -> anyhow::Result<ExitCode> {
    match command {
        NodeCommand::Ls(args) => {
            let api = Api::new(&args.client)?;
            let answer = super::block_on(async { Ok(api.get("/v1/nodes").await?) })?;
            if args.json {
                super::print_json(&answer);
            } else {
                print!("{}", table(&answer, now_ms()));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn table(answer: &Value, now: i64) -> String {
    let mut table = Table::new(&["NODE", "STATE", "ADDRESS", "SANDBOXES", "MEMORY", "CPUS", "LABELS", "HEARTBEAT"]);
    for n in answer["nodes"].as_array().into_iter().flatten() {
        let (capacity, usage) = (&n["capacity"], &n["usage"]);
        let sandboxes = format!("{}/{}", cell(&usage["sandboxes"]), cell(&capacity["slots"]));
        let memory = format!("{}/{}", bytes(&usage["memory_current"]), bytes(&capacity["memory_bytes"]));
        let labels: Vec<String> = n["labels"].as_object().into_iter().flatten().map(|(k, v)| format!("{k}={}", cell(v))).collect();
        let state = match n["error"].as_str().filter(|e| !e.is_empty()) {
            Some(e) => format!("{} ({e})", cell(&n["state"])),
            None => cell(&n["state"]),
        };
        let heartbeat = match n["last_heartbeat_at"] {
            Value::Null => "-".to_string(),
            ref at => format!("{} ago", age(at, now)),
        };
        let labels = if labels.is_empty() { "-".to_string() } else { labels.join(",") };
        table.row(vec![cell(&n["id"]), state, cell(&n["address"]), sandboxes, memory, cell(&capacity["cpus"]), labels, heartbeat]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nodes_read_as_a_table() {
        let now = 1_000_000;
        let answer = json!({"nodes": [{"id": "local", "state": "alive", "address": "unix:/run/agentd/node.sock", "labels": {"zone": "a"},
            "capacity": {"slots": 1000, "memory_bytes": 8u64 << 30, "cpus": 4.0}, "usage": {"sandboxes": 2, "memory_current": 512u64 << 20},
            "last_heartbeat_at": now - 3000, "error": null}]});
        assert_eq!(
            table(&answer, now),
            "NODE   STATE  ADDRESS                     SANDBOXES  MEMORY   CPUS  LABELS  HEARTBEAT\n\
             local  alive  unix:/run/agentd/node.sock  2/1000     512M/8G  4.0   zone=a  3s ago\n"
        );
    }
}
