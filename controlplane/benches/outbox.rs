//! Outbox benchmark: prints figures, asserts nothing.
//!
//! `cargo bench -p agentd-controlplane --bench outbox`
//!
//! On PostgreSQL (a throwaway server) and SQLite (a temp file):
//! - enqueue-to-claim latency at fixed open-loop arrival rates: steps are
//!   enqueued on a schedule (each in a task of its own, so a slow enqueue
//!   never delays the next), each by one transaction from an API-like caller;
//!   the latency runs from the moment the enqueue is issued to the moment a
//!   runner's handler starts on it.
//! - saturation throughput: chains of steps whose handler moves a container
//!   along its state machine and enqueues the chain's next step in the same
//!   transaction (ready <-> hibernated), which also records the step done
//!   (`Tx::complete_step`), as many chains as it takes to keep every worker
//!   busy; transitions per second over a window.
//!
//! Each figure is the median over BENCH_REPEATS runs (default 3) of
//! BENCH_SECONDS (default 5) each. BENCH_BACKENDS=postgres,sqlite picks
//! backends; BENCH_WORKERS (default 16) sizes the runner; BENCH_ONLY=latency
//! or saturation runs one half.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use agentd_controlplane::store::outbox::{NewStep, step_state};
use agentd_controlplane::store::states::{Entity, container};
use agentd_controlplane::store::{Store, StoreError};
use agentd_controlplane::workflow::{Registry, Runner, RunnerConfig, StepContext, StepError};
use agentd_testkit::postgres::TempPostgres;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const RATES: [u32; 3] = [50, 200, 500];
/// The targets of the issue.
const TARGET_TRANSITIONS: f64 = 2000.0;
const TARGET_P50_MS: f64 = 5.0;
const TARGET_P99_MS: f64 = 25.0;
/// Chains kept going at once in the saturation run.
const CHAINS: usize = 256;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Microseconds since the benchmark started: a clock both the enqueuer and
/// the handler read.
fn micros() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 50.0)
}

struct Settings {
    seconds: u64,
    repeats: usize,
    workers: usize,
}

/// A pool of the runner's own: a connection per worker, plus the claim loop's
/// and the janitor's.
fn runner_pool(store: &Store, settings: &Settings) -> Store {
    store.with_own_pool(settings.workers as u32 + 4)
}

fn runner_config(owner: &str, workers: usize) -> RunnerConfig {
    RunnerConfig { owner: owner.to_string(), workers, ..RunnerConfig::default() }
}

struct LatencyRun {
    /// Enqueue issued to handler started, ms, sorted.
    latency: Vec<f64>,
    /// The enqueue transaction alone, ms, sorted.
    enqueue: Vec<f64>,
    /// Arrivals the schedule could not keep (enqueue slower than the rate).
    late: usize,
}

async fn latency_run(store: &Store, settings: &Settings, rate: u32, run: usize) -> LatencyRun {
    let samples: Arc<Mutex<Vec<f64>>> = Default::default();
    let mut registry = Registry::new();
    let s = samples.clone();
    registry.register("ping", move |ctx: StepContext| {
        let s = s.clone();
        async move {
            let issued = ctx.payload["issued_us"].as_u64().unwrap_or(0);
            s.lock().unwrap().push((micros().saturating_sub(issued)) as f64 / 1000.0);
            Ok(json!(null))
        }
    });
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(Runner::new(runner_pool(store, settings), registry, runner_config("bench", settings.workers)).run(shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let total = rate as usize * settings.seconds as usize;
    let interval = Duration::from_secs(1) / rate;
    let enqueue_times: Arc<Mutex<Vec<f64>>> = Default::default();
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut late = 0;
    for i in 0..total {
        let at = start + interval * i as u32;
        if tokio::time::Instant::now() > at + Duration::from_millis(5) {
            late += 1;
        }
        tokio::time::sleep_until(at).await;
        let (store, enqueue_times) = (store.clone(), enqueue_times.clone());
        tasks.spawn(async move {
            let key = format!("r{rate}-{run}-{i}");
            let entity = format!("e{i}");
            let issued = micros();
            let t = Instant::now();
            store.enqueue(NewStep::new("bench", &entity, "ping", &key, json!({ "issued_us": issued }))).await.unwrap();
            enqueue_times.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0);
        });
    }
    while tasks.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.lock().unwrap().len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    runner.await.unwrap();
    store.prune_outbox(Duration::ZERO, Duration::ZERO).await.unwrap();

    let mut latency = std::mem::take(&mut *samples.lock().unwrap());
    let mut enqueue = std::mem::take(&mut *enqueue_times.lock().unwrap());
    latency.sort_by(f64::total_cmp);
    enqueue.sort_by(f64::total_cmp);
    if latency.len() < total {
        eprintln!("  warning: {} of {total} steps did not run within 30 s", total - latency.len());
    }
    LatencyRun { latency, enqueue, late }
}

/// The state a chain's step `n` moves its container to.
fn target(n: u64) -> &'static str {
    if n.is_multiple_of(2) { container::READY } else { container::HIBERNATED }
}

/// Transitions per second with every worker busy.
async fn saturation_run(store: &Store, settings: &Settings, run: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    // The runner and its handlers on their own pool, as `agentd` runs them.
    let runner_store = runner_pool(store, settings);
    {
        let (store, done, stopping) = (runner_store.clone(), done.clone(), stopping.clone());
        registry.register("flip", move |ctx: StepContext| {
            let (store, done, stopping) = (store.clone(), done.clone(), stopping.clone());
            async move {
                let n = ctx.payload["n"].as_u64().unwrap_or(0);
                let id = ctx.entity_id.clone();
                let result: Result<(), StoreError> = store
                    .transaction(async |tx| {
                        tx.transition(Entity::Container, &id, target(n), None, "bench").await?;
                        if !stopping.load(Ordering::Relaxed) {
                            let key = format!("{id}/{}", n + 1);
                            tx.enqueue(NewStep::new("container", &id, "flip", &key, json!({ "n": n + 1 }))).await?;
                        }
                        ctx.complete_in(tx, &json!(null)).await
                    })
                    .await;
                result.map_err(|e| StepError::retryable(e.to_string()))?;
                done.fetch_add(1, Ordering::Relaxed);
                Ok(json!(null))
            }
        });
    }
    for c in 0..CHAINS {
        let id = format!("ctr_{run}_{c}");
        store.insert_container(&id, "bench", "{}").await.unwrap();
        let key = format!("{id}/0");
        store.enqueue(NewStep::new("container", &id, "flip", &key, json!({ "n": 0 }))).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(Runner::new(runner_store, registry, runner_config("bench", settings.workers)).run(shutdown.clone()));
    // Warm up, then count over the window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (from, t) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(settings.seconds)).await;
    let rate = (done.load(Ordering::Relaxed) - from) as f64 / t.elapsed().as_secs_f64();
    // End the chains and let their last steps finish.
    stopping.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let open = store.count_steps(step_state::PENDING).await.unwrap() + store.count_steps(step_state::LEASED).await.unwrap();
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    runner.await.unwrap();
    let failed = store.count_steps(step_state::FAILED).await.unwrap();
    if failed > 0 {
        eprintln!("  warning: {failed} steps failed");
    }
    store.prune_outbox(Duration::ZERO, Duration::ZERO).await.unwrap();
    rate
}

struct Figures {
    backend: &'static str,
    /// Per rate: median p50, median p99, median enqueue p50 (ms).
    latency: Vec<(u32, f64, f64, f64)>,
    throughput: f64,
}

async fn bench(store: &Store, settings: &Settings) -> Figures {
    let backend = store.backend();
    let mut latency = Vec::new();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    for rate in RATES.into_iter().filter(|_| only != "saturation") {
        let (mut p50s, mut p99s, mut enq) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..settings.repeats {
            let r = latency_run(store, settings, rate, run).await;
            let (p50, p99, p999, max) =
                (percentile(&r.latency, 50.0), percentile(&r.latency, 99.0), percentile(&r.latency, 99.9), percentile(&r.latency, 100.0));
            println!(
                "  {backend:8} {rate:4}/s run {run}: {n:5} steps, enqueue-to-claim p50 {p50:6.2} ms, p99 {p99:6.2} ms, p99.9 {p999:6.2} ms, max {max:7.2} ms; enqueue tx p50 {e50:5.2} ms p99 {e99:5.2} ms{late}",
                n = r.latency.len(),
                e50 = percentile(&r.enqueue, 50.0),
                e99 = percentile(&r.enqueue, 99.0),
                late = if r.late > 0 { format!(" ({} arrivals late)", r.late) } else { String::new() },
            );
            p50s.push(p50);
            p99s.push(p99);
            enq.push(percentile(&r.enqueue, 50.0));
        }
        latency.push((rate, median(p50s), median(p99s), median(enq)));
    }
    let mut rates = Vec::new();
    for run in (0..settings.repeats).filter(|_| only != "latency") {
        let rate = saturation_run(store, settings, run).await;
        println!("  {backend:8} saturation run {run}: {rate:7.0} transitions/s ({} workers, {CHAINS} chains)", settings.workers);
        rates.push(rate);
    }
    Figures { backend, latency, throughput: median(rates) }
}

async fn run() {
    let settings = Settings { seconds: env_or("BENCH_SECONDS", 5), repeats: env_or("BENCH_REPEATS", 3), workers: env_or("BENCH_WORKERS", 16) };
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "postgres,sqlite".into());
    micros();
    println!(
        "outbox benchmark: {} s per run, {} runs per figure (medians), {} workers, {} cores",
        settings.seconds,
        settings.repeats,
        settings.workers,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let mut all = Vec::new();
    for backend in backends.split(',').map(str::trim) {
        match backend {
            "postgres" => {
                // On this thread, which lives as long as the benchmark: the
                // server's parent-death signal fires when its spawning thread exits.
                let pg = match tokio::task::block_in_place(TempPostgres::start) {
                    Ok(pg) => pg,
                    Err(e) => {
                        println!("  postgres: skipped ({e})");
                        continue;
                    }
                };
                let store = Store::open_postgres(&pg.url()).await.unwrap();
                all.push(bench(&store, &settings).await);
                store.close().await;
                tokio::task::block_in_place(move || drop(pg));
            }
            "sqlite" => {
                let dir = tempfile::tempdir().unwrap();
                let store = Store::open_sqlite(&dir.path().join("bench.db")).await.unwrap();
                all.push(bench(&store, &settings).await);
                store.close().await;
            }
            other => println!("  unknown backend {other:?}"),
        }
    }

    println!();
    println!("summary (medians of {} runs)", settings.repeats);
    println!("  backend   rate/s  p50 ms  p99 ms  enqueue p50 ms  p99/p50");
    for f in &all {
        for (rate, p50, p99, enq) in &f.latency {
            println!("  {:8} {rate:7} {p50:7.2} {p99:7.2} {enq:15.2} {:8.1}", f.backend, p99 / p50);
        }
    }
    for f in &all {
        println!("  {:8} saturation {:7.0} transitions/s", f.backend, f.throughput);
    }
    println!();
    println!("against the targets (ratio = figure / target; >= 1 is met for throughput, <= 1 for latency)");
    for f in &all {
        if let Some((_, p50, p99, _)) = f.latency.iter().find(|l| l.0 == 200) {
            println!(
                "  {:8} p50 at 200/s {p50:6.2} ms / {TARGET_P50_MS} ms = {:5.2}; p99 {p99:6.2} ms / {TARGET_P99_MS} ms = {:5.2}",
                f.backend,
                p50 / TARGET_P50_MS,
                p99 / TARGET_P99_MS
            );
        }
        println!(
            "  {:8} throughput {:7.0} / {TARGET_TRANSITIONS} = {:5.2}",
            f.backend,
            f.throughput,
            f.throughput / TARGET_TRANSITIONS
        );
    }
    if let (Some(pg), Some(lite)) = (all.iter().find(|f| f.backend == "postgres"), all.iter().find(|f| f.backend == "sqlite")) {
        println!("  postgres / sqlite throughput: {:5.2}", pg.throughput / lite.throughput);
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(run());
}
