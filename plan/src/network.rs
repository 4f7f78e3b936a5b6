//! How a sandbox reaches the network, as a profile names it: `"none"`,
//! `"host"`, or an egress allow-list,
//! `{"egress": {"allow": ["api.anthropic.com:443", "*.openai.com", "198.18.0.0/15:8080"]}}`.
//!
//! A rule is a destination and an optional port:
//! - a domain name (`api.anthropic.com`), or a wildcard (`*.openai.com`:
//!   every name under openai.com, at any depth, but not openai.com itself);
//! - an IPv4 address or CIDR block (`198.51.100.7`, `198.18.0.0/15`);
//! - `:PORT`; without one, 80 and 443.
//!
//! IPv6 rules are refused: an egress sandbox has no IPv6 (its resolver
//! answers no AAAA), so such a rule could never match.
//!
//! Rules are parsed once, here, into [`EgressRule`]s that cannot be
//! malformed; the control plane refuses a bad one naming it, and the node
//! and `agentd sandbox run` read the same types.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The most rules one policy may hold: a policy is checked against every
/// connection, and an allow-list longer than this is a sign of a mistake.
pub const MAX_RULES: usize = 256;

/// How the sandbox reaches the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Network {
    /// Its own network namespace with only loopback, up.
    #[default]
    None,
    /// The host's network namespace, for agents that must reach anything.
    Host,
    /// Its own network namespace with one route out, through the node,
    /// which lets through only what the policy allows.
    Egress(EgressPolicy),
}

/// What an egress sandbox may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow: Vec<EgressRule>,
}

/// One allowed destination and port(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    pub target: Target,
    pub ports: Ports,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A name, lower case, without a trailing dot.
    Domain(String),
    /// Every name under this one (`*.openai.com` holds `openai.com`).
    Subdomains(String),
    /// An IPv4 block (a single address is a /32), host bits cleared.
    Net(Ipv4Net),
}

/// An IPv4 network: an address with its host bits cleared, and a prefix
/// length of at most 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    prefix_len: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ports {
    /// No port given: 80 and 443.
    Web,
    One(u16),
}

/// A policy or rule that cannot be.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NetworkError {
    #[error("unknown network mode {0:?} (known: \"none\", \"host\", or {{\"egress\": {{\"allow\": [...]}}}})")]
    UnknownMode(String),
    #[error("network policy is not valid: {0}")]
    Shape(String),
    #[error("network rule {rule:?} is not valid: {reason}")]
    BadRule { rule: String, reason: String },
    #[error("network policy has {0} rules; at most {MAX_RULES}")]
    TooManyRules(usize),
}

impl NetworkError {
    /// Whether the fault is in the egress policy (422
    /// `invalid_network_policy`) rather than in the mode's name.
    pub fn is_policy(&self) -> bool {
        !matches!(self, NetworkError::UnknownMode(_))
    }
}

impl Ipv4Net {
    /// The network of `addr` with `prefix_len` bits; host bits are cleared.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, String> {
        if prefix_len > 32 {
            return Err(format!("prefix length {prefix_len} is over 32"));
        }
        let mask = Self::mask_of(prefix_len);
        Ok(Self { addr: Ipv4Addr::from(u32::from(addr) & mask), prefix_len })
    }

    fn mask_of(prefix_len: u8) -> u32 {
        if prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix_len)) }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix_len) == u32::from(self.addr)
    }

    /// Whether every address of `other` is in this network.
    pub fn covers(&self, other: &Ipv4Net) -> bool {
        self.prefix_len <= other.prefix_len && self.contains(other.addr)
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.covers(other) || other.covers(self)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix_len == 32 { write!(f, "{}", self.addr) } else { write!(f, "{}/{}", self.addr, self.prefix_len) }
    }
}

impl Ports {
    pub fn allows(&self, port: u16) -> bool {
        match self {
            Ports::Web => port == 80 || port == 443,
            Ports::One(p) => *p == port,
        }
    }
}

/// Whether `name` is a DNS name agentd accepts in a rule: labels of ASCII
/// letters, digits and `-` (not at either end; `_` too, which some service
/// names carry), 1 to 63 each, 253 in all.
pub fn valid_domain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > 253 {
        return Err("the name is longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("the name has an empty label".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("label {label:?} holds a character other than a letter, a digit, '-' or '_'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err("an all-numeric name is not a domain (an IPv4 address has four parts)".into());
    }
    Ok(())
}

/// `name` as rules compare it: lower case, no trailing dot.
pub fn normal_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl Target {
    /// A domain target from its name: `*.` makes it a wildcard.
    pub fn domain(text: &str) -> Result<Target, String> {
        let text = normal_name(text);
        if let Some(rest) = text.strip_prefix("*.") {
            valid_domain(rest)?;
            if !rest.contains('.') {
                return Err(format!("*.{rest} would allow a whole top-level domain"));
            }
            return Ok(Target::Subdomains(rest.to_string()));
        }
        if text.contains('*') {
            return Err("'*' may only start a name, as in *.example.com".into());
        }
        valid_domain(&text)?;
        Ok(Target::Domain(text))
    }

    /// Whether the target names `name` (compared as [`normal_name`]).
    pub fn matches_name(&self, name: &str) -> bool {
        let name = normal_name(name);
        match self {
            Target::Domain(d) => *d == name,
            Target::Subdomains(d) => name.len() > d.len() + 1 && name.ends_with(d.as_str()) && name.as_bytes()[name.len() - d.len() - 1] == b'.',
            Target::Net(_) => false,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Domain(d) => f.write_str(d),
            Target::Subdomains(d) => write!(f, "*.{d}"),
            Target::Net(n) => n.fmt(f),
        }
    }
}

impl EgressRule {
    /// Parses one rule as a profile writes it.
    pub fn parse(text: &str) -> Result<EgressRule, NetworkError> {
        let bad = |reason: String| NetworkError::BadRule { rule: text.to_string(), reason };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(bad("the rule is empty".into()));
        }
        if trimmed.starts_with('[') || trimmed.matches(':').count() > 1 {
            return Err(bad("IPv6 destinations are not supported: an egress sandbox has no IPv6".into()));
        }
        let (host, ports) = match trimmed.rsplit_once(':') {
            Some((host, port)) => {
                let port: u16 = port.parse().map_err(|_| bad(format!("port {port:?} is not a number from 1 to 65535")))?;
                if port == 0 {
                    return Err(bad("port 0 is not a port".into()));
                }
                (host, Ports::One(port))
            }
            None => (trimmed, Ports::Web),
        };
        let target = if let Some((addr, len)) = host.split_once('/') {
            let addr: Ipv4Addr = addr.parse().map_err(|_| bad(format!("{addr:?} is not an IPv4 address")))?;
            let len: u8 = len.parse().map_err(|_| bad(format!("prefix length {len:?} is not a number from 0 to 32")))?;
            Target::Net(Ipv4Net::new(addr, len).map_err(bad)?)
        } else if let Ok(addr) = host.parse::<Ipv4Addr>() {
            Target::Net(Ipv4Net::new(addr, 32).expect("32 is a prefix length"))
        } else {
            Target::domain(host).map_err(bad)?
        };
        Ok(EgressRule { target, ports })
    }

    /// Whether the rule lets through a connection to a name on `port`.
    pub fn allows_name(&self, name: &str, port: u16) -> bool {
        self.ports.allows(port) && self.target.matches_name(name)
    }

    /// Whether the rule lets through a connection to `ip` on `port`
    /// because it names the address (a domain rule never does).
    pub fn allows_addr(&self, ip: Ipv4Addr, port: u16) -> bool {
        matches!(&self.target, Target::Net(n) if n.contains(ip)) && self.ports.allows(port)
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ports {
            Ports::Web => self.target.fmt(f),
            Ports::One(p) => write!(f, "{}:{p}", self.target),
        }
    }
}

impl EgressPolicy {
    /// Parses a list of rules (`--allow` flags, the profile's `allow`).
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<EgressPolicy, NetworkError> {
        if rules.len() > MAX_RULES {
            return Err(NetworkError::TooManyRules(rules.len()));
        }
        let allow = rules.iter().map(|r| EgressRule::parse(r.as_ref())).collect::<Result<_, _>>()?;
        Ok(EgressPolicy { allow })
    }

    /// Whether some rule allows `name` on any port: the resolver answers
    /// for such names only.
    pub fn allows_name_on_some_port(&self, name: &str) -> bool {
        self.allow.iter().any(|r| r.target.matches_name(name))
    }
}

impl Network {
    /// The profile's `network` field.
    pub fn from_json(value: &Value) -> Result<Network, NetworkError> {
        match value {
            Value::String(s) => s.parse(),
            Value::Object(o) => {
                let (key, body) = match o.iter().next() {
                    Some((k, v)) if o.len() == 1 => (k.as_str(), v),
                    _ => return Err(NetworkError::Shape("an object network names one mode: {\"egress\": {\"allow\": [...]}}".into())),
                };
                if key != "egress" {
                    return Err(NetworkError::UnknownMode(key.to_string()));
                }
                let body = body.as_object().ok_or_else(|| NetworkError::Shape("egress must be an object with an allow list".into()))?;
                if let Some(other) = body.keys().find(|k| *k != "allow") {
                    return Err(NetworkError::Shape(format!("unknown field {other:?} in egress (known: allow)")));
                }
                let allow = match body.get("allow") {
                    None => return Err(NetworkError::Shape("egress needs an allow list (it may be empty)".into())),
                    Some(Value::Array(a)) => a,
                    Some(_) => return Err(NetworkError::Shape("egress.allow must be a list of rules".into())),
                };
                let rules = allow
                    .iter()
                    .map(|r| r.as_str().ok_or_else(|| NetworkError::BadRule { rule: r.to_string(), reason: "a rule is a string".into() }))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Network::Egress(EgressPolicy::parse(&rules)?))
            }
            other => Err(NetworkError::Shape(format!("network must be \"none\", \"host\" or an object, got {other}"))),
        }
    }

    /// The profile's JSON for this network ([`Network::from_json`] reads it back).
    pub fn to_json(&self) -> Value {
        match self {
            Network::None => Value::from("none"),
            Network::Host => Value::from("host"),
            Network::Egress(p) => serde_json::json!({"egress": {"allow": p.allow.iter().map(|r| r.to_string()).collect::<Vec<_>>()}}),
        }
    }

    /// Whether the sandbox gets a network namespace of its own.
    pub fn isolated(&self) -> bool {
        !matches!(self, Network::Host)
    }

    /// The mode's name: `none`, `host` or `egress`.
    pub fn mode(&self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Host => "host",
            Network::Egress(_) => "egress",
        }
    }
}

impl std::str::FromStr for Network {
    type Err = NetworkError;

    /// The modes that need no policy; `egress` alone is refused (its rules
    /// come with it).
    fn from_str(s: &str) -> Result<Self, NetworkError> {
        match s {
            "none" => Ok(Network::None),
            "host" => Ok(Network::Host),
            "egress" => Err(NetworkError::Shape("egress needs its allow list: {\"egress\": {\"allow\": [...]}}".into())),
            other => Err(NetworkError::UnknownMode(other.to_string())),
        }
    }
}

/// As the profile writes it, so that a spec handed over as JSON (the
/// builder's) says what a client said.
impl Serialize for Network {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Network::from_json(&value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(text: &str) -> EgressRule {
        EgressRule::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn rules_parse_to_their_parts() {
        assert_eq!(rule("api.anthropic.com:443"), EgressRule { target: Target::Domain("api.anthropic.com".into()), ports: Ports::One(443) });
        assert_eq!(rule("*.OpenAI.com."), EgressRule { target: Target::Subdomains("openai.com".into()), ports: Ports::Web });
        assert_eq!(rule("registry.npmjs.org").ports, Ports::Web);
        let net = rule("198.18.0.0/15:8080");
        assert_eq!(net.target, Target::Net(Ipv4Net::new("198.18.0.0".parse().unwrap(), 15).unwrap()));
        assert_eq!(net.to_string(), "198.18.0.0/15:8080");
        assert_eq!(rule("198.51.100.7").target.to_string(), "198.51.100.7");
        // Host bits are cleared: the block is what the rule allows.
        assert_eq!(rule("10.1.2.3/8").to_string(), "10.0.0.0/8");
        for text in ["api.anthropic.com:443", "*.openai.com", "198.18.0.0/15:8080", "1.2.3.4:22"] {
            assert_eq!(rule(text).to_string(), text);
        }
    }

    #[test]
    fn malformed_rules_are_refused_naming_the_rule() {
        for bad in [
            "",
            "   ",
            "api.anthropic.com:",
            "api.anthropic.com:0",
            "api.anthropic.com:65536",
            "api.anthropic.com:https",
            "*",
            "*.com",
            "api.*.com",
            "a..b",
            "-a.com",
            "a-.com",
            "exa mple.com",
            "ex@mple.com",
            "1.2.3.4/33",
            "1.2.3/8",
            "300.1.1.1/8",
            "1.2.3",
            "[::1]:443",
            "2001:db8::/32",
            &format!("{}.com", "a".repeat(64)),
        ] {
            match EgressRule::parse(bad) {
                Err(NetworkError::BadRule { rule, reason }) => {
                    assert_eq!(rule, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let e = EgressRule::parse("api.anthropic.com:99999").unwrap_err();
        assert!(e.to_string().contains("api.anthropic.com:99999"), "{e}");
    }

    #[test]
    fn names_match_exactly_or_below_a_wildcard() {
        let exact = rule("api.anthropic.com:443");
        assert!(exact.allows_name("API.anthropic.com.", 443));
        assert!(!exact.allows_name("api.anthropic.com", 80));
        assert!(!exact.allows_name("xapi.anthropic.com", 443));
        let wild = rule("*.openai.com");
        assert!(wild.allows_name("api.openai.com", 443));
        assert!(wild.allows_name("a.b.openai.com", 80));
        assert!(!wild.allows_name("openai.com", 443), "the apex is not under the wildcard");
        assert!(!wild.allows_name("evilopenai.com", 443));
        assert!(!wild.allows_name("api.openai.com", 22));
        assert!(!wild.allows_addr("1.2.3.4".parse().unwrap(), 443), "a domain rule names no address");
        let net = rule("198.18.0.0/15:8080");
        assert!(net.allows_addr("198.19.255.255".parse().unwrap(), 8080));
        assert!(!net.allows_addr("198.20.0.0".parse().unwrap(), 8080));
        assert!(!net.allows_addr("198.18.0.1".parse().unwrap(), 80));
    }

    #[test]
    fn the_profile_form_round_trips() {
        let value = json!({"egress": {"allow": ["api.anthropic.com:443", "*.openai.com", "registry.npmjs.org", "198.18.0.0/15:8080"]}});
        let network = Network::from_json(&value).unwrap();
        let Network::Egress(policy) = &network else { panic!("{network:?}") };
        assert_eq!(policy.allow.len(), 4);
        assert_eq!(network.to_json(), value);
        assert_eq!(serde_json::from_value::<Network>(serde_json::to_value(&network).unwrap()).unwrap(), network);
        assert_eq!(Network::from_json(&json!("host")).unwrap(), Network::Host);
        assert_eq!(Network::from_json(&json!({"egress": {"allow": []}})).unwrap(), Network::Egress(EgressPolicy::default()));
    }

    #[test]
    fn bad_shapes_are_refused() {
        for (value, policy) in [
            (json!("bridge"), false),
            (json!({"bridge": {}}), false),
            (json!("egress"), true),
            (json!(7), true),
            (json!({"egress": {"allow": ["a.com"]}, "host": 1}), true),
            (json!({"egress": ["a.com"]}), true),
            (json!({"egress": {}}), true),
            (json!({"egress": {"allow": "a.com"}}), true),
            (json!({"egress": {"allow": ["a.com"], "deny": []}}), true),
            (json!({"egress": {"allow": [443]}}), true),
            (json!({"egress": {"allow": ["ok.com", "bad..com"]}}), true),
        ] {
            let e = Network::from_json(&value).unwrap_err();
            assert_eq!(e.is_policy(), policy, "{value}: {e}");
        }
        let many: Vec<String> = (0..=MAX_RULES).map(|i| format!("h{i}.example.com")).collect();
        assert_eq!(EgressPolicy::parse(&many), Err(NetworkError::TooManyRules(MAX_RULES + 1)));
    }
}
