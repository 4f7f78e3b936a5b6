//! `fs/read_text_file` and `fs/write_text_file`: text files an agent reads and
//! writes through its client, confined to its session's directories.
//!
//! A path is accepted in two steps, because the agent runs in the same
//! sandbox and can change the tree while a request is served:
//! - [`resolve`], in userspace: the path must be absolute; its longest
//!   existing prefix is canonicalized (symlinks and `..` resolved as the kernel
//!   resolves them) and must lie under one of the session's [`Roots`]. What
//!   does not exist yet may only be plain names (a file to create, and for a
//!   write its missing parent directories).
//! - the open, with `openat2(2)` from the root's descriptor and
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`: the canonical path holds no
//!   symlink, so one swapped in meanwhile fails the open (`ELOOP`) instead of
//!   leading out. Missing directories are made one component at a time the
//!   same way.
//!
//! Only regular files are read or written: a FIFO would block the request
//! forever, a device is not text.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, mkdirat};

/// Largest text one `fs/read_text_file` answer carries. Larger selections are
/// refused with a message asking for fewer lines, rather than cut silently:
/// an agent that edits what it read must have read all of it.
pub const MAX_READ_BYTES: usize = 8 << 20;

/// Mode of files and directories a write creates (before the umask), as an
/// editor would create them.
const NEW_FILE_MODE: u32 = 0o644;
const NEW_DIR_MODE: u32 = 0o755;

/// The directories a session's file methods may touch: its working directory
/// first, then its additional directories (`session.additional_directories`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roots {
    dirs: Vec<PathBuf>,
}

impl Roots {
    pub fn new(cwd: impl Into<PathBuf>, additional: impl IntoIterator<Item = PathBuf>) -> Self {
        let mut dirs = vec![cwd.into()];
        dirs.extend(additional);
        Self { dirs }
    }

    /// The session's working directory, where terminals start by default.
    pub fn cwd(&self) -> &Path {
        &self.dirs[0]
    }

    fn describe(&self) -> String {
        self.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("path {} is not absolute: ACP file paths must be absolute", .0.display())]
    NotAbsolute(PathBuf),
    #[error("{} is outside this session's directories ({roots}): agentd serves files only under them", path.display())]
    Outside { path: PathBuf, roots: String },
    #[error("{} goes through a symlink that is dangling or changed during the request: not followed", .0.display())]
    Symlink(PathBuf),
    #[error("{} has `..` after a directory that does not exist", .0.display())]
    ParentOfMissing(PathBuf),
    #[error("{} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("{} is not UTF-8 text", .0.display())]
    NotText(PathBuf),
    #[error("the requested text of {} is over {MAX_READ_BYTES} bytes: ask for fewer lines (line, limit)", .0.display())]
    TooLarge(PathBuf),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FsError {
    /// Whether the agent's request is at fault (as opposed to the file system).
    pub fn is_invalid_params(&self) -> bool {
        matches!(
            self,
            Self::NotAbsolute(_)
                | Self::Outside { .. }
                | Self::Symlink(_)
                | Self::ParentOfMissing(_)
                | Self::NotAFile(_)
                | Self::NotText(_)
                | Self::TooLarge(_)
        )
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound(_))
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FsError + 'a {
    move |source| FsError::Io { op, path: path.to_owned(), source }
}

/// Where a request's path lands once resolved.
#[derive(Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The canonical root the path lies under.
    pub root: PathBuf,
    /// The canonical longest existing prefix, relative to `root` (empty for
    /// the root itself).
    pub existing: PathBuf,
    /// Plain names below `existing` that do not exist yet.
    pub missing: Vec<OsString>,
}

/// Checks `path` against `roots` (see the module doc). Reads the file system
/// (canonicalization) but changes nothing.
pub fn resolve(roots: &Roots, path: &Path) -> Result<Resolved, FsError> {
    if !path.is_absolute() {
        return Err(FsError::NotAbsolute(path.to_owned()));
    }
    let components: Vec<Component<'_>> = path.components().collect();
    for split in (1..=components.len()).rev() {
        let prefix: PathBuf = components[..split].iter().collect();
        let canonical = match std::fs::canonicalize(&prefix) {
            Ok(canonical) => canonical,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(FsError::Io { op: "resolving", path: path.to_owned(), source: e }),
        };
        let root = containing_root(roots, &canonical).ok_or_else(|| FsError::Outside {
            path: path.to_owned(),
            roots: roots.describe(),
        })?;
        let missing = components[split..]
            .iter()
            .map(|c| match c {
                Component::Normal(name) => Ok(name.to_os_string()),
                _ => Err(FsError::ParentOfMissing(path.to_owned())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let existing = canonical.strip_prefix(&root).expect("root contains it").to_owned();
        return Ok(Resolved { root, existing, missing });
    }
    // Only reached if even `/` cannot be canonicalized.
    Err(FsError::NotFound(path.to_owned()))
}

/// The first root (canonicalized now: a root may itself be a symlink) that
/// `canonical` lies under.
fn containing_root(roots: &Roots, canonical: &Path) -> Option<PathBuf> {
    roots
        .dirs
        .iter()
        .filter_map(|dir| std::fs::canonicalize(dir).ok())
        .find(|root| canonical.starts_with(root))
}

/// `openat2` flags that stay under the directory and follow no symlink.
fn beneath(flags: OFlag, mode: u32) -> OpenHow {
    // openat2 refuses O_PATH with any flag O_PATH would ignore.
    let extra = if flags.contains(OFlag::O_PATH) { OFlag::O_CLOEXEC } else { OFlag::O_CLOEXEC | OFlag::O_NOCTTY };
    OpenHow::new()
        .flags(flags | extra)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

fn relative_or_dot(path: &Path) -> &Path {
    if path.as_os_str().is_empty() { Path::new(".") } else { path }
}

fn open_error<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(Errno) -> FsError + 'a {
    move |errno| match errno {
        Errno::ELOOP | Errno::EXDEV => FsError::Symlink(path.to_owned()),
        Errno::ENOENT => FsError::NotFound(path.to_owned()),
        // A directory; a FIFO with no reader (ENXIO on a non-blocking open).
        Errno::EISDIR | Errno::ENXIO => FsError::NotAFile(path.to_owned()),
        e => FsError::Io { op, path: path.to_owned(), source: e.into() },
    }
}

fn open_root(resolved: &Resolved, path: &Path) -> Result<OwnedFd, FsError> {
    nix::fcntl::open(&resolved.root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| FsError::Io { op: "opening the session directory for", path: path.to_owned(), source: e.into() })
}

fn ensure_regular(file: &File, path: &Path) -> Result<(), FsError> {
    let meta = file.metadata().map_err(io_error("inspecting", path))?;
    if meta.is_file() { Ok(()) } else { Err(FsError::NotAFile(path.to_owned())) }
}

/// `fs/read_text_file`: the whole file, or `limit` lines from the 1-based
/// `line` on. Line endings are kept as they are in the file. A `line` of 0 is
/// read as 1 (the first line), as editors' clients do; a `line` past the end
/// gives empty text.
pub fn read_text_file(roots: &Roots, path: &Path, line: Option<u32>, limit: Option<u32>) -> Result<String, FsError> {
    let resolved = resolve(roots, path)?;
    if !resolved.missing.is_empty() {
        return Err(FsError::NotFound(path.to_owned()));
    }
    let root = open_root(&resolved, path)?;
    let how = beneath(OFlag::O_RDONLY | OFlag::O_NONBLOCK, 0);
    let fd = openat2(&root, relative_or_dot(&resolved.existing), how).map_err(open_error(path, "opening"))?;
    let file = File::from(fd);
    ensure_regular(&file, path)?;
    let selected = match select_lines(BufReader::new(file), line, limit, MAX_READ_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Err(FsError::TooLarge(path.to_owned())),
        Err(e) => return Err(FsError::Io { op: "reading", path: path.to_owned(), source: e }),
    };
    String::from_utf8(selected).map_err(|_| FsError::NotText(path.to_owned()))
}

/// The bytes of `limit` lines (all if `None`) from the 1-based `line` on, or
/// `None` if they exceed `max_bytes`. Never holds more than `max_bytes` (plus
/// one read buffer) however long the lines are, skipped ones included.
pub fn select_lines(mut input: impl BufRead, line: Option<u32>, limit: Option<u32>, max_bytes: usize) -> io::Result<Option<Vec<u8>>> {
    let mut out = Vec::new();
    for _ in 1..line.unwrap_or(1) {
        if input.skip_until(b'\n')? == 0 {
            return Ok(Some(out));
        }
    }
    let mut taken: u32 = 0;
    while limit.is_none_or(|limit| taken < limit) {
        // One byte over the budget tells "too large" from "exactly full".
        let budget = (max_bytes - out.len()) as u64 + 1;
        let n = (&mut input).take(budget).read_until(b'\n', &mut out)?;
        if out.len() > max_bytes {
            return Ok(None);
        }
        if n == 0 {
            break;
        }
        taken += 1;
    }
    Ok(Some(out))
}

/// `fs/write_text_file`: replaces the file's content, creating the file (and
/// missing parent directories) if needed.
pub fn write_text_file(roots: &Roots, path: &Path, content: &str) -> Result<(), FsError> {
    let resolved = resolve(roots, path)?;
    let root = open_root(&resolved, path)?;
    let existing = relative_or_dot(&resolved.existing);
    let file_flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NONBLOCK;
    let fd = match resolved.missing.split_last() {
        None => openat2(&root, existing, beneath(file_flags, NEW_FILE_MODE)),
        Some((name, dirs)) => {
            let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
            let mut dir = openat2(&root, existing, beneath(dir_flags, 0)).map_err(open_error(path, "opening"))?;
            for component in dirs {
                match mkdirat(&dir, component.as_os_str(), Mode::from_bits_truncate(NEW_DIR_MODE)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(FsError::Io { op: "creating a directory for", path: path.to_owned(), source: e.into() }),
                }
                dir = openat2(&dir, component.as_os_str(), beneath(dir_flags, 0)).map_err(open_error(path, "opening"))?;
            }
            openat2(&dir, name.as_os_str(), beneath(file_flags, NEW_FILE_MODE))
        }
    }
    .map_err(open_error(path, "opening"))?;
    let mut file = File::from(fd);
    // Checked before truncating, so that nothing but a regular file is touched.
    ensure_regular(&file, path)?;
    file.set_len(0).map_err(io_error("truncating", path))?;
    file.write_all(content.as_bytes()).map_err(io_error("writing", path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A workspace with a file, a subdirectory, and an outside directory with
    /// a secret next to it.
    struct Tree {
        _tmp: tempfile::TempDir,
        ws: PathBuf,
        outside: PathBuf,
        roots: Roots,
    }

    fn tree() -> Tree {
        let tmp = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(tmp.path()).unwrap();
        let ws = base.join("ws");
        let outside = base.join("outside");
        std::fs::create_dir_all(ws.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(ws.join("a.txt"), "one\ntwo\nthree\n").unwrap();
        std::fs::write(outside.join("secret"), "secret\n").unwrap();
        let roots = Roots::new(&ws, []);
        Tree { _tmp: tmp, ws, outside, roots }
    }

    #[test]
    fn paths_inside_resolve_to_their_canonical_place() {
        let t = tree();
        let r = resolve(&t.roots, &t.ws.join("sub/../a.txt")).unwrap();
        assert_eq!(r, Resolved { root: t.ws.clone(), existing: "a.txt".into(), missing: vec![] });
        let r = resolve(&t.roots, &t.ws.join("new/dir/f.txt")).unwrap();
        assert_eq!(r.existing, PathBuf::new());
        assert_eq!(r.missing, ["new", "dir", "f.txt"]);
        // A symlink that stays inside is followed.
        symlink(t.ws.join("a.txt"), t.ws.join("link")).unwrap();
        assert_eq!(resolve(&t.roots, &t.ws.join("link")).unwrap().existing, PathBuf::from("a.txt"));
    }

    #[test]
    fn relative_paths_are_refused() {
        let t = tree();
        for p in ["a.txt", "../../x", "./a.txt"] {
            assert!(matches!(resolve(&t.roots, Path::new(p)), Err(FsError::NotAbsolute(_))), "{p}");
        }
    }

    #[test]
    fn escapes_are_refused() {
        let t = tree();
        symlink(t.outside.join("secret"), t.ws.join("to_secret")).unwrap();
        symlink(&t.outside, t.ws.join("to_outside")).unwrap();
        symlink("../outside", t.ws.join("relative_out")).unwrap();
        let escapes = [
            PathBuf::from("/etc/passwd"),
            t.ws.join("../outside/secret"),
            t.ws.join("sub/../../outside/secret"),
            t.ws.join("../../../../x"),
            t.ws.join("to_secret"),
            t.ws.join("to_outside/secret"),
            t.ws.join("to_outside/new.txt"),
            t.ws.join("relative_out/secret"),
            t.ws.parent().unwrap().to_owned(),
        ];
        for p in escapes {
            let err = resolve(&t.roots, &p).unwrap_err();
            assert!(matches!(err, FsError::Outside { .. }), "{}: {err}", p.display());
            assert!(read_text_file(&t.roots, &p, None, None).unwrap_err().is_invalid_params(), "{}", p.display());
            assert!(write_text_file(&t.roots, &p, "x").unwrap_err().is_invalid_params(), "{}", p.display());
        }
        assert_eq!(std::fs::read_to_string(t.outside.join("secret")).unwrap(), "secret\n");
        assert!(!t.outside.join("new.txt").exists());
    }

    #[test]
    fn dot_dot_below_a_missing_directory_is_refused() {
        let t = tree();
        let err = resolve(&t.roots, &t.ws.join("nodir/../../outside/secret")).unwrap_err();
        assert!(matches!(err, FsError::ParentOfMissing(_)), "{err}");
    }

    #[test]
    fn a_dangling_symlink_is_not_followed() {
        let t = tree();
        symlink(t.outside.join("not_yet"), t.ws.join("dangling")).unwrap();
        let err = write_text_file(&t.roots, &t.ws.join("dangling"), "x").unwrap_err();
        assert!(matches!(err, FsError::Symlink(_)), "{err}");
        assert!(!t.outside.join("not_yet").exists());
        // Dangling even when the target would be inside.
        symlink(t.ws.join("later"), t.ws.join("dangling_in")).unwrap();
        let err = write_text_file(&t.roots, &t.ws.join("dangling_in"), "x").unwrap_err();
        assert!(matches!(err, FsError::Symlink(_)), "{err}");
    }

    #[test]
    fn a_root_that_is_a_symlink_still_contains_its_files() {
        let t = tree();
        let alias = t.outside.join("alias");
        symlink(&t.ws, &alias).unwrap();
        let roots = Roots::new(&alias, []);
        assert_eq!(read_text_file(&roots, &alias.join("a.txt"), None, Some(1)).unwrap(), "one\n");
        assert_eq!(read_text_file(&roots, &t.ws.join("a.txt"), None, Some(1)).unwrap(), "one\n");
    }

    #[test]
    fn additional_roots_are_served_too() {
        let t = tree();
        let roots = Roots::new(&t.ws, [t.outside.clone()]);
        assert_eq!(read_text_file(&roots, &t.outside.join("secret"), None, None).unwrap(), "secret\n");
    }

    #[test]
    fn reads_whole_files_and_line_ranges() {
        let t = tree();
        let p = t.ws.join("a.txt");
        assert_eq!(read_text_file(&t.roots, &p, None, None).unwrap(), "one\ntwo\nthree\n");
        assert_eq!(read_text_file(&t.roots, &p, Some(2), None).unwrap(), "two\nthree\n");
        assert_eq!(read_text_file(&t.roots, &p, Some(2), Some(1)).unwrap(), "two\n");
        assert_eq!(read_text_file(&t.roots, &p, Some(0), Some(1)).unwrap(), "one\n");
        assert_eq!(read_text_file(&t.roots, &p, Some(1), Some(0)).unwrap(), "");
        assert_eq!(read_text_file(&t.roots, &p, Some(4), None).unwrap(), "");
        assert_eq!(read_text_file(&t.roots, &p, Some(99), Some(5)).unwrap(), "");
    }

    #[test]
    fn line_selection_keeps_endings_and_bounds_memory() {
        let sel = |text: &str, line, limit, max| select_lines(text.as_bytes(), line, limit, max).unwrap().map(|b| String::from_utf8(b).unwrap());
        assert_eq!(sel("a\r\nb\r\nc", Some(2), None, 100).as_deref(), Some("b\r\nc"));
        assert_eq!(sel("a\nb", Some(2), Some(5), 100).as_deref(), Some("b"));
        assert_eq!(sel("a\nb\n", None, None, 4).as_deref(), Some("a\nb\n"), "exactly at the cap");
        assert_eq!(sel("a\nb\nc", None, None, 4), None, "over the cap");
        assert_eq!(sel("abcdef", None, None, 4), None, "one long line over the cap");
        // Skipped lines do not count, however long.
        let long = format!("{}\nshort\n", "x".repeat(1000));
        assert_eq!(sel(&long, Some(2), None, 10).as_deref(), Some("short\n"));
    }

    #[test]
    fn non_text_and_non_files_are_refused() {
        let t = tree();
        std::fs::write(t.ws.join("bin"), [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(read_text_file(&t.roots, &t.ws.join("bin"), None, None), Err(FsError::NotText(_))));
        assert!(matches!(read_text_file(&t.roots, &t.ws.join("sub"), None, None), Err(FsError::NotAFile(_))));
        assert!(matches!(write_text_file(&t.roots, &t.ws.join("sub"), "x"), Err(FsError::NotAFile(_))));
        assert!(matches!(read_text_file(&t.roots, &t.ws, None, None), Err(FsError::NotAFile(_))));
        // A FIFO would block a read forever and a write until someone reads.
        nix::unistd::mkfifo(&t.ws.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(read_text_file(&t.roots, &t.ws.join("fifo"), None, None), Err(FsError::NotAFile(_))));
        assert!(matches!(write_text_file(&t.roots, &t.ws.join("fifo"), "x"), Err(FsError::NotAFile(_))));
        let missing = read_text_file(&t.roots, &t.ws.join("nope/x"), None, None).unwrap_err();
        assert!(missing.is_not_found(), "{missing}");
    }

    #[test]
    fn writes_replace_content_and_create_parents() {
        let t = tree();
        write_text_file(&t.roots, &t.ws.join("a.txt"), "short").unwrap();
        assert_eq!(std::fs::read_to_string(t.ws.join("a.txt")).unwrap(), "short");
        write_text_file(&t.roots, &t.ws.join("new/deeper/f.txt"), "héllo\n").unwrap();
        assert_eq!(std::fs::read_to_string(t.ws.join("new/deeper/f.txt")).unwrap(), "héllo\n");
        // Through a symlink that stays inside: the target is written.
        symlink(t.ws.join("a.txt"), t.ws.join("link")).unwrap();
        write_text_file(&t.roots, &t.ws.join("link"), "via link").unwrap();
        assert_eq!(std::fs::read_to_string(t.ws.join("a.txt")).unwrap(), "via link");
        assert!(std::fs::symlink_metadata(t.ws.join("link")).unwrap().file_type().is_symlink());
    }
}
