//! The configuration file: `/etc/agentd/agentd.toml` when installed, or the
//! file `AGENTD_CONFIG` names. Its keys become `AGENTD_*` environment defaults
//! before the command line is parsed, so the order of precedence is: flag,
//! then environment, then file, then built-in default.
//!
//! Every key has a type ([`keys::KEYS`]); a file with an unknown key or a
//! bad value is refused as a whole, each problem named with its line and
//! column, both by `agentd config check` and by every command that loads
//! the file at start.

pub mod keys;

use std::fmt;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

pub const DEFAULT_PATH: &str = "/etc/agentd/agentd.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `error` is shown in the message, not chained as a source, so that
    /// `{:#}` prints it once.
    #[error("cannot read config {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    /// Never empty. Shown as its first problem, as one line; `agentd config
    /// check` prints them all.
    #[error("{}{}", problems[0], more(problems.len()))]
    Invalid { problems: Vec<Problem> },
}

fn more(n: usize) -> String {
    match n {
        0 | 1 => String::new(),
        n => format!(" (and {} more: `agentd config check` lists them)", n - 1),
    }
}

/// One thing wrong in a config file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config {}:{}:{}: {}", self.path.display(), self.line, self.column, self.message)
    }
}

/// The file `AGENTD_CONFIG` names (which must exist), else the default path
/// (which may not).
pub fn location() -> (PathBuf, bool) {
    match std::env::var_os("AGENTD_CONFIG") {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    }
}

/// The `AGENTD_*` variables a config file's text sets, in file order, or
/// every problem the file has.
pub fn parse(path: &Path, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let problem = |span: std::ops::Range<usize>, message: String| {
        let (line, column) = line_column(text, span.start);
        Problem { path: path.to_owned(), line, column, message }
    };
    let (table, errors) = DeTable::parse_recoverable(text);
    let mut problems: Vec<Problem> = errors
        .iter()
        // toml's messages may run over lines; ours are one line each.
        .map(|e| problem(e.span().unwrap_or(0..0), format!("not valid TOML: {}", e.message().trim().replace('\n', "; "))))
        .collect();
    let mut vars = Vec::new();
    if problems.is_empty() {
        let mut entries: Vec<_> = table.get_ref().iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (name, value) in entries {
            match check_entry(name.get_ref(), value.get_ref()) {
                Ok(var) => vars.push(var),
                Err((on_key, message)) => problems.push(problem(if on_key { name.span() } else { value.span() }, message)),
            }
        }
    }
    if problems.is_empty() { Ok(vars) } else { Err(ConfigError::Invalid { problems }) }
}

/// One `key = value`: its variable, or what is wrong and whether the key
/// (rather than the value) is.
fn check_entry(name: &str, value: &DeValue<'_>) -> Result<(String, String), (bool, String)> {
    let Some(key) = keys::find(name) else {
        let hint = match keys::suggest(name) {
            Some(near) => format!("did you mean {near:?}?"),
            None => format!("known keys: {}", keys::KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")),
        };
        return Err((true, format!("unknown key {name:?} ({hint})")));
    };
    let value = key.check(value).map_err(|why| (false, format!("{name} {why}")))?;
    Ok((keys::env_name(key), value))
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Reads and checks the file at `path`.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
    parse(path, &text)
}

/// The file a command loaded, for `agentd doctor` to report.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    /// How many keys it set.
    pub keys: usize,
    /// The environment variables it set (those not set already).
    pub set: Vec<String>,
}

/// Loads the config file, if any, into the environment; `None` when there
/// is none at the default path. Must run while the process is
/// single-threaded.
pub fn load_into_env() -> Result<Option<Loaded>, ConfigError> {
    let (path, required) = location();
    let vars = match read(&path) {
        Ok(vars) => vars,
        Err(ConfigError::Read { error, .. }) if error.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => return Err(e),
    };
    let keys = vars.len();
    let mut set = Vec::new();
    for (name, value) in vars {
        if std::env::var_os(&name).is_none() {
            // SAFETY: called from main before any thread exists.
            unsafe { std::env::set_var(&name, value) };
            set.push(name);
        }
    }
    Ok(Some(Loaded { path, keys, set }))
}

#[cfg(test)]
mod tests;
