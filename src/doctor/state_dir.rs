//! The state directory: the store, sandboxes' records, event logs and the
//! node's socket live there, so only root may enter it. Looked at, never
//! created or changed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::unistd::{AccessFlags, access};

use super::Row;

const NAME: &str = "state-dir";

pub fn check(dir: &Path) -> Row {
    let shown = dir.display();
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return absent(dir),
        Err(e) => return Row::fail(NAME, format!("{shown}: {e}"), "choose another --state-dir"),
    };
    if !meta.is_dir() {
        return Row::fail(NAME, format!("{shown} is not a directory"), "choose another --state-dir");
    }
    if let Err(e) = access(dir, AccessFlags::W_OK | AccessFlags::X_OK) {
        return Row::fail(NAME, format!("{shown} is not writable: {e}"), format!("run agentd as root, or chown root:root {shown}"));
    }
    let mode = meta.mode() & 0o7777;
    let mut wrong = Vec::new();
    let mut remedies = Vec::new();
    if meta.uid() != 0 {
        wrong.push(format!("owner uid {}", meta.uid()));
        remedies.push(format!("chown root:root {shown}"));
    }
    if mode != 0o700 {
        wrong.push(format!("mode {mode:04o}: others may look at sandboxes' records and logs"));
        remedies.push(format!("chmod 700 {shown}"));
    }
    if wrong.is_empty() {
        Row::ok(NAME, format!("{shown}: owner root, mode 0700"))
    } else {
        Row::warn(NAME, format!("{shown}: {}", wrong.join(", ")), remedies.join("; "))
    }
}

/// A missing directory is fine if agentd can create it: the nearest
/// existing ancestor is a directory it may write.
fn absent(dir: &Path) -> Row {
    let shown = dir.display();
    let Some(existing) = dir.ancestors().skip(1).find(|a| a.exists()) else {
        return Row::fail(NAME, format!("{shown} does not exist, nor does any parent"), "choose another --state-dir");
    };
    if !existing.is_dir() {
        return Row::fail(NAME, format!("{shown} cannot be created: {} is not a directory", existing.display()), "choose another --state-dir");
    }
    match access(existing, AccessFlags::W_OK | AccessFlags::X_OK) {
        Ok(()) => Row::ok(NAME, format!("{shown} does not exist yet; agentd up creates it (mode 0700)")),
        Err(e) => Row::fail(NAME, format!("{shown} cannot be created in {}: {e}", existing.display()), "run agentd as root, or choose another --state-dir"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::doctor::Status;

    #[test]
    fn judges_mode_and_absence() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let row = check(&dir);
        assert_eq!(row.status, Status::Ok, "creatable: {row:?}");
        assert!(!dir.exists(), "looked at, not created");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let row = check(&dir);
        assert_eq!(row.status, Status::Warn);
        assert!(row.found.contains("mode 0755"), "{}", row.found);
        assert!(row.remedy.unwrap().contains(&format!("chmod 700 {}", dir.display())));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let want = if nix::unistd::geteuid().is_root() { Status::Ok } else { Status::Warn };
        assert_eq!(check(&dir).status, want, "root-owned 0700 is what agentd makes");
        std::fs::write(tmp.path().join("file"), "").unwrap();
        assert_eq!(check(&tmp.path().join("file")).status, Status::Fail);
        assert_eq!(check(&tmp.path().join("file/sub")).status, Status::Fail);
    }
}
