//! The node's secrets, as an operator keeps them (`--secrets-file`):
//!
//! - a file of `NAME=value` lines (blank lines and `#` comments skipped; the
//!   value is the rest of the line, trimmed, one pair of surrounding quotes
//!   removed), mode 0600 or 0640 (0400, 0440), or
//! - a directory of files, one per secret, named by it, each holding the
//!   value (one final line break dropped): systemd's `LoadCredential=`
//!   directory or a Kubernetes secret volume. Names starting with `.` are
//!   skipped. The directory must not be writable by group or others.
//!
//! Everything must belong to root or to the node's own user: a file anyone
//! else could write would let them choose where a key goes. Read again at
//! each sandbox create, so a key added or rotated needs no restart; a
//! running sandbox keeps the value it started with. Errors name files,
//! lines and secrets, never a value.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::value::SecretValue;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("secrets {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("secrets {}: mode {mode:04o} lets others read or change it (use 0600 or 0640)", path.display())]
    Mode { path: PathBuf, mode: u32 },
    #[error("secrets {}: owned by uid {uid}; it must belong to root or to the node's own user", path.display())]
    Owner { path: PathBuf, uid: u32 },
    #[error("secrets {}: neither a regular file nor a directory", path.display())]
    Kind { path: PathBuf },
    #[error("secrets {}:{line}: {problem}", path.display())]
    Line { path: PathBuf, line: usize, problem: String },
    #[error("secrets {}: secret {name:?} {problem}", path.display())]
    Value { path: PathBuf, name: String, problem: String },
}

/// Where the node's secrets live; `None`: the node holds none.
#[derive(Debug, Clone)]
pub struct SecretStore {
    path: Option<PathBuf>,
}

impl SecretStore {
    /// A store at `path`, read once now so that a node with a broken one
    /// does not start.
    pub fn open(path: Option<PathBuf>) -> Result<SecretStore, StoreError> {
        let store = SecretStore { path };
        let held = store.load()?;
        if let Some(path) = &store.path {
            tracing::info!(path = %path.display(), secrets = held.len(), "secret store read");
        }
        Ok(store)
    }

    /// Every secret the store holds now.
    pub fn load(&self) -> Result<HashMap<String, SecretValue>, StoreError> {
        let Some(path) = &self.path else { return Ok(HashMap::new()) };
        let io = |source| StoreError::Io { path: path.clone(), source };
        let file = File::open(path).map_err(io)?;
        // The opened file's own metadata: what is checked is what is read.
        let meta = file.metadata().map_err(io)?;
        check_owner(path, &meta)?;
        if meta.is_dir() {
            if meta.mode() & 0o022 != 0 {
                return Err(StoreError::Mode { path: path.clone(), mode: meta.mode() & 0o7777 });
            }
            load_dir(path)
        } else if meta.is_file() {
            check_private(path, &meta)?;
            parse_lines(path, &read(path, file)?)
        } else {
            Err(StoreError::Kind { path: path.clone() })
        }
    }
}

fn check_owner(path: &Path, meta: &std::fs::Metadata) -> Result<(), StoreError> {
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(StoreError::Owner { path: path.to_path_buf(), uid: meta.uid() });
    }
    Ok(())
}

/// No bit for others, no group write or execute: 0600, 0640, 0400, 0440.
fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), StoreError> {
    if meta.mode() & 0o037 != 0 {
        return Err(StoreError::Mode { path: path.to_path_buf(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

fn read(path: &Path, mut file: File) -> Result<Zeroizing<String>, StoreError> {
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(|source| StoreError::Io { path: path.to_path_buf(), source })?;
    Ok(text)
}

fn load_dir(dir: &Path) -> Result<HashMap<String, SecretValue>, StoreError> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io { path: path.to_path_buf(), source }
    }
    let mut held = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let file = File::open(&path).map_err(io(&path))?;
        let meta = file.metadata().map_err(io(&path))?;
        if !meta.is_file() {
            continue;
        }
        check_owner(&path, &meta)?;
        check_private(&path, &meta)?;
        let text = read(&path, file)?;
        let value = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
        let value = SecretValue::new(value.to_string()).map_err(|problem| StoreError::Value { path: path.clone(), name: name.clone(), problem })?;
        held.insert(name, value);
    }
    Ok(held)
}

fn parse_lines(path: &Path, text: &str) -> Result<HashMap<String, SecretValue>, StoreError> {
    let mut held = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_error = |problem: String| StoreError::Line { path: path.to_path_buf(), line: i + 1, problem };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The line may hold a value: say what is wrong without quoting it.
        let (name, value) = line.split_once('=').ok_or_else(|| line_error("is not NAME=value".into()))?;
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(line_error("the name before `=` must be letters, digits and '_'".into()));
        }
        let value = unquote(value.trim());
        let value = SecretValue::new(value.to_string()).map_err(|problem| StoreError::Value { path: path.to_path_buf(), name: name.to_string(), problem })?;
        if held.insert(name.to_string(), value).is_some() {
            return Err(line_error(format!("secret {name:?} is given twice")));
        }
    }
    Ok(held)
}

/// `"v"` or `'v'` to `v`: what an operator used to shell files writes.
fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|v| v.strip_suffix(q)) {
            return inner;
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn expose(held: &HashMap<String, SecretValue>) -> Vec<(String, String)> {
        let mut v: Vec<_> = held.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect();
        v.sort();
        v
    }

    #[test]
    fn a_file_of_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        write(&path, "# keys\n\nA_KEY=sk-a \n B = \"quoted value\"\nC='x'\nD=has=equals\n", 0o600);
        let store = SecretStore::open(Some(path.clone())).unwrap();
        let held = store.load().unwrap();
        assert_eq!(
            expose(&held),
            [("A_KEY", "sk-a"), ("B", "quoted value"), ("C", "x"), ("D", "has=equals")].map(|(k, v)| (k.to_string(), v.to_string()))
        );
        write(&path, "A=1\n", 0o640);
        assert_eq!(expose(&store.load().unwrap()).len(), 1, "read again each time");
        assert!(SecretStore::open(None).unwrap().load().unwrap().is_empty());
    }

    #[test]
    fn others_may_not_read_or_change_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        for mode in [0o644, 0o604, 0o660, 0o666, 0o610] {
            write(&path, "A=sk-a\n", mode);
            let e = SecretStore::open(Some(path.clone())).unwrap_err();
            assert!(matches!(e, StoreError::Mode { .. }), "{mode:o}: {e}");
        }
        for mode in [0o600, 0o640, 0o400, 0o440] {
            write(&path, "A=sk-a\n", mode);
            SecretStore::open(Some(path.clone())).unwrap();
        }
        std::os::unix::fs::chown(&path, Some(4242), None).unwrap();
        assert!(matches!(SecretStore::open(Some(path.clone())), Err(StoreError::Owner { uid: 4242, .. })));
        let e = SecretStore::open(Some(dir.path().join("missing"))).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    /// A malformed line is reported by number; its value never.
    #[test]
    fn errors_never_quote_a_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets");
        for (text, wanted) in [
            ("A=ok\nsk-leaked-no-equals\n", ":2: is not NAME=value"),
            ("A B=sk-leaked\n", ":1: the name"),
            ("A=ok\nA=sk-leaked\n", ":2: secret \"A\" is given twice"),
            ("A=\n", "secret \"A\" is empty"),
        ] {
            write(&path, text, 0o600);
            let e = SecretStore::open(Some(path.clone())).unwrap_err().to_string();
            assert!(e.contains(wanted), "{text:?}: {e}");
            assert!(!e.contains("leaked"), "{e}");
        }
    }

    #[test]
    fn a_directory_of_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        write(&dir.path().join("ANTHROPIC_API_KEY"), "sk-ant\n", 0o600);
        write(&dir.path().join("OPENAI_API_KEY"), "sk-oai", 0o440);
        write(&dir.path().join(".hidden"), "x", 0o644);
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let held = SecretStore::open(Some(dir.path().to_path_buf())).unwrap().load().unwrap();
        assert_eq!(expose(&held), [("ANTHROPIC_API_KEY", "sk-ant"), ("OPENAI_API_KEY", "sk-oai")].map(|(k, v)| (k.to_string(), v.to_string())));

        write(&dir.path().join("LOOSE"), "x", 0o604);
        assert!(matches!(SecretStore::open(Some(dir.path().to_path_buf())), Err(StoreError::Mode { .. })));
        std::fs::remove_file(dir.path().join("LOOSE")).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(SecretStore::open(Some(dir.path().to_path_buf())), Err(StoreError::Mode { .. })));
    }
}
