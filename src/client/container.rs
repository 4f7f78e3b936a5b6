//! `agentd container ls | get | rm | hibernate | resume`.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::Value;

use super::http::{Api, segment};
use super::table::{Table, age, bytes, cell, now_ms};
use crate::cli::{ContainerCommand, GetArgs, IdsArgs, ListArgs};

pub fn run(command: ContainerCommand) -> anyhow::Result<ExitCode> {
    match command {
        ContainerCommand::Ls(args) => list(args),
        ContainerCommand::Get(args) => get(args),
        ContainerCommand::Rm(args) => each(args, async |api, path| api.delete(path).await),
        ContainerCommand::Hibernate(args) => each(args, async |api, path| action(api, path, "hibernate").await),
        ContainerCommand::Resume(args) => each(args, async |api, path| action(api, path, "resume").await),
    }
}

/// Does `act` to each container in turn, printing its id once done; the
/// first refusal stops there.
fn each(args: IdsArgs, act: impl AsyncFn(&Api, &str) -> Result<(), super::http::ApiError>) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    super::block_on(async {
        for id in &args.ids {
            act(&api, &format!("/v1/containers/{}", segment(id))).await?;
            println!("{id}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn action(api: &Api, path: &str, verb: &str) -> Result<(), super::http::ApiError> {
    api.call(Method::POST, &format!("{path}:{verb}"), |r| r).await.map(drop)
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let mut answer = super::block_on(async { Ok(api.get("/v1/containers").await?) })?;
    if !args.all
        && let Some(containers) = answer["containers"].as_array_mut()
    {
        containers.retain(|c| c["state"] != "deleted");
    }
    if args.json {
        super::print_json(&answer);
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_ms();
    let mut table = Table::new(&["CONTAINER", "STATE", "NODE", "PID", "CREATED"]);
    for c in answer["containers"].as_array().into_iter().flatten() {
        table.row(vec![cell(&c["id"]), state(c), cell(&c["node_id"]), cell(&c["supervisor_pid"]), age(&c["created_at"], now)]);
    }
    print!("{}", table.render());
    Ok(ExitCode::SUCCESS)
}

fn state(c: &Value) -> String {
    match c["error_code"].as_str() {
        Some(code) if !code.is_empty() => format!("{} ({code})", cell(&c["state"])),
        _ => cell(&c["state"]),
    }
}

fn get(args: GetArgs) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.client)?;
    let view = super::block_on(async { Ok(api.get(&format!("/v1/containers/{}", segment(&args.id))).await?) })?;
    if args.json {
        super::print_json(&view);
    } else {
        print!("{}", describe(&view, now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

/// A container's view as a few lines and a table of its agents.
fn describe(v: &Value, now: i64) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| out.push_str(&format!("{name:<12}{value}\n"));
    field("container", cell(&v["id"]));
    field("state", state(v));
    if let Some(e) = v["error"].as_str().filter(|e| !e.is_empty()) {
        field("error", e.to_string());
    }
    field("node", cell(&v["node_id"]));
    field("pid", cell(&v["supervisor_pid"]));
    field("profile", cell(&v["container_profile"]));
    let u = &v["usage"];
    if let Some(e) = u["error"].as_str() {
        field("usage", format!("unknown: {e}"));
    } else if u.is_object() {
        let frozen = if u["frozen"] == true { ", frozen" } else { "" };
        field(
            "usage",
            format!(
                "memory {}/{}, pids {}/{}, cpu {} ms, {} OOM kills{frozen}",
                bytes(&u["memory_bytes"]),
                bytes(&u["memory_max_bytes"]),
                cell(&u["pids"]),
                cell(&u["pids_max"]),
                u["cpu_usage_usec"].as_u64().map_or("-".into(), |us| (us / 1000).to_string()),
                cell(&u["oom_kills"])
            ),
        );
    }
    let sessions: Vec<String> = v["sessions"].as_array().into_iter().flatten().map(cell).collect();
    field("sessions", if sessions.is_empty() { "-".into() } else { sessions.join(", ") });
    field("created", format!("{} ago", age(&v["created_at"], now)));
    let agents = v["agents"].as_array().map(Vec::as_slice).unwrap_or_default();
    if !agents.is_empty() {
        let mut table = Table::new(&["AGENT INSTANCE", "AGENT", "STATE", "RESTARTS", "SESSIONS"]);
        for a in agents {
            let agent = format!("{}@{}", cell(&a["id"]), cell(&a["version"]));
            let sessions: Vec<String> = a["sessions"].as_array().into_iter().flatten().map(cell).collect();
            table.row(vec![cell(&a["instance_id"]), agent, cell(&a["state"]), cell(&a["restarts"]), sessions.join(",")]);
        }
        out.push('\n');
        out.push_str(&table.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_container_reads_as_lines_and_its_agents_as_a_table() {
        let now = 1_000_000;
        let v = json!({"id": "ctr_1", "node_id": "local", "state": "ready", "supervisor_pid": 42, "error": null, "error_code": null,
            "container_profile": {"memory": "256M"}, "sessions": ["ses_1", "ses_2"],
            "agents": [{"instance_id": "agi_1", "id": "echo", "version": "1.0", "sessions": ["ses_1"], "state": "ready", "restarts": 0}],
            "usage": {"frozen": false, "memory_bytes": 3u64 << 20, "memory_max_bytes": 256u64 << 20, "cpu_usage_usec": 12_345, "pids": 3, "pids_max": null, "oom_kills": 0},
            "created_at": now - 120_000});
        let text = describe(&v, now);
        assert!(text.contains("usage       memory 3M/256M, pids 3/-, cpu 12 ms, 0 OOM kills\n"), "{text}");
        assert!(text.contains("profile     {\"memory\":\"256M\"}\n"), "{text}");
        assert!(text.contains("sessions    ses_1, ses_2\n"), "{text}");
        assert!(text.contains("agi_1           echo@1.0  ready  0         ses_1\n"), "{text}");
    }
}
