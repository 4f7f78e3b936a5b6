//! The keys a config file may set, each with its type: the one table a new
//! key is added to (one line), and the checks each type's values get.
//!
//! A key `k` becomes the environment default `AGENTD_K` (upper case), the
//! variable its command-line flag reads, so the checks here are the file's
//! share of what clap checks for flags and variables, plus what only makes
//! sense in a file (paths are absolute: relative to what?).

use std::net::SocketAddr;
use std::path::Path;

use toml::de::DeValue;

/// What a key's value must be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `host:port`, as `listen` binds it.
    SocketAddr,
    /// A TOML integer from `min` to `max` (the flag's type bounds `max`).
    Int { min: u64, max: u64 },
    Bool,
    /// An absolute path.
    Path,
    /// A PostgreSQL URL, or empty for the embedded SQLite store.
    DatabaseUrl,
    /// A registry file: an absolute path, or a file://, http:// or https:// URL.
    Registry,
    /// A `tracing` filter (`RUST_LOG` syntax).
    LogFilter,
    /// One cgroup directory name (see `agentd_cgroups::layout::check_name`).
    CgroupName,
    /// A node id: a DNS label (`agentd_plan::ids::valid_node_id`).
    NodeId,
    /// Labels `k=v,k2=v2`.
    Labels,
    /// `host:port` (a name or an address).
    HostPort,
    /// An http:// or https:// URL.
    HttpUrl,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// A TOML integer or float of at least `min`, as a string (the flag is
    /// an `f64`).
    Number { min: f64 },
    /// An array of strings each of the kind given (the variable joins them
    /// with commas, so none may hold one).
    List(&'static Kind),
}

/// Milliseconds or counts a flag holds in a `u32`.
const fn u32_from(min: u64) -> Kind {
    Kind::Int { min, max: u32::MAX as u64 }
}

/// Milliseconds a flag holds in a `u64` (TOML integers stop at `i64::MAX`).
const fn u64_from(min: u64) -> Kind {
    Kind::Int { min, max: i64::MAX as u64 }
}

/// One key of the file.
#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    pub kind: Kind,
}

const fn key(name: &'static str, kind: Kind) -> Key {
    Key { name, kind }
}

/// Every key, with the type of its flag (`src/cli.rs`). Minimums of 1 where
/// 0 would break agentd rather than mean "never": a zero timeout fails every
/// call, id base 0 maps host root, no ids or no sandboxes run nothing.
pub const KEYS: &[Key] = &[
    key("listen", Kind::SocketAddr),
    key("state_dir", Kind::Path),
    key("log", Kind::LogFilter),
    key("log_json", Kind::Bool),
    key("initialize_timeout_ms", u32_from(1)),
    key("node_call_timeout_ms", u64_from(1)),
    key("node_socket", Kind::Path),
    key("database_url", Kind::DatabaseUrl),
    key("node_check_interval_ms", u64_from(1)),
    key("node_heartbeat_timeout_ms", u64_from(1)),
    key("hibernate_after_ms", u64_from(0)),
    key("container_ttl_ms", u64_from(0)),
    key("cgroup_subtree", Kind::CgroupName),
    key("id_base", u32_from(1)),
    key("id_range_size", u32_from(1)),
    key("max_sandboxes", u32_from(1)),
    key("stop_grace_ms", u32_from(0)),
    key("registry", Kind::Registry),
    key("registry_sync_interval_ms", u64_from(0)),
    key("sandbox_bin", Kind::Path),
    key("node_id", Kind::NodeId),
    key("labels", Kind::Labels),
    key("capacity_memory", u64_from(1)),
    key("capacity_cpus", Kind::Number { min: 0.01 }),
    key("placement", Kind::Choice(&["spread", "binpack"])),
    key("join", Kind::HttpUrl),
    key("advertise", Kind::HostPort),
    key("grpc_listen", Kind::SocketAddr),
    key("no_auth", Kind::Bool),
    key("metrics_listen", Kind::SocketAddr),
    key("sse_keepalive_ms", u64_from(1)),
    key("sse_buffer", Kind::Int { min: 1, max: 1_000_000 }),
    key("allowed_host_paths", Kind::List(&Kind::Path)),
    key("allowed_registry_sources", Kind::List(&Kind::Registry)),
    key("live_restore", Kind::Bool),
    key("closed_session_retention_ms", u64_from(0)),
    key("secrets_file", Kind::Path),
    key("secrets_ca_file", Kind::Path),
];

pub fn find(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The environment variable a key sets.
pub fn env_name(key: &Key) -> String {
    format!("AGENTD_{}", key.name.to_uppercase())
}

impl Key {
    /// The value as its environment variable holds it, or what is wrong with
    /// it (a phrase that follows the key's name: "must be ...").
    pub fn check(&self, value: &DeValue<'_>) -> Result<String, String> {
        let found = || describe(value);
        match self.kind {
            Kind::Int { min, max } => {
                let n = match value {
                    DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix()).ok(),
                    _ => None,
                };
                match n {
                    Some(n) if n >= i128::from(min) && n <= i128::from(max) => Ok(n.to_string()),
                    _ => Err(format!("must be an integer from {min} to {max}, found {}", found())),
                }
            }
            Kind::Bool => match value {
                DeValue::Boolean(b) => Ok(b.to_string()),
                _ => Err(format!("must be true or false, found {}", found())),
            },
            Kind::Number { min } => {
                let n = match value {
                    DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok().map(|n| n as f64),
                    DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
                    _ => None,
                };
                match n {
                    Some(n) if n.is_finite() && n >= min => Ok(n.to_string()),
                    _ => Err(format!("must be a number of at least {min}, found {}", found())),
                }
            }
            Kind::List(kind) => {
                let DeValue::Array(items) = value else {
                    return Err(format!("must be an array of strings, each {}, found {}", kind.what(), found()));
                };
                let mut joined = Vec::with_capacity(items.len());
                for item in items {
                    let DeValue::String(s) = item.get_ref() else {
                        return Err(format!("must be an array of strings, found {} in it", describe(item.get_ref())));
                    };
                    if s.contains(',') {
                        return Err(format!("must hold no commas, found {s:?}"));
                    }
                    kind.check_str(s)?;
                    joined.push(s.to_string());
                }
                Ok(joined.join(","))
            }
            _ => {
                let DeValue::String(s) = value else {
                    return Err(format!("must be a string ({}), found {}", self.kind.what(), found()));
                };
                self.kind.check_str(s).map(|()| s.to_string())
            }
        }
    }
}

impl Kind {
    /// What a string of this kind is, for messages.
    fn what(self) -> &'static str {
        match self {
            Kind::SocketAddr => "a socket address such as \"127.0.0.1:8080\"",
            Kind::Path => "an absolute path",
            Kind::DatabaseUrl => "a postgres:// URL, or empty for the embedded SQLite store",
            Kind::Registry => "an absolute path or a file://, http:// or https:// URL",
            Kind::LogFilter => "a log filter such as \"info,agentd_node=debug\"",
            Kind::CgroupName => "a cgroup name of 1 to 128 letters, digits, '_' or '-'",
            Kind::NodeId => "a node id: lower-case letters, digits and '-', at most 63",
            Kind::Labels => "labels such as \"zone=a,disk=ssd\"",
            Kind::HostPort => "host:port, such as \"10.0.0.5:7443\"",
            Kind::HttpUrl => "an http:// or https:// URL",
            Kind::Choice(_) => "one of the words listed",
            Kind::Int { .. } | Kind::Bool | Kind::Number { .. } | Kind::List(_) => "",
        }
    }

    fn check_str(self, s: &str) -> Result<(), String> {
        let bad = || format!("must be {}, found {s:?}", self.what());
        match self {
            Kind::SocketAddr => s.parse::<SocketAddr>().map(drop).map_err(|_| bad()),
            Kind::Path => absolute(s).ok_or_else(bad),
            Kind::DatabaseUrl => check_database_url(s).map_err(|why| format!("must be {}: {why}", self.what())),
            Kind::Registry => match s.split_once("://") {
                Some((scheme, rest)) if ["file", "http", "https"].contains(&scheme) && !rest.is_empty() => Ok(()),
                Some(_) => Err(bad()),
                None => absolute(s).ok_or_else(bad),
            },
            Kind::LogFilter => tracing_subscriber::EnvFilter::builder()
                .parse(s)
                .map(drop)
                .map_err(|e| format!("must be {}: {e} in {s:?}", self.what())),
            Kind::CgroupName => agentd_cgroups::layout::check_name(s).map_err(|_| bad()),
            Kind::NodeId => agentd_plan::ids::valid_node_id(s).then_some(()).ok_or_else(bad),
            Kind::Labels => crate::cli::parse_labels(s).map(drop).map_err(|e| format!("must be {}: {e}", self.what())),
            Kind::HostPort => match s.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
                _ => Err(bad()),
            },
            Kind::HttpUrl => (s.starts_with("http://") || s.starts_with("https://")).then_some(()).ok_or_else(bad),
            Kind::Choice(words) => words.contains(&s).then_some(()).ok_or_else(|| format!("must be one of {}, found {s:?}", words.join(", "))),
            Kind::Int { .. } | Kind::Bool | Kind::Number { .. } | Kind::List(_) => unreachable!("not a string kind"),
        }
    }
}

fn absolute(s: &str) -> Option<()> {
    (Path::new(s).is_absolute() && !s.contains('\0')).then_some(())
}

/// Empty, or a URL `Store::open` takes as PostgreSQL's. The reason never
/// quotes the URL: it may hold a password.
pub fn check_database_url(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Ok(());
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err("no scheme".into());
    };
    if !scheme.eq_ignore_ascii_case("postgres") && !scheme.eq_ignore_ascii_case("postgresql") {
        return Err(format!("scheme {scheme:?} is not postgres or postgresql"));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // Without a host sqlx dials a local socket directory; a config file
    // naming a database means a server.
    if host.is_empty() {
        return Err("no host".into());
    }
    Ok(())
}

/// "an integer (-5)", "a string (\"x\")", "a table": the value, where short.
fn describe(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("the string {s:?}"),
        DeValue::Integer(i) => format!("{i}"),
        DeValue::Float(f) => format!("the float {}", f.as_str()),
        DeValue::Boolean(b) => format!("{b}"),
        DeValue::Datetime(d) => format!("the datetime {d}"),
        DeValue::Array(_) => "an array".into(),
        DeValue::Table(_) => "a table".into(),
    }
}

/// The known key nearest to `name` if it is a likely typo (at most two
/// edits away).
pub fn suggest(name: &str) -> Option<&'static str> {
    KEYS.iter().map(|k| (edit_distance(name, k.name), k.name)).filter(|&(d, _)| d <= 2).min().map(|(_, k)| k)
}

/// Levenshtein distance, on chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
