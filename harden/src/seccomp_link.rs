//! Compiling a policy in seccompiler's JSON format and linking its filters
//! into one program behind the architecture guard (see [`crate::seccomp`]'s
//! docs). Depends on nothing but seccompiler and std, because `build.rs`
//! includes this file too: the default policy is compiled to BPF at build
//! time with exactly this code, and at run time only for custom policies.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

#[path = "seccomp_dispatch.rs"]
mod dispatch;

/// The kernel's limit on a classic BPF program (`BPF_MAXINSNS`).
pub const MAX_INSNS: usize = 4096;

// Classic BPF opcodes (linux/bpf_common.h), spelled out because seccompiler
// keeps its own private.
pub const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
pub const BPF_JMP_JEQ_K: u16 = 0x15; // BPF_JMP (5) | BPF_JEQ (0x10) | BPF_K (0)
pub const BPF_JMP_JGE_K: u16 = 0x35; // BPF_JMP (5) | BPF_JGE (0x30) | BPF_K (0)
pub const BPF_JMP_JA: u16 = 0x05; // BPF_JMP (5) | BPF_JA (0)
pub const BPF_RET_K: u16 = 0x06; // BPF_RET (6) | BPF_K (0)

// Offsets into `struct seccomp_data`.
pub const SECCOMP_DATA_NR: u32 = 0;
pub const SECCOMP_DATA_ARCH: u32 = 4;

// `EM_* | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE` (linux/audit.h).
pub const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
pub const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// `__X32_SYSCALL_BIT` (asm/unistd.h on x86_64).
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// linux/seccomp.h; spelled out since build.rs has no libc (a test checks
// them against libc's).
pub const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
pub const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;

/// Why a policy did not become a program.
#[derive(Debug)]
pub enum LinkError {
    /// Bad JSON, an unknown syscall name for the architecture, or a filter
    /// seccompiler refuses.
    Compile(seccompiler::Error),
    NoFilter,
    TooLarge(usize),
}

/// Compiles `json` for `arch`, links its filters, in name order, behind the
/// guard, and turns the result into a search on the syscall number.
pub fn compile(json: &str, arch: TargetArch) -> Result<Vec<sock_filter>, LinkError> {
    let filters = seccompiler::compile_from_json(json.as_bytes(), arch).map_err(LinkError::Compile)?;
    // A HashMap comes back; name order makes the linked program reproducible.
    let ordered: BTreeMap<String, BpfProgram> = filters.into_iter().collect();
    Ok(search_by_number(arch, link(arch, ordered.into_values().collect())?))
}

/// `linked` (from [`link`]) with everything after the guard rewritten by
/// [`dispatch::dispatch`] into a search on the syscall number, which answers
/// alike for every syscall and costs the kernel less to install; `linked`
/// itself where the rewrite does not apply.
pub fn search_by_number(arch: TargetArch, linked: Vec<sock_filter>) -> Vec<sock_filter> {
    let guard = arch_guard(arch);
    let Some(audit_arch) = audit_arch(arch) else { return linked };
    match dispatch::dispatch(&linked[guard.len()..], audit_arch) {
        Some(body) if guard.len() + body.len() <= MAX_INSNS => guard.into_iter().chain(body).collect(),
        _ => linked,
    }
}

/// The audit architecture the guard lets through, for architectures that
/// have a guard.
fn audit_arch(arch: TargetArch) -> Option<u32> {
    match arch {
        TargetArch::x86_64 => Some(AUDIT_ARCH_X86_64),
        TargetArch::aarch64 => Some(AUDIT_ARCH_AARCH64),
        TargetArch::riscv64 => None,
    }
}

/// Joins separately compiled filters behind the architecture guard.
pub fn link(arch: TargetArch, filters: Vec<BpfProgram>) -> Result<Vec<sock_filter>, LinkError> {
    if filters.is_empty() {
        return Err(LinkError::NoFilter);
    }
    let mut insns = arch_guard(arch);
    let last = filters.len() - 1;
    for (i, mut filter) in filters.into_iter().enumerate() {
        if i < last {
            let len = filter.len();
            for (at, insn) in filter.iter_mut().enumerate() {
                if insn.code == BPF_RET_K && insn.k == SECCOMP_RET_ALLOW {
                    // `JA k` goes to at + 1 + k: the first instruction after
                    // this filter. Replacing one instruction with one keeps
                    // every other jump offset in the filter valid.
                    *insn = stmt(BPF_JMP_JA, (len - at - 1) as u32);
                }
            }
        }
        insns.extend(filter);
    }
    if insns.len() > MAX_INSNS {
        return Err(LinkError::TooLarge(insns.len()));
    }
    Ok(insns)
}

pub fn arch_guard(arch: TargetArch) -> BpfProgram {
    // seccompiler's own check still kills foreign syscalls on an
    // architecture without a guard; only the x32 step is x86_64's business.
    let Some(audit_arch) = audit_arch(arch) else { return Vec::new() };
    let mut guard = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, audit_arch, 1, 0),
        stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
    ];
    if arch == TargetArch::x86_64 {
        guard.extend([
            stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
            // Below the x32 bit: an ordinary x86_64 number, on to the filters.
            jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 2),
            // -1 is no syscall at all (ENOSYS), not an x32 one.
            jump(BPF_JMP_JEQ_K, u32::MAX, 1, 0),
            stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        ]);
    }
    guard
}

pub const fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

pub const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}
