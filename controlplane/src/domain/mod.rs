//! The control plane's domain, below every other layer: the state machines
//! of what the store keeps ([`states`]), why a request or a step is refused
//! ([`refusal`]: a class and a stable [`code`], never an HTTP type), and what a
//! workflow step that serves the API ends with ([`outcome`]).
//!
//! Layers, each using only those below it (checked by `layers` tests):
//! domain (with the pure request compilers `plan`, `agent_spec`, `mcp`) <-
//! store <- workflow <- flows (with `context`, `fleet`, `teardown`,
//! `agent_registry`, `audit`) <- api <- `process` and the crate root.
//! Problems (problem+json) are made at the HTTP edge only (`api::problem`).

pub mod code;
pub mod outcome;
pub mod refusal;
pub mod states;

pub use code::Code;
pub use outcome::Outcome;
pub use refusal::{Class, Refusal};
