//! The small `agentd` binary the node forks every sandbox's PID 1 from:
//! present, executable, and statically linked (a dynamic one works, but
//! every sandbox then pays the loader and shared-library relocations).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::Row;

const NAME: &str = "sandbox-binary";

pub fn check(path: &Path) -> Row {
    let shown = path.display();
    let build = "install agentd beside agentd-daemon (`scripts/build-release` builds both), or point --sandbox-bin at it";
    let meta = match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => meta,
        Ok(_) => return Row::fail(NAME, format!("{shown} is not a file"), build),
        Err(e) => return Row::fail(NAME, format!("{shown}: {e}"), build),
    };
    if meta.permissions().mode() & 0o111 == 0 {
        return Row::fail(NAME, format!("{shown} is not executable"), format!("chmod 755 {shown}"));
    }
    match linking(path) {
        Ok(Linking::Static) => Row::ok(NAME, format!("{shown}: executable, statically linked")),
        Ok(Linking::Dynamic) => Row::warn(
            NAME,
            format!("{shown}: executable, dynamically linked (every sandbox pays the loader)"),
            "build it static: `scripts/build-release` (a debug build is dynamic)",
        ),
        Err(why) => Row::fail(NAME, format!("{shown}: {why}"), build),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Linking {
    Static,
    Dynamic,
}

const PT_INTERP: u32 = 3;

/// Whether an ELF executable asks for a program interpreter (`PT_INTERP`),
/// which is what makes it dynamically linked: a static-pie binary has a
/// dynamic section of its own, but no interpreter.
pub fn linking(path: &Path) -> Result<Linking, String> {
    let mut head = Vec::new();
    // The program headers sit right after the ELF header in every binary
    // a linker writes; 64 KiB holds them many times over.
    std::fs::File::open(path).and_then(|f| f.take(64 * 1024).read_to_end(&mut head)).map_err(|e| e.to_string())?;
    elf_linking(&head)
}

fn elf_linking(bytes: &[u8]) -> Result<Linking, String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF executable".into());
    }
    if bytes[4] != 2 {
        return Err("not a 64-bit ELF file".into());
    }
    let little = match bytes[5] {
        1 => true,
        2 => false,
        _ => return Err("unknown ELF byte order".into()),
    };
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| if little { u16::from_le_bytes([b[0], b[1]]) } else { u16::from_be_bytes([b[0], b[1]]) });
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| {
        let b = [b[0], b[1], b[2], b[3]];
        if little { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) }
    });
    let u64_at = |at: usize| bytes.get(at..at + 8).map(|b| {
        let b: [u8; 8] = b.try_into().unwrap_or_default();
        if little { u64::from_le_bytes(b) } else { u64::from_be_bytes(b) }
    });
    let truncated = || "ELF program headers past the first 64 KiB".to_string();
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(truncated)?).map_err(|_| truncated())?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(truncated)?);
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize).ok_or_else(truncated)? == PT_INTERP {
            return Ok(Linking::Dynamic);
        }
    }
    Ok(Linking::Static)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    /// A minimal 64-bit little-endian ELF header with program headers of
    /// the given types.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend(ph);
        }
        b
    }

    #[test]
    fn tells_static_from_dynamic() {
        assert_eq!(elf_linking(&elf(&[6, 3, 1])), Ok(Linking::Dynamic));
        assert_eq!(elf_linking(&elf(&[1, 2, 1])), Ok(Linking::Static), "a dynamic section alone is static-pie");
        assert!(elf_linking(b"#!/bin/sh\n").is_err());
        let mut cut = elf(&[1, 3]);
        cut.truncate(64 + 56);
        assert!(elf_linking(&cut).is_err());
    }

    #[test]
    fn judges_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd");
        assert_eq!(check(&path).status, Status::Fail, "missing");
        std::fs::write(&path, elf(&[1])).unwrap();
        assert_eq!(check(&path).status, Status::Fail, "not executable");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check(&path).status, Status::Ok);
        std::fs::write(&path, elf(&[3])).unwrap();
        assert_eq!(check(&path).status, Status::Warn);
        // This test binary: a debug build, dynamically linked.
        assert_eq!(linking(&std::env::current_exe().unwrap()), Ok(Linking::Dynamic));
    }
}
