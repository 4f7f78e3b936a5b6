//! State files written whole or not at all: a crash (of the daemon or the
//! host) leaves the old contents or the new, never half of either.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temp file beside it, fsynced, then
/// renamed over it, then the directory fsynced so the rename itself lasts.
/// For state that must outlive a crash of the host (fences).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_replacing(path, bytes, true)
}

/// Writes `bytes` to `path` atomically (a temp file renamed over it) without
/// fsync: for state that describes processes of this boot (a sandbox's
/// record, its sessions). A crash of the daemon keeps what was written (the
/// page cache is the host's); a crash of the host takes the sandboxes with
/// it, and their records say which boot they were made in. Two fsyncs on
/// every create cost 1 to 3 ms here (docs/perf.md) for nothing.
pub fn write_atomic_for_this_boot(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_replacing(path, bytes, false)
}

fn write_replacing(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other(format!("{} has no directory", path.display())))?;
    let name = path.file_name().ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if durable {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The length-delimited protobuf records of an append-only file (`what`
/// names it in the log); missing or unreadable gives none. A record cut
/// short by a crash mid-write ends the file there.
pub fn read_delimited<M: prost::Message + Default>(path: &Path, what: &str) -> Vec<M> {
    let Ok(bytes) = std::fs::read(path) else { return Vec::new() };
    let mut buf = bytes.as_slice();
    let mut records = Vec::new();
    while !buf.is_empty() {
        match M::decode_length_delimited(&mut buf) {
            Ok(r) => records.push(r),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "{what} ends in a partial record; dropped");
                break;
            }
        }
    }
    records
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_whole_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sandbox.json");
        write_atomic(&path, b"first, and longer").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomic_for_this_boot(&path, b"third").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
