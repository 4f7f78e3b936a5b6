//! The control plane's Prometheus metrics (`GET /metrics`), all named
//! `agentd_*`, in one registry per process.
//!
//! Counters and histograms are recorded where things happen (runs ending in
//! the store, sandbox creates in their step, HTTP requests in the API's
//! middleware). Gauges of durable state (containers and sessions by state,
//! the outbox, node heartbeats) are not kept up to date as things move: they
//! are read from the store at each scrape ([`StoreGauges`], set by the
//! handler before encoding), so every control plane of a fleet reports the
//! same truth and no write path pays for them.
//!
//! Plain data and atomics: no I/O here, so every layer may record into it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s text: OpenMetrics, which
/// Prometheus asks for first and parses natively.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    completed,
    cancelled,
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    /// The matched path template (`/v1/sessions/{id}`), never the raw path:
    /// ids would make a series per entity.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLatencyLabels {
    pub method: String,
    pub route: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds from 1 ms to about 9 min: HTTP calls, first events.
fn short_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Seconds from 10 ms to about 3 h: runs, sandbox creates with downloads.
fn long_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 21))
}

/// Everything one control plane measures.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    containers: Family<StateLabel, Gauge>,
    sessions: Family<StateLabel, Gauge>,
    runs_started: Counter,
    runs_ended: Family<OutcomeLabel, Counter>,
    run_duration: Histogram,
    sandbox_create: Histogram,
    first_event: Histogram,
    sse_subscribers: Gauge,
    sse_lagged: Counter,
    store_up: Gauge,
    outbox_steps: Family<StateLabel, Gauge>,
    outbox_oldest_pending: Gauge<f64, std::sync::atomic::AtomicU64>,
    step_retries: Family<StepLabel, Counter>,
    node_heartbeat_age: Family<NodeLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    http_requests: Family<RouteLabels, Counter>,
    http_latency: HistogramFamily<RouteLatencyLabels>,
    /// Live SSE subscribers, kept beside the gauge so that a guard's drop
    /// never races a scrape into a negative value.
    subscribers_now: AtomicI64,
    /// Runs whose first event was measured lately (oldest first), so that
    /// each is measured once however many streams see it.
    first_events_claimed: std::sync::Mutex<std::collections::VecDeque<String>>,
}

/// How many runs [`Metrics::claim_first_event`] remembers.
const CLAIMED_RUNS: usize = 4096;

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agentd");
        let m = Metrics {
            containers: Family::default(),
            sessions: Family::default(),
            runs_started: Counter::default(),
            runs_ended: Family::default(),
            run_duration: long_buckets(),
            sandbox_create: long_buckets(),
            first_event: short_buckets(),
            sse_subscribers: Gauge::default(),
            sse_lagged: Counter::default(),
            store_up: Gauge::default(),
            outbox_steps: Family::default(),
            outbox_oldest_pending: Gauge::default(),
            step_retries: Family::default(),
            node_heartbeat_age: Family::default(),
            http_requests: Family::default(),
            http_latency: Family::new_with_constructor(short_buckets),
            subscribers_now: AtomicI64::new(0),
            first_events_claimed: Default::default(),
            registry: Registry::default(),
        };
        registry.register("containers", "Containers (sandboxes) in each live state, from the store", m.containers.clone());
        registry.register("sessions", "Sessions in each live state, from the store", m.sessions.clone());
        registry.register("runs_started", "Runs (turns) a node accepted", m.runs_started.clone());
        registry.register("runs_ended", "Runs recorded ended, by outcome", m.runs_ended.clone());
        registry.register_with_unit(
            "run_duration",
            "From a run's creation (the prompt) to its recorded end",
            prometheus_client::registry::Unit::Seconds,
            m.run_duration.clone(),
        );
        registry.register_with_unit(
            "sandbox_create_duration",
            "A node's CreateSandbox call that succeeded, bundles included",
            prometheus_client::registry::Unit::Seconds,
            m.sandbox_create.clone(),
        );
        registry.register_with_unit(
            "prompt_first_event",
            "From a run's creation to the first event after run.started, as seen by this control plane's event streams",
            prometheus_client::registry::Unit::Seconds,
            m.first_event.clone(),
        );
        registry.register("sse_subscribers", "Open SSE event streams", m.sse_subscribers.clone());
        registry.register("sse_lagged", "SSE subscribers cut off for falling behind", m.sse_lagged.clone());
        registry.register("store_up", "1 if the last scrape read the store, 0 if its gauges are stale", m.store_up.clone());
        registry.register("outbox_steps", "Workflow steps pending or leased, from the store", m.outbox_steps.clone());
        registry.register_with_unit(
            "outbox_oldest_pending_age",
            "Age of the oldest pending workflow step (0 when none)",
            prometheus_client::registry::Unit::Seconds,
            m.outbox_oldest_pending.clone(),
        );
        registry.register("step_retries", "Workflow step attempts that failed and were scheduled again, by step kind", m.step_retries.clone());
        registry.register_with_unit(
            "node_heartbeat_age",
            "Time since each node's last heartbeat, from the store",
            prometheus_client::registry::Unit::Seconds,
            m.node_heartbeat_age.clone(),
        );
        registry.register("http_requests", "HTTP requests answered, by method, route template and status", m.http_requests.clone());
        registry.register_with_unit(
            "http_request_duration",
            "Time to a response's head, by method and route template",
            prometheus_client::registry::Unit::Seconds,
            m.http_latency.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// What a scrape reads from the store.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StoreGauges {
    pub containers: Vec<(String, i64)>,
    pub sessions: Vec<(String, i64)>,
    pub outbox: Vec<(String, i64)>,
    pub oldest_pending_age: Duration,
    pub heartbeat_ages: Vec<(String, Duration)>,
}

impl Metrics {
    pub fn run_started(&self) {
        self.runs_started.inc();
    }

    /// A run's end was recorded; `duration`: since its creation, if known.
    pub fn run_ended(&self, outcome: Outcome, duration: Option<Duration>) {
        self.runs_ended.get_or_create(&OutcomeLabel { outcome }).inc();
        if let Some(d) = duration {
            self.run_duration.observe(d.as_secs_f64());
        }
    }

    pub fn sandbox_created(&self, took: Duration) {
        self.sandbox_create.observe(took.as_secs_f64());
    }

    pub fn first_event(&self, after: Duration) {
        self.first_event.observe(after.as_secs_f64());
    }

    /// Whether the caller is the first to see `run_id`'s first event (of
    /// the last [`CLAIMED_RUNS`] runs), and so the one to measure it.
    pub fn claim_first_event(&self, run_id: &str) -> bool {
        let mut claimed = self.first_events_claimed.lock().unwrap();
        if claimed.iter().any(|r| r == run_id) {
            return false;
        }
        if claimed.len() == CLAIMED_RUNS {
            claimed.pop_front();
        }
        claimed.push_back(run_id.to_string());
        true
    }

    pub fn step_retried(&self, kind: &str) {
        self.step_retries.get_or_create(&StepLabel { kind: kind.to_string() }).inc();
    }

    pub fn sse_lagged(&self) {
        self.sse_lagged.inc();
    }

    /// Counts an SSE subscriber for as long as the guard lives.
    pub fn sse_subscriber(self: &std::sync::Arc<Self>) -> SubscriberGuard {
        let now = self.subscribers_now.fetch_add(1, Ordering::Relaxed) + 1;
        self.sse_subscribers.set(now);
        SubscriberGuard { metrics: std::sync::Arc::clone(self) }
    }

    pub fn http_request(&self, method: &str, route: &str, status: u16, took: Duration) {
        let labels = RouteLabels { method: method.to_string(), route: route.to_string(), status };
        self.http_requests.get_or_create(&labels).inc();
        let latency = RouteLatencyLabels { method: labels.method, route: labels.route };
        self.http_latency.get_or_create(&latency).observe(took.as_secs_f64());
    }

    /// Replaces the store-derived gauges with a fresh reading. States and
    /// nodes no longer present read 0 or disappear, rather than keeping their
    /// last value.
    pub fn set_store_gauges(&self, g: &StoreGauges) {
        self.store_up.set(1);
        set_states(&self.containers, crate::domain::states::container::LIVE, &g.containers);
        set_states(&self.sessions, crate::domain::states::session::LIVE, &g.sessions);
        set_states(&self.outbox_steps, &["pending", "leased"], &g.outbox);
        self.outbox_oldest_pending.set(g.oldest_pending_age.as_secs_f64());
        self.node_heartbeat_age.clear();
        for (node, age) in &g.heartbeat_ages {
            self.node_heartbeat_age.get_or_create(&NodeLabel { node: node.clone() }).set(age.as_secs_f64());
        }
    }

    /// The store did not answer a scrape: its gauges keep their last values.
    pub fn store_unreachable(&self) {
        self.store_up.set(0);
    }

    /// The registry in OpenMetrics text ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

fn set_states(family: &Family<StateLabel, Gauge>, known: &[&str], counts: &[(String, i64)]) {
    family.clear();
    for state in known {
        family.get_or_create(&StateLabel { state: (*state).to_string() }).set(0);
    }
    for (state, n) in counts {
        family.get_or_create(&StateLabel { state: state.clone() }).set(*n);
    }
}

/// Holds one SSE subscriber in the gauge.
pub struct SubscriberGuard {
    metrics: std::sync::Arc<Metrics>,
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let now = self.metrics.subscribers_now.fetch_sub(1, Ordering::Relaxed) - 1;
        self.metrics.sse_subscribers.set(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_prefixed_and_store_gauges_are_replaced() {
        let m = std::sync::Arc::new(Metrics::default());
        m.run_started();
        m.run_ended(Outcome::completed, Some(Duration::from_millis(1500)));
        m.http_request("GET", "/v1/sessions/{id}", 200, Duration::from_millis(3));
        let guard = m.sse_subscriber();
        m.set_store_gauges(&StoreGauges {
            containers: vec![("ready".into(), 2)],
            heartbeat_ages: vec![("node-1".into(), Duration::from_secs(3))],
            ..Default::default()
        });
        let text = m.encode();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("agentd_"), "{line}");
        }
        assert!(text.contains("agentd_containers{state=\"ready\"} 2"), "{text}");
        assert!(text.contains("agentd_containers{state=\"provisioning\"} 0"), "{text}");
        assert!(text.contains("agentd_runs_ended_total{outcome=\"completed\"} 1"), "{text}");
        assert!(text.contains("agentd_http_requests_total{method=\"GET\",route=\"/v1/sessions/{id}\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("agentd_sse_subscribers 1"), "{text}");
        assert!(text.contains("agentd_node_heartbeat_age_seconds{node=\"node-1\"} 3.0"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        drop(guard);
        m.set_store_gauges(&StoreGauges::default());
        let text = m.encode();
        assert!(text.contains("agentd_sse_subscribers 0"), "{text}");
        assert!(text.contains("agentd_containers{state=\"ready\"} 0"), "{text}");
        assert!(!text.contains("node-1"), "a node gone from the store leaves no series: {text}");
    }
}
