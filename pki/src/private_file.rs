//! Key and certificate files in a node's state dir: written whole or not at all, and
//! readable by the owner only.
//!
//! A crash or full disk halfway through rewriting a key must not leave a truncated
//! key behind (the node could then neither serve nor re-join with the same id), so
//! the bytes go to a temporary file in the same directory, are synced, and replace the
//! old file with one `rename(2)`; the directory is synced too, so the rename itself
//! survives a power cut. The temporary file is created with mode 0600 from the start:
//! the key is never readable by others, not even for a moment.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::random;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: not UTF-8 text")]
    NotText { path: PathBuf },
}

/// Atomically replaces `path` with `bytes`, mode 0600. Blocking: call it from
/// `spawn_blocking` in async code if the disk may be slow.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let wrap = |source| FileError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| wrap(std::io::Error::other("the path names no file")))?;
    let suffix = random::bytes::<8>().map_err(|e| wrap(std::io::Error::other(e)))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    ));

    let result = write_synced(&tmp, bytes).and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = result {
        // Best effort: the temporary file must not pile up; the first error is the
        // one worth reporting.
        let _ = fs::remove_file(&tmp);
        return Err(wrap(e));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(wrap)
}

/// Reads back a file written with [`write_private`] (a PEM, typically).
pub fn read_private(path: &Path) -> Result<String, FileError> {
    let bytes = fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| FileError::NotText {
        path: path.to_owned(),
    })
}

fn write_synced(tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        // A fresh name every time; never follow or reuse something already there.
        .create_new(true)
        .mode(0o600)
        .open(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn writes_0600_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        write_private(&path, b"secret one").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read_private(&path).unwrap(), "secret one");
        // Only the file itself is left: no temporary behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn replaces_an_existing_file_and_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.crt");
        fs::write(&path, b"old old old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(read_private(&path).unwrap(), "new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("node.key");
        let err = write_private(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("missing-dir"), "{err}");
        let err = read_private(&path).unwrap_err();
        assert!(err.to_string().starts_with("reading "), "{err}");
        assert!(err.to_string().contains("node.key"), "{err}");
    }
}
