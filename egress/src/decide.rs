//! Whether a sandbox's connection or name may pass: the policy's rules
//! applied to what the gateway saw (destination, port, the names this
//! sandbox resolved to that address, the TLS server name). Pure: the
//! resolver and the proxy feed it, tests drive it directly.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Mutex;

use agentd_plan::network::{EgressPolicy, Ipv4Net};

/// Addresses no domain rule reaches, whatever a name resolves to: only a
/// rule naming the address (or a block holding it) lets them through.
/// Loopback, "this network", link-local (with the cloud metadata address
/// 169.254.169.254), multicast and broadcast; the host's own addresses are
/// added per gateway ([`Decider::new`]).
pub const ALWAYS_DENIED: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
    // The sandboxes' own links (crate::link): never one sandbox to another.
    (Ipv4Addr::new(100, 127, 0, 0), 16),
];

/// Private ranges (RFC 1918, shared address space, benchmarking): reached
/// through a name only if an address rule names them too (on any port), so
/// that a name an attacker controls cannot point the sandbox at the node's
/// LAN.
pub const PRIVATE: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let through; the rule that allowed it, as a profile writes it.
    Allow(String),
    Deny(Denied),
}

/// Why something was refused, as the `sandbox.egress_denied` event says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The rule that would have allowed it, as a profile writes it.
    pub missing_rule: String,
    pub reason: String,
}

fn deny(missing_rule: impl Into<String>, reason: impl Into<String>) -> Verdict {
    Verdict::Deny(Denied { missing_rule: missing_rule.into(), reason: reason.into() })
}

/// A sandbox's policy with what its resolver has answered so far.
pub struct Decider {
    policy: EgressPolicy,
    /// Never reached through a name: [`ALWAYS_DENIED`] and the host's own
    /// addresses (the gateway's among them).
    denied: Vec<Ipv4Net>,
    /// Address -> the allowed names the resolver gave this sandbox it for.
    /// Only grows: a sandbox's lifetime of lookups is small.
    resolved: Mutex<HashMap<Ipv4Addr, BTreeSet<String>>>,
}

impl Decider {
    pub fn new(policy: EgressPolicy, own_addrs: &[Ipv4Addr]) -> Decider {
        let mut denied: Vec<Ipv4Net> = ALWAYS_DENIED.iter().map(|(a, l)| Ipv4Net::new(*a, *l).expect("valid block")).collect();
        denied.extend(own_addrs.iter().map(|a| Ipv4Net::new(*a, 32).expect("a /32")));
        Decider { policy, denied, resolved: Mutex::new(HashMap::new()) }
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// Whether the resolver may look `name` up (some rule names it).
    pub fn name(&self, name: &str) -> Verdict {
        match self.policy.allow.iter().find(|r| r.target.matches_name(name)) {
            Some(rule) => Verdict::Allow(rule.to_string()),
            None => deny(name, format!("no rule names {name}")),
        }
    }

    /// Records that the resolver answered `name` with `addrs`: connections
    /// to them count as connections to `name`.
    pub fn resolved(&self, name: &str, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let mut map = self.resolved.lock().unwrap();
        for a in addrs {
            map.entry(a).or_default().insert(name.to_string());
        }
    }

    /// A TCP connection to `ip:port`; `server_name`: the TLS server name
    /// the client sent, if it started a TLS handshake. `Some(None)`: a TLS
    /// handshake without one.
    pub fn connection(&self, ip: Ipv4Addr, port: u16, server_name: Option<Option<&str>>) -> Verdict {
        if let Some(rule) = self.policy.allow.iter().find(|r| r.allows_addr(ip, port)) {
            return Verdict::Allow(rule.to_string());
        }
        let target = format!("{ip}:{port}");
        if self.denied.iter().any(|n| n.contains(ip)) {
            return deny(target, format!("{ip} is a loopback, link-local, metadata or host address; only a rule naming it allows it"));
        }
        let named = |ip: Ipv4Addr| self.policy.allow.iter().any(|r| matches!(&r.target, agentd_plan::network::Target::Net(n) if n.contains(ip)));
        if PRIVATE.iter().any(|(a, l)| Ipv4Net::new(*a, *l).expect("valid block").contains(ip)) && !named(ip) {
            return deny(target, format!("{ip} is a private address; only a rule naming it (or its block) allows it"));
        }
        let names = self.resolved.lock().unwrap().get(&ip).cloned().unwrap_or_default();
        match server_name {
            Some(Some(sni)) => {
                let sni = agentd_plan::network::normal_name(sni);
                if !names.contains(&sni) {
                    return deny(format!("{sni}:{port}"), format!("TLS server name {sni} is not a name this sandbox resolved to {ip}"));
                }
                match self.policy.allow.iter().find(|r| r.allows_name(&sni, port)) {
                    Some(rule) => Verdict::Allow(rule.to_string()),
                    None => deny(format!("{sni}:{port}"), format!("no rule allows {sni} on port {port}")),
                }
            }
            Some(None) if !names.is_empty() => deny(target, "a TLS handshake without a server name to a name's address".to_string()),
            _ => {
                for name in &names {
                    if let Some(rule) = self.policy.allow.iter().find(|r| r.allows_name(name, port)) {
                        return Verdict::Allow(rule.to_string());
                    }
                }
                match names.iter().next() {
                    Some(name) => deny(format!("{name}:{port}"), format!("no rule allows {name} on port {port}")),
                    None => deny(target, format!("no rule names {ip}, and no allowed name resolved to it")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decider(rules: &[&str]) -> Decider {
        Decider::new(EgressPolicy::parse(rules).unwrap(), &[Ipv4Addr::new(192, 0, 2, 1)])
    }

    fn denied(v: Verdict) -> Denied {
        match v {
            Verdict::Deny(d) => d,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_resolve_only_under_a_rule() {
        let d = decider(&["api.example.com:443", "*.cdn.example.com"]);
        assert_eq!(d.name("API.example.com."), Verdict::Allow("api.example.com:443".into()));
        assert_eq!(d.name("x.cdn.example.com"), Verdict::Allow("*.cdn.example.com".into()));
        assert_eq!(denied(d.name("evil.example")).missing_rule, "evil.example");
    }

    #[test]
    fn a_name_s_addresses_open_on_its_ports_and_tls_names() {
        let d = decider(&["api.example.com:443", "plain.example.com:8080"]);
        let ip = Ipv4Addr::new(203, 0, 113, 5);
        let lan = Ipv4Addr::new(192, 168, 1, 10);
        d.resolved("api.example.com", [lan]);
        assert!(denied(d.connection(lan, 443, Some(Some("api.example.com")))).reason.contains("private"), "a name pointing into the LAN");
        let named = decider(&["api.example.com:443", "192.168.1.0/24:22"]);
        named.resolved("api.example.com", [lan]);
        assert!(matches!(named.connection(lan, 443, Some(Some("api.example.com"))), Verdict::Allow(_)), "a rule names the block");
        assert_eq!(denied(d.connection(ip, 443, None)).missing_rule, "203.0.113.5:443", "unresolved: nothing allows it");
        d.resolved("api.example.com", [ip]);
        assert!(matches!(d.connection(ip, 443, Some(Some("api.example.com"))), Verdict::Allow(_)));
        assert!(matches!(d.connection(ip, 443, None), Verdict::Allow(_)));
        assert_eq!(denied(d.connection(ip, 8443, None)).missing_rule, "api.example.com:8443");
        let other = denied(d.connection(ip, 443, Some(Some("evil.example"))));
        assert_eq!(other.missing_rule, "evil.example:443");
        assert!(denied(d.connection(ip, 443, Some(None))).reason.contains("without a server name"));
        // Another name on the same address that is allowed on another port only.
        d.resolved("plain.example.com", [ip]);
        assert!(matches!(d.connection(ip, 8080, None), Verdict::Allow(_)));
        assert_eq!(denied(d.connection(ip, 8080, Some(Some("api.example.com")))).missing_rule, "api.example.com:8080");
    }

    #[test]
    fn special_addresses_need_a_rule_naming_them() {
        let d = decider(&["evil.example", "127.0.0.1:5432"]);
        let metadata = Ipv4Addr::new(169, 254, 169, 254);
        d.resolved("evil.example", [metadata, Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::LOCALHOST]);
        assert!(denied(d.connection(metadata, 80, None)).reason.contains("link-local"));
        assert_eq!(denied(d.connection(Ipv4Addr::new(192, 0, 2, 1), 443, None)).missing_rule, "192.0.2.1:443", "the host's own address");
        assert!(matches!(d.connection(Ipv4Addr::LOCALHOST, 80, None), Verdict::Deny(_)));
        assert_eq!(d.connection(Ipv4Addr::LOCALHOST, 5432, None), Verdict::Allow("127.0.0.1:5432".into()));
    }
}
