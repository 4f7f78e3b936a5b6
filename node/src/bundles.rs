//! The node's content-addressed cache of agent bundles.
//!
//! A bundle is an agent distribution archive (`.tar.gz`, `.tgz` or `.tar`, as
//! the ACP registry's `binary` entries ship them). `<root>/<sha256>/` holds the
//! unpacked tree of the archive whose SHA-256 is `<sha256>`, and exists whole
//! or not at all: the archive is streamed to `.tmp-<uuid>.archive` and hashed
//! on the way, checked against the plan's digest, unpacked into `.tmp-<uuid>/`
//! and renamed into place. `rename(2)` onto an existing non-empty directory
//! fails, so of two creates of one bundle (in this process or another) the
//! first complete tree stays and the other removes its own temp. A crash
//! leaves only `.tmp-*` entries, which [`BundleCache::open`] removes.
//!
//! The tree is made readable for sandboxes (their root maps to an unprivileged
//! host uid): directories 0755, files 0644 or 0755, no set-id bits; nothing is
//! owned by anyone but the node. Sandboxes bind it read-only.

use std::collections::HashMap;
use std::fs;
use std::io::{BufReader, Read, Seek};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_proto::error::status;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Status};

/// Archives larger than this are refused while they stream in.
pub const DEFAULT_MAX_ARCHIVE_BYTES: u64 = 2 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle URL {0:?} is not an http://, https:// or file:// URL")]
    BadUrl(String),
    #[error("bundle sha256 {0:?} is not 64 hexadecimal digits")]
    BadDigest(String),
    #[error("cannot fetch bundle {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("bundle {url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("bundle {url} has sha256 {actual}, expected {expected}")]
    Mismatch { url: String, expected: String, actual: String },
    #[error("bundle {url} is not a usable archive: {reason}")]
    Invalid { url: String, reason: String },
    #[error("bundle cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
}

impl BundleError {
    /// The status the control plane turns into a problem with the same code.
    pub fn status(&self) -> Status {
        let (grpc, code) = match self {
            BundleError::BadUrl(_) | BundleError::BadDigest(_) => (Code::InvalidArgument, "invalid_request"),
            BundleError::Fetch { .. } => (Code::FailedPrecondition, "bundle_fetch_failed"),
            BundleError::TooLarge { .. } | BundleError::Invalid { .. } => (Code::FailedPrecondition, "bundle_invalid"),
            BundleError::Mismatch { .. } => (Code::FailedPrecondition, "bundle_checksum_mismatch"),
            BundleError::Cache { .. } => (Code::Internal, "internal"),
        };
        status(grpc, code, self.to_string())
    }
}

pub struct BundleCache {
    /// `<node state>/bundles`: one directory per unpacked archive digest.
    root: PathBuf,
    http: reqwest::Client,
    max_archive_bytes: u64,
    /// One fetch per bundle at a time in this process, so that concurrent
    /// sessions of one agent download it once; the rename covers other processes.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn cache_err(path: &Path, e: impl std::fmt::Display) -> BundleError {
    BundleError::Cache { path: path.to_owned(), reason: e.to_string() }
}

/// Lower-cases a digest and checks its form.
fn parse_digest(sha256: &str) -> Result<String, BundleError> {
    let digest = sha256.to_ascii_lowercase();
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BundleError::BadDigest(sha256.to_string()));
    }
    Ok(digest)
}

enum Source {
    File(PathBuf),
    Http(reqwest::Url),
}

fn parse_url(url: &str) -> Result<Source, BundleError> {
    let bad = || BundleError::BadUrl(url.to_string());
    let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
    match parsed.scheme() {
        "file" => parsed.to_file_path().map(Source::File).map_err(|_| bad()),
        "http" | "https" => Ok(Source::Http(parsed)),
        _ => Err(bad()),
    }
}

impl BundleCache {
    /// Opens the cache at `root`, creating it and removing what an interrupted
    /// fetch or unpack left.
    pub fn open(root: PathBuf) -> std::io::Result<Self> {
        fs::create_dir_all(&root)?;
        for entry in fs::read_dir(&root)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let path = entry.path();
                let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                if let Err(e) = removed {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove leftover bundle temp");
                }
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self { root, http, max_archive_bytes: DEFAULT_MAX_ARCHIVE_BYTES, inflight: Mutex::default() })
    }

    pub fn with_max_archive_bytes(mut self, limit: u64) -> Self {
        self.max_archive_bytes = limit;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The unpacked tree of the archive at `url`, fetched and unpacked unless
    /// the cache has it. With a `sha256`, a cached tree answers without any
    /// fetch, and an archive with another digest is refused; without one, the
    /// archive is fetched and its own digest names the tree. A failure leaves
    /// nothing in the cache.
    pub async fn ensure(&self, url: &str, sha256: Option<&str>) -> Result<PathBuf, BundleError> {
        let source = parse_url(url)?;
        let expected = sha256.map(parse_digest).transpose()?;
        if let Some(dir) = expected.as_ref().map(|d| self.root.join(d)).filter(|d| d.is_dir()) {
            return Ok(dir);
        }
        let key = expected.clone().unwrap_or_else(|| url.to_string());
        let lock = Arc::clone(self.inflight.lock().unwrap().entry(key.clone()).or_default());
        let result = {
            let _fetching = lock.lock().await;
            match expected.as_ref().map(|d| self.root.join(d)).filter(|d| d.is_dir()) {
                // Another request fetched it while this one waited.
                Some(dir) => Ok(dir),
                None => self.fetch_and_unpack(url, &source, expected.as_deref()).await,
            }
        };
        let mut inflight = self.inflight.lock().unwrap();
        if Arc::strong_count(&lock) == 2 {
            inflight.remove(&key);
        }
        result
    }

    async fn fetch_and_unpack(&self, url: &str, source: &Source, expected: Option<&str>) -> Result<PathBuf, BundleError> {
        let tmp = self.root.join(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
        let archive = tmp.with_extension("archive");
        let result = async {
            let actual = self.download(url, source, &archive).await?;
            if let Some(expected) = expected
                && actual != expected
            {
                return Err(BundleError::Mismatch { url: url.to_string(), expected: expected.to_string(), actual });
            }
            let dest = self.root.join(&actual);
            if dest.is_dir() {
                return Ok(dest);
            }
            let (archive, tmp_dir) = (archive.clone(), tmp.clone());
            tokio::task::spawn_blocking(move || unpack(&archive, &tmp_dir))
                .await
                .map_err(|e| cache_err(&tmp, e))?
                .map_err(|reason| BundleError::Invalid { url: url.to_string(), reason })?;
            match fs::rename(&tmp, &dest) {
                Ok(()) => Ok(dest),
                // Someone else put the same tree in place first: theirs is as good.
                Err(_) if dest.is_dir() => Ok(dest),
                Err(e) => Err(cache_err(&dest, e)),
            }
        }
        .await;
        let _ = fs::remove_file(&archive);
        if tmp.exists()
            && let Err(e) = fs::remove_dir_all(&tmp)
        {
            tracing::warn!(path = %tmp.display(), error = %e, "cannot remove bundle temp");
        }
        if let Ok(dir) = &result {
            tracing::info!(url, dir = %dir.display(), "bundle ready");
        }
        result
    }

    /// Streams the archive to `dest`, hashing it; returns its hex digest.
    async fn download(&self, url: &str, source: &Source, dest: &Path) -> Result<String, BundleError> {
        let fetch_err = |reason: String| BundleError::Fetch { url: url.to_string(), reason };
        let mut out = tokio::fs::File::create(dest).await.map_err(|e| cache_err(dest, e))?;
        let mut hasher = Sha256::new();
        let mut total = 0u64;
        let mut take = |chunk: &[u8], hasher: &mut Sha256| -> Result<(), BundleError> {
            total += chunk.len() as u64;
            if total > self.max_archive_bytes {
                return Err(BundleError::TooLarge { url: url.to_string(), limit: self.max_archive_bytes });
            }
            hasher.update(chunk);
            Ok(())
        };
        match source {
            Source::File(path) => {
                let mut file = tokio::fs::File::open(path).await.map_err(|e| fetch_err(format!("{}: {e}", path.display())))?;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = file.read(&mut buf).await.map_err(|e| fetch_err(format!("{}: {e}", path.display())))?;
                    if n == 0 {
                        break;
                    }
                    take(&buf[..n], &mut hasher)?;
                    out.write_all(&buf[..n]).await.map_err(|e| cache_err(dest, e))?;
                }
            }
            Source::Http(parsed) => {
                let response = self.http.get(parsed.clone()).send().await.map_err(|e| fetch_err(e.to_string()))?;
                let response = response.error_for_status().map_err(|e| fetch_err(e.to_string()))?;
                let mut body = response.bytes_stream();
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| fetch_err(e.to_string()))?;
                    take(&chunk, &mut hasher)?;
                    out.write_all(&chunk).await.map_err(|e| cache_err(dest, e))?;
                }
            }
        }
        out.flush().await.map_err(|e| cache_err(dest, e))?;
        Ok(hex::encode(hasher.finalize()))
    }
}

/// Refuses entry paths that are absolute or climb out of the bundle.
/// (`tar` itself would silently skip a `..` entry; a bundle missing files it
/// promised is worse than a clear refusal.)
fn check_entry_path(path: &Path) -> Result<(), String> {
    let ok = path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !ok || path.as_os_str().is_empty() {
        return Err(format!("entry {:?} would land outside the bundle", path.display().to_string()));
    }
    Ok(())
}

/// Unpacks a gzip-compressed or plain tar archive into `dest` (created here).
fn unpack(archive: &Path, dest: &Path) -> Result<(), String> {
    let mut file = fs::File::open(archive).map_err(|e| e.to_string())?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|e| e.to_string())?;
    file.rewind().map_err(|e| e.to_string())?;
    let reader: Box<dyn Read> = match &magic[..n] {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(BufReader::new(file))),
        [b'P', b'K', 3, 4] => return Err("zip archives are not supported yet; use .tar.gz".into()),
        _ => Box::new(BufReader::new(file)),
    };
    fs::create_dir(dest).map_err(|e| format!("create {}: {e}", dest.display()))?;
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(false);
    tar.set_preserve_ownerships(false);
    tar.set_unpack_xattrs(false);
    let mut count = 0usize;
    for entry in tar.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| format!("corrupt archive: {e}"))?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        check_entry_path(&path)?;
        if kind.is_hard_link() {
            let target = entry.link_name().map_err(|e| e.to_string())?.ok_or("hard link without a target")?;
            check_entry_path(&target)?;
        }
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink() || kind.is_hard_link() || kind.is_contiguous()) {
            return Err(format!("entry {} is a {kind:?}: only files, directories and links may be in a bundle", path.display()));
        }
        // unpack_in also refuses to write through a symlink the archive made earlier.
        let unpacked = entry.unpack_in(dest).map_err(|e| format!("entry {}: {e}", path.display()))?;
        if !unpacked {
            return Err(format!("entry {} would land outside the bundle", path.display()));
        }
        count += 1;
    }
    if count == 0 {
        return Err("the archive is empty".into());
    }
    readable_for_sandboxes(dest).map_err(|e| format!("set permissions: {e}"))
}

/// Directories 0755; files 0755 if anyone could execute them, else 0644;
/// symlinks as they are.
fn readable_for_sandboxes(path: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        for entry in fs::read_dir(path)? {
            readable_for_sandboxes(&entry?.path())?;
        }
    } else if meta.is_file() {
        let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
