//! End-to-end tests of the `agentd` binary: each test starts a real
//! `agentd up` in a temp state dir and drives it over HTTP and SSE.
//! One test binary keeps link time down.

mod support;

mod acp_methods;
mod architecture;
mod archive;
mod audit;
mod auth;
mod bad_input;
mod cli;
mod containers;
mod dashboard;
mod doctor;
mod durability;
mod egress;
mod fleet;
mod hostile;
mod live_restore;
mod multi_session;
mod node_lifecycle;
mod notify;
mod npx_agent;
mod observability;
mod openapi_fuzz;
mod packaging;
mod permissions;
mod powers;
mod registry;
mod sandbox_limits;
mod secrets;
mod session_path;
mod session_scope;
mod shutdown;
mod stop_grace;
mod third_party;
mod supervision;
