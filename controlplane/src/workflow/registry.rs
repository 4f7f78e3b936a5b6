//! Step kinds and their handlers.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use super::{StepContext, StepResult};

/// A registered handler, type-erased.
pub type Handler = Arc<dyn Fn(StepContext) -> BoxFuture<'static, StepResult> + Send + Sync>;

/// Step kind -> handler. Every runner on a database should register the same
/// kinds: a runner that claims a kind it does not know fails the attempt as
/// retryable, so another runner (or a newer version) may take it.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `kind`.
    ///
    /// # Panics
    /// If `kind` already has a handler: two handlers for one kind is a
    /// programming error, not a runtime condition.
    pub fn register<F, Fut>(&mut self, kind: impl Into<String>, handler: F) -> &mut Self
    where
        F: Fn(StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepResult> + Send + 'static,
    {
        let kind = kind.into();
        let handler: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        assert!(self.handlers.insert(kind.clone(), handler).is_none(), "step kind {kind:?} registered twice");
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Handler> {
        self.handlers.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}
