//! W3C trace context (`traceparent`) carried from the HTTP API to the node
//! and on to the supervisor, so that one run can be followed through the
//! three logs by its trace id.
//!
//! Inside a process the context is a task-local ([`scope`], [`current`]):
//! the control plane's HTTP middleware sets it per request, and
//! [`ServerLayer`] per gRPC call from its `traceparent` metadata, with a
//! `grpc` span whose `trace_id` field every log line of the call shows.
//! Outgoing calls carry it through the [`Propagate`] interceptor (clients
//! made with [`traced`]). Work a call hands to a task of its own keeps it
//! with [`carry`].
//!
//! Only the ids travel: no baggage, no sampling decisions beyond passing
//! the caller's flags on.

use std::fmt;
use std::future::Future;

use tokio::task::futures::TaskLocalFuture;
use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// The header (HTTP) and metadata key (gRPC) of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A position in a trace: the trace, the caller's span in it, its flags.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header())
    }
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // All zeros is invalid in both ids: draw again (practically never).
    while bytes.iter().all(|b| *b == 0) {
        getrandom::fill(&mut bytes).expect("the OS has randomness");
    }
    bytes
}

fn hex_to<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TraceContext {
    /// A new trace, for a request that came without one.
    pub fn new_root() -> Self {
        Self { trace_id: random(), parent_id: random(), flags: 0x01 }
    }

    /// Reads a `traceparent` value: `00-<32 hex>-<16 hex>-<2 hex>`, lower
    /// case, neither id all zeros. A later version is read by its version 00
    /// prefix, as the spec asks; version `ff` and anything else malformed
    /// is `None` (the caller starts a new trace).
    pub fn parse(value: &str) -> Option<Self> {
        let value = value.trim();
        let version = value.get(..2)?;
        if version == "ff" || hex_to::<1>(version).is_none() {
            return None;
        }
        let fixed = value.get(..55)?;
        if version == "00" && value.len() != 55 {
            return None;
        }
        if value.len() > 55 && value.as_bytes()[55] != b'-' {
            return None;
        }
        let mut parts = fixed.split('-');
        let (_, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let trace_id = hex_to::<16>(trace)?;
        let parent_id = hex_to::<8>(parent)?;
        let [flags] = hex_to::<1>(flags)?;
        if trace_id.iter().all(|b| *b == 0) || parent_id.iter().all(|b| *b == 0) {
            return None;
        }
        Some(Self { trace_id, parent_id, flags })
    }

    /// The same trace with a new span of this process as the parent: what a
    /// call out of this process carries.
    pub fn child(&self) -> Self {
        Self { parent_id: random(), ..*self }
    }

    /// The `traceparent` value.
    pub fn header(&self) -> String {
        format!("00-{}-{}-{:02x}", hex(&self.trace_id), hex(&self.parent_id), self.flags)
    }

    /// The trace id as logs show it (32 hex digits).
    pub fn trace_id(&self) -> String {
        hex(&self.trace_id)
    }

    /// From a gRPC call's metadata (or an HTTP request's headers).
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(Self::parse)
    }
}

tokio::task_local! {
    static CURRENT: Option<TraceContext>;
}

/// The trace the running task works for, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|c| *c).ok().flatten()
}

/// Runs `f` as part of `trace`.
pub fn scope<F: Future>(trace: Option<TraceContext>, f: F) -> TaskLocalFuture<Option<TraceContext>, F> {
    CURRENT.scope(trace, f)
}

/// `f` with this task's trace and span, for a task it is spawned on: the
/// work a call starts goes on logging under the call's trace id.
pub fn carry<F: Future>(f: F) -> Instrumented<TaskLocalFuture<Option<TraceContext>, F>> {
    CURRENT.scope(current(), f).instrument(tracing::Span::current())
}

/// Adds the running task's trace (as a child) to each outgoing call.
#[derive(Clone, Copy, Debug, Default)]
pub struct Propagate;

impl tonic::service::Interceptor for Propagate {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(trace) = current()
            && let Ok(value) = trace.child().header().parse()
        {
            request.metadata_mut().insert(TRACEPARENT, value);
        }
        Ok(request)
    }
}

/// A channel whose calls carry the caller's trace.
pub type Traced = InterceptedService<Channel, Propagate>;

/// Wraps `channel` so that its calls carry the caller's trace.
pub fn traced(channel: Channel) -> Traced {
    InterceptedService::new(channel, Propagate)
}

/// Server side: each call runs in the trace its `traceparent` names, in a
/// `grpc` span with the `trace_id` and the method. A call without one gets
/// neither (heartbeats, probes).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerLayer;

impl<S> tower::Layer<S> for ServerLayer {
    type Service = ServerTrace<S>;

    fn layer(&self, inner: S) -> ServerTrace<S> {
        ServerTrace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for ServerTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<TaskLocalFuture<Option<TraceContext>, S::Future>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let trace = TraceContext::from_headers(request.headers());
        let span = match &trace {
            Some(t) => tracing::info_span!("grpc", trace_id = %t.trace_id(), method = %request.uri().path()),
            None => tracing::Span::none(),
        };
        let future = span.in_scope(|| self.inner.call(request));
        CURRENT.scope(trace, future).instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(given).unwrap();
        assert_eq!(t.header(), given);
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = t.child();
        assert_eq!(child.trace_id(), t.trace_id());
        assert_ne!(child.header(), given);
        // A later version is read by its version-00 prefix.
        assert_eq!(TraceContext::parse(&format!("01{}-later", &given[2..])).unwrap().trace_id(), t.trace_id());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        let root = TraceContext::new_root();
        assert_eq!(TraceContext::parse(&root.header()), Some(root));
    }

    #[tokio::test]
    async fn the_interceptor_sends_the_tasks_trace() {
        use tonic::service::Interceptor;
        let t = TraceContext::new_root();
        let sent = scope(Some(t), async { Propagate.call(tonic::Request::new(())).unwrap() }).await;
        let value = sent.metadata().get(TRACEPARENT).unwrap().to_str().unwrap().to_string();
        assert_eq!(TraceContext::parse(&value).unwrap().trace_id(), t.trace_id());
        let untraced = Propagate.call(tonic::Request::new(())).unwrap();
        assert!(untraced.metadata().get(TRACEPARENT).is_none());
        let carried = scope(Some(t), async { tokio::spawn(carry(async { current() })).await.unwrap() }).await;
        assert_eq!(carried, Some(t));
    }
}
