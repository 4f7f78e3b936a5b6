//! How a sandbox reaches the network, as a profile names it.

use serde::{Deserialize, Serialize};

/// How the sandbox reaches the network. An egress allow-list mode will join
/// these (its own namespace plus a filtering veth), which is why this is an
/// enum rather than a flag.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Its own network namespace with only loopback, up.
    #[default]
    None,
    /// The host's network namespace, for agents that must reach an LLM API.
    Host,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            other => Err(format!("unknown network mode {other:?} (known: none, host)")),
        }
    }
}
