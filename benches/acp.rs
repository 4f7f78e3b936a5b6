//! ACP path benchmark: prints figures, asserts nothing.
//!
//! `cargo build --release --workspace --bins && cargo bench --bench acp`
//!
//! - added latency: HTTP `:prompt` sent -> first `session.update` read from the
//!   SSE stream, with the echo agent (which answers at once), p50/p99 over
//!   BENCH_PROMPTS turns;
//! - throughput: `session.update` events per second one session streams to one
//!   SSE client (echo agent with `--repeat`, BENCH_EVENTS chunks per turn).

mod common;

use common::{env_usize, release_bin};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};


/// Reads SSE frames, yielding each event's name.
struct Events {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl Events {
    async fn next_event(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                let frame = String::from_utf8_lossy(&frame);
                if let Some(name) = frame.lines().find_map(|l| l.strip_prefix("event: ")) {
                    return Some(name.to_string());
                }
                continue;
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }
}

async fn session(http: &reqwest::Client, base: &str, args: &[&str]) -> (String, Events) {
    let exe = release_bin("echo-agent").display().to_string();
    let body = json!({"manual_agent": {"id": "echo", "version": "1", "distribution": {"type": "binary",
        "binary": {"executable": exe, "args": args}}}});
    let created: Value = http.post(format!("{base}/v1/sessions")).json(&body).send().await.unwrap().json().await.unwrap();
    let id = created["id"].as_str().expect("session created").to_string();
    let resp = http.get(format!("{base}/v1/sessions/{id}/events")).send().await.unwrap();
    (id, Events { stream: Box::pin(resp.bytes_stream()), buf: Vec::new() })
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    println!("{name:<40} n={:<5} p50={:>7.3} ms  p99={:>7.3} ms", samples.len(), at(0.5), at(0.99));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let prompts = env_usize("BENCH_PROMPTS", 500);
    let events_per_turn = env_usize("BENCH_EVENTS", 200_000);
    let state = tempfile::Builder::new().prefix("agentd-bench-acp-").tempdir().unwrap();
    let mut agentd = Command::new(release_bin("agentd"))
        .args(["up", "--listen", "127.0.0.1:0", "--no-auth", "--state-dir"])
        .arg(state.path())
        .env("AGENTD_LOG", std::env::var("AGENTD_LOG").unwrap_or_else(|_| "warn,agentd_controlplane=info".into()))
        .env("AGENTD_CGROUP_SUBTREE", format!("agentd-bench-acp-{}", std::process::id()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(agentd.stderr.take().unwrap());
    let mut lines = stderr.lines();
    let addr = loop {
        let line = lines.next().expect("agentd log").unwrap();
        if let Some(addr) = line.split("listen=").nth(1).filter(|_| line.contains("API listening")) {
            break addr.trim().to_string();
        }
    };
    // BENCH_AGENTD_LOG=FILE keeps agentd's log (set AGENTD_LOG to choose what it says).
    let mut keep = std::env::var_os("BENCH_AGENTD_LOG").map(|path| std::fs::File::create(path).expect("BENCH_AGENTD_LOG"));
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(file) = keep.as_mut() {
                use std::io::Write;
                let _ = writeln!(file, "{line}");
            }
        }
    });
    let base = format!("http://{addr}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let (id, mut events) = session(&http, &base, &[]).await;
        let mut latency = Vec::new();
        for i in 0..prompts {
            let t0 = Instant::now();
            let resp = http.post(format!("{base}/v1/sessions/{id}:prompt")).json(&json!({"prompt": format!("p{i}")})).send().await.unwrap();
            assert_eq!(resp.status(), 202);
            loop {
                let e = events.next_event().await.expect("stream");
                if e == "session.update" {
                    latency.push(t0.elapsed());
                }
                if e == "run.completed" {
                    break;
                }
            }
        }
        report("prompt -> first SSE update (echo agent)", latency);

        let repeat = events_per_turn.to_string();
        let (id, mut events) = session(&http, &base, &["--chunk-chars", "8", "--repeat", &repeat]).await;
        let t0 = Instant::now();
        http.post(format!("{base}/v1/sessions/{id}:prompt")).json(&json!({"prompt": "12345678"})).send().await.unwrap();
        let mut updates = 0u64;
        while let Some(e) = events.next_event().await {
            match e.as_str() {
                "session.update" => updates += 1,
                "run.completed" | "run.failed" => break,
                _ => {}
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        println!("one session to one SSE client: {updates} updates in {secs:.2} s = {:.0} events/s", updates as f64 / secs);
    });
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(agentd.id() as i32), nix::sys::signal::Signal::SIGINT);
    let _ = agentd.wait();
}
