//! The new root filesystem, prepared by `sandbox-init` as host root in its own
//! private mount namespace, before the sandbox's user namespace exists. Doing the
//! bind mounts here means host paths are resolved with host privileges (a 0700
//! state directory is fine), and the sandbox later receives the finished tree as
//! a copy whose mounts it cannot unlock.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use crate::init::InitError;
use crate::spec::SandboxSpec;

/// The host's device nodes the sandbox's minimal `/dev` gets a node of.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

const DEV_LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

fn inside(root: &Path, target: &Path) -> PathBuf {
    root.join(target.strip_prefix("/").unwrap_or(target))
}

fn err(stage: &'static str, path: &Path, e: impl std::fmt::Display) -> InitError {
    InitError::new(stage, format!("{}: {e}", path.display()))
}

fn mkdir_p(path: &Path) -> Result<(), InitError> {
    fs::create_dir_all(path).map_err(|e| err("mkdir", path, e))
}

fn touch(path: &Path) -> Result<(), InitError> {
    if let Some(parent) = path.parent() {
        mkdir_p(parent)?;
    }
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| err("create mount point", path, e))
}

fn mount_tmpfs(target: &Path, flags: MsFlags, data: &str) -> Result<(), InitError> {
    mount(Some("tmpfs"), target, Some("tmpfs"), flags, Some(data)).map_err(|e| err("mount tmpfs", target, e))
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), InitError> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
        .map_err(|e| err("bind mount", source, e))?;
    if read_only {
        // A bind mount ignores MS_RDONLY on creation: it takes a remount.
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| err("remount read-only", target, e))?;
    }
    Ok(())
}

/// Binds `source` at `target`, making a directory or a file to mount on
/// unless there is one (an existing one may sit in a read-only bind, such
/// as /etc/resolv.conf).
fn bind_any(source: &Path, target: &Path, read_only: bool) -> Result<(), InitError> {
    let meta = fs::metadata(source).map_err(|e| err("stat mount source", source, e))?;
    if fs::symlink_metadata(target).is_err() {
        if meta.is_dir() {
            mkdir_p(target)?;
        } else {
            touch(target)?;
        }
    }
    bind(source, target, read_only)
}

/// Symbolic links followed on the way to a mount target, at most: as the
/// kernel's own limit.
const MAX_LINKS: usize = 40;

/// The host path under `root` of `path` as the sandbox will see it: its
/// symbolic links followed within the new root (an absolute one starts
/// again at `root`, never at the host's root, and `..` stops at `root`).
/// So a bind on /etc/resolv.conf, a link to
/// ../run/systemd/resolve/stub-resolv.conf on many hosts, lands where the
/// sandbox will read it.
fn resolve_in_root(root: &Path, path: &Path) -> Result<PathBuf, InitError> {
    use std::path::Component;
    let mut pending: Vec<std::ffi::OsString> = path.components().rev().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some("..".into()),
        _ => None,
    }).collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = root.join(&resolved).join(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(err("resolve mount target", path, "too many symbolic links"));
                }
                let link = fs::read_link(&candidate).map_err(|e| err("readlink", &candidate, e))?;
                if link.is_absolute() {
                    resolved.clear();
                }
                pending.extend(link.components().rev().filter_map(|c| match c {
                    Component::Normal(n) => Some(n.to_owned()),
                    Component::ParentDir => Some("..".into()),
                    _ => None,
                }));
            }
            _ => resolved.push(&part),
        }
    }
    Ok(root.join(resolved))
}

pub(crate) fn prepare(spec: &SandboxSpec) -> Result<(), InitError> {
    let root = spec.rootfs_dir.as_path();
    let owner = spec.ids.host_base;
    match &spec.rootfs {
        Some(dir) => {
            // A given root filesystem: used whole, made read-only below. Its
            // mount points are created if missing, as runc does.
            bind(dir, root, false)?;
        }
        None => {
            mount_tmpfs(root, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=0755,size=1m,nr_inodes=4096")?;
            bind_system_dirs(spec, root)?;
        }
    }
    crate::init::injected(spec, "mount")?;

    prepare_dev(root, owner)?;

    let tmp = inside(root, Path::new("/tmp"));
    mkdir_p(&tmp)?;
    mount_tmpfs(&tmp, MsFlags::MS_NOSUID | MsFlags::MS_NODEV, &format!("mode=1777,uid={owner},gid={owner}"))?;
    mkdir_p(&inside(root, Path::new("/proc")))?;

    for m in &spec.mounts {
        bind_any(&m.source, &resolve_in_root(root, &m.target)?, m.read_only)?;
    }

    // The skeleton itself is read-only: agents write to the workspace and /tmp.
    let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount(None::<&str>, root, None::<&str>, flags, None::<&str>).map_err(|e| err("remount root read-only", root, e))
}

fn bind_system_dirs(spec: &SandboxSpec, root: &Path) -> Result<(), InitError> {
    for host in &spec.system_binds {
        let Ok(meta) = fs::symlink_metadata(host) else { continue };
        let target = inside(root, host);
        if meta.file_type().is_symlink() {
            let dest = fs::read_link(host).map_err(|e| err("readlink", host, e))?;
            if let Some(parent) = target.parent() {
                mkdir_p(parent)?;
            }
            symlink(&dest, &target).map_err(|e| err("symlink", &target, e))?;
        } else {
            bind_any(host, &target, true)?;
        }
    }

    Ok(())
}

fn prepare_dev(root: &Path, owner: u32) -> Result<(), InitError> {
    let dev = inside(root, Path::new("/dev"));
    mkdir_p(&dev)?;
    mount_tmpfs(&dev, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, "mode=0755,size=64k")?;
    // Made here, as host root, on a /dev the host's user namespace mounted
    // (so they work inside), rather than bound from the host: a node is one
    // syscall, a bind is a mount more to make, copy into the sandbox's
    // namespace and tear down twice. The sandbox's root cannot remove or
    // change them: they and /dev belong to an id outside its range.
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        let meta = fs::metadata(&host).ok().filter(|m| m.file_type().is_char_device());
        let Some(meta) = meta else {
            // /proc's masks are binds of /dev/null: without it they would
            // find no source and be skipped as absent.
            if *name == "null" {
                return Err(err("mknod", &host, "the host has no /dev/null character device"));
            }
            continue;
        };
        let target = dev.join(name);
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o666);
        nix::sys::stat::mknod(&target, nix::sys::stat::SFlag::S_IFCHR, mode, meta.rdev()).map_err(|e| err("mknod", &target, e))?;
        // mknod honours the umask; the nodes are for everyone.
        fs::set_permissions(&target, fs::Permissions::from_mode(0o666)).map_err(|e| err("chmod", &target, e))?;
    }
    for (name, dest) in DEV_LINKS {
        symlink(dest, dev.join(name)).map_err(|e| err("symlink", &dev.join(name), e))?;
    }
    mkdir_p(&dev.join("pts"))?;
    let shm = dev.join("shm");
    mkdir_p(&shm)?;
    fs::set_permissions(&shm, fs::Permissions::from_mode(0o1777)).map_err(|e| err("chmod", &shm, e))?;
    mount_tmpfs(
        &shm,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        &format!("mode=1777,size=64m,uid={owner},gid={owner}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_targets_follow_links_inside_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("run/resolve")).unwrap();
        symlink("../run/resolve/stub.conf", root.join("etc/resolv.conf")).unwrap();
        symlink("/run", root.join("etc/abs")).unwrap();
        symlink("../../../../..", root.join("etc/up")).unwrap();
        symlink("loop", root.join("etc/loop")).unwrap();
        assert_eq!(resolve_in_root(root, Path::new("/etc/resolv.conf")).unwrap(), root.join("run/resolve/stub.conf"));
        // An absolute link starts at the new root, not the host's.
        assert_eq!(resolve_in_root(root, Path::new("/etc/abs/x")).unwrap(), root.join("run/x"));
        assert_eq!(resolve_in_root(root, Path::new("/etc/up/etc/passwd")).unwrap(), root.join("etc/passwd"));
        assert_eq!(resolve_in_root(root, Path::new("/workspace")).unwrap(), root.join("workspace"));
        assert!(resolve_in_root(root, Path::new("/etc/loop")).is_err());
    }
}
