//! Rewriting a linked seccomp program into a binary search on the syscall
//! number, without changing what it answers for any syscall.
//!
//! seccompiler emits one linear chain per filter: a syscall is compared with
//! every listed number in turn, four instructions each. Installing a filter
//! costs the kernel time in proportion to its length (it checks and JIT-
//! compiles it) and to the depth it runs to (it runs the program once per
//! syscall number to find those it may skip at run time): ~0.21 ms for the
//! default x86_64 policy's 475 instructions on this project's test VM, paid
//! at every agent's and every terminal command's start. The rewritten program
//! is half as long (238) and reaches any syscall's rules after a handful of
//! comparisons; its install takes ~0.05 ms.
//!
//! How: the program's answer depends on the syscall number only through
//! comparisons with the constants of its jumps, so it is the same for every
//! number between two consecutive cut points (each constant `k` and `k + 1`).
//! For one number of each such interval the program is evaluated with the
//! number and the architecture known (the guard in front has checked it),
//! which folds every test of them away and leaves a residual program over the
//! syscall's arguments only: a bare return for most. The most common residual
//! (allow) becomes the default; the numbers with another one are found by a
//! search tree of `jge`, ending in short runs of `jeq`.
//!
//! Anything this does not understand (scratch memory, the X register, a
//! computation on the syscall number, a residual too large) leaves the
//! program as it was: `None`. `seccomp::tests` checks the result against the
//! original on every syscall number around every cut point, with many
//! argument values.

use seccompiler::sock_filter;

use super::{BPF_JMP_JA, BPF_JMP_JEQ_K, BPF_JMP_JGE_K, BPF_LD_W_ABS, BPF_RET_K, SECCOMP_DATA_ARCH, SECCOMP_DATA_NR, jump, stmt};

// Classic BPF instruction classes and fields (linux/bpf_common.h).
const BPF_CLASS_MASK: u16 = 0x07;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_OP_MASK: u16 = 0xf0;
const BPF_SRC_X: u16 = 0x08;
const BPF_JGT: u16 = 0x20;
const BPF_JGE: u16 = 0x30;
const BPF_JEQ: u16 = 0x10;
const BPF_JSET: u16 = 0x40;
const BPF_JA: u16 = 0x00;

/// Exceptions (numbers whose residual is not the default) tested by one run
/// of `jeq` at a leaf of the search tree.
const LEAF: usize = 4;

/// Bound on the residual instructions of the whole program, so that a
/// program whose arguments' tests branch into a large tree stays as it was.
const MAX_RESIDUAL: usize = 2048;

/// What the accumulator holds during evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// The syscall number (known for the interval being evaluated).
    Nr(u32),
    /// A constant: the architecture, or a folded computation on constants.
    Const(u32),
    /// Only known when the program runs: an argument, or something computed
    /// from one.
    Runtime,
    /// Not loaded by the body yet: what the guard in front left there,
    /// which the rewrite would not keep.
    Unset,
}

/// The program left for one syscall number once every test of the number
/// and the architecture is folded away.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Residual {
    Ret(u32),
    /// An instruction that sets the accumulator at run time, then the rest.
    Op(sock_filter, Box<Residual>),
    /// A jump on a run-time value: taken, not taken.
    Branch(sock_filter, Box<Residual>, Box<Residual>),
}

/// `body` (a linked program, the architecture guard excluded) rewritten as a
/// search on the syscall number, or `None` where it cannot be.
/// `audit_arch`: the architecture the guard in front lets through.
pub fn dispatch(body: &[sock_filter], audit_arch: u32) -> Option<Vec<sock_filter>> {
    let mut cuts: Vec<u64> = vec![0];
    for insn in body {
        if insn.code & BPF_CLASS_MASK == BPF_JMP && insn.code & BPF_OP_MASK != BPF_JA {
            cuts.push(u64::from(insn.k));
            cuts.push(u64::from(insn.k) + 1);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.retain(|&c| c <= u64::from(u32::MAX));

    // One residual per interval [cuts[i], cuts[i + 1]).
    let mut budget = MAX_RESIDUAL;
    let mut intervals: Vec<(u32, u64, Residual)> = Vec::new();
    for (i, &start) in cuts.iter().enumerate() {
        let end = cuts.get(i + 1).copied().unwrap_or(1 << 32);
        let residual = eval(body, 0, Value::Unset, start as u32, audit_arch, &mut budget)?;
        match intervals.last_mut() {
            Some(last) if last.2 == residual => last.1 = end,
            _ => intervals.push((start as u32, end, residual)),
        }
    }

    // The residual that covers the most numbers is the default; every other
    // interval is small (a syscall or a run of them) or the policy is not one
    // this rewrite is for.
    let default = {
        let mut best: Option<(&Residual, u64)> = None;
        for (_, _, r) in &intervals {
            let covered: u64 = intervals.iter().filter(|(_, _, o)| o == r).map(|(s, e, _)| e - u64::from(*s)).sum();
            if best.is_none_or(|(_, c)| covered > c) {
                best = Some((r, covered));
            }
        }
        best?.0.clone()
    };
    let mut exceptions: Vec<(u32, &Residual)> = Vec::new();
    for (start, end, residual) in &intervals {
        if *residual == default {
            continue;
        }
        if end - u64::from(*start) > 64 {
            return None;
        }
        exceptions.extend((u64::from(*start)..*end).map(|nr| (nr as u32, residual)));
    }

    let mut program = vec![stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR)];
    program.extend(search(&exceptions, &default)?);
    Some(program)
}

/// Evaluates `prog` from `pc` with the syscall number `nr` and the
/// architecture known, folding what they decide.
fn eval(prog: &[sock_filter], mut pc: usize, mut acc: Value, nr: u32, audit_arch: u32, budget: &mut usize) -> Option<Residual> {
    loop {
        let insn = prog.get(pc)?.clone();
        let class = insn.code & BPF_CLASS_MASK;
        match (class, insn.code) {
            (_, BPF_RET_K) => return Some(Residual::Ret(insn.k)),
            (_, BPF_LD_W_ABS) => {
                acc = match insn.k {
                    SECCOMP_DATA_NR => Value::Nr(nr),
                    SECCOMP_DATA_ARCH => Value::Const(audit_arch),
                    _ => {
                        *budget = budget.checked_sub(1)?;
                        let rest = eval(prog, pc + 1, Value::Runtime, nr, audit_arch, budget)?;
                        return Some(Residual::Op(insn, Box::new(rest)));
                    }
                };
                pc += 1;
            }
            (BPF_ALU, code) if code & BPF_SRC_X == 0 => match acc {
                Value::Const(a) => {
                    acc = Value::Const(alu(code & BPF_OP_MASK, a, insn.k)?);
                    pc += 1;
                }
                Value::Runtime => {
                    *budget = budget.checked_sub(1)?;
                    let rest = eval(prog, pc + 1, Value::Runtime, nr, audit_arch, budget)?;
                    return Some(Residual::Op(insn, Box::new(rest)));
                }
                // Arithmetic on the number would break the intervals.
                Value::Nr(_) | Value::Unset => return None,
            },
            (BPF_JMP, code) if code & BPF_SRC_X == 0 => {
                let op = code & BPF_OP_MASK;
                if op == BPF_JA {
                    pc = pc.checked_add(1 + insn.k as usize)?;
                    continue;
                }
                let taken = |a: u32| match op {
                    BPF_JEQ => Some(a == insn.k),
                    BPF_JGT => Some(a > insn.k),
                    BPF_JGE => Some(a >= insn.k),
                    BPF_JSET => Some(a & insn.k != 0),
                    _ => None,
                };
                let (yes, no) = (pc + 1 + insn.jt as usize, pc + 1 + insn.jf as usize);
                match acc {
                    // A bit test on the number would break the intervals.
                    Value::Nr(_) if op == BPF_JSET => return None,
                    Value::Unset => return None,
                    Value::Nr(a) | Value::Const(a) => pc = if taken(a)? { yes } else { no },
                    Value::Runtime => {
                        *budget = budget.checked_sub(1)?;
                        let t = eval(prog, yes, acc, nr, audit_arch, budget)?;
                        let f = eval(prog, no, acc, nr, audit_arch, budget)?;
                        return Some(Residual::Branch(insn, Box::new(t), Box::new(f)));
                    }
                }
            }
            // Scratch memory, the X register, packet lengths, RET A: not
            // what seccompiler writes.
            _ => return None,
        }
    }
}

fn alu(op: u16, a: u32, k: u32) -> Option<u32> {
    Some(match op {
        0x00 => a.wrapping_add(k),
        0x10 => a.wrapping_sub(k),
        0x20 => a.wrapping_mul(k),
        0x30 => a.checked_div(k)?,
        0x40 => a | k,
        0x50 => a & k,
        0x60 => a.checked_shl(k).unwrap_or(0),
        0x70 => a.checked_shr(k).unwrap_or(0),
        0x80 => a.wrapping_neg(),
        0x90 => a.checked_rem(k)?,
        0xa0 => a ^ k,
        _ => return None,
    })
}

/// Straight-line code for a residual. Branches fall through to the taken
/// side; a side too far for an 8-bit offset goes through a `ja`.
fn emit(residual: &Residual) -> Vec<sock_filter> {
    match residual {
        Residual::Ret(k) => vec![stmt(BPF_RET_K, *k)],
        Residual::Op(insn, rest) => {
            let mut code = vec![insn.clone()];
            code.extend(emit(rest));
            code
        }
        Residual::Branch(insn, taken, not) => {
            let (t, f) = (emit(taken), emit(not));
            let mut code = match u8::try_from(t.len()) {
                Ok(skip) => vec![sock_filter { jt: 0, jf: skip, ..*insn }],
                // Taken: past the `ja`; not taken: the `ja`, over the taken side.
                Err(_) => vec![sock_filter { jt: 1, jf: 0, ..*insn }, stmt(BPF_JMP_JA, t.len() as u32)],
            };
            code.extend(t);
            code.extend(f);
            code
        }
    }
}

/// The search over the sorted `exceptions` (numbers whose residual is not
/// `default`), with the syscall number in the accumulator.
fn search(exceptions: &[(u32, &Residual)], default: &Residual) -> Option<Vec<sock_filter>> {
    if exceptions.len() <= LEAF {
        return leaf(exceptions, default);
    }
    let mid = exceptions.len() / 2;
    let (below, above) = (search(&exceptions[..mid], default)?, search(&exceptions[mid..], default)?);
    let pivot = exceptions[mid].0;
    let mut code = match u8::try_from(below.len()) {
        Ok(skip) => vec![jump(BPF_JMP_JGE_K, pivot, skip, 0)],
        Err(_) => vec![jump(BPF_JMP_JGE_K, pivot, 0, 1), stmt(BPF_JMP_JA, below.len() as u32)],
    };
    code.extend(below);
    code.extend(above);
    Some(code)
}

/// A run of `jeq`, one per exception, each to its residual's code, which
/// follows the default's; equal residuals share their code.
fn leaf(exceptions: &[(u32, &Residual)], default: &Residual) -> Option<Vec<sock_filter>> {
    let mut blocks: Vec<(&Residual, Vec<sock_filter>)> = Vec::new();
    for (_, r) in exceptions {
        if !blocks.iter().any(|(b, _)| b == r) {
            blocks.push((r, emit(r)));
        }
    }
    let tests = exceptions.len();
    let default_code = emit(default);
    let mut code = Vec::new();
    for (i, (nr, r)) in exceptions.iter().enumerate() {
        // From the next instruction: the rest of the tests, the default,
        // then the blocks before this one's.
        let before: usize = blocks.iter().take_while(|(b, _)| b != r).map(|(_, c)| c.len()).sum();
        let skip = u8::try_from(tests - i - 1 + default_code.len() + before).ok()?;
        code.push(jump(BPF_JMP_JEQ_K, *nr, skip, 0));
    }
    code.extend(default_code);
    for (_, block) in blocks {
        code.extend(block);
    }
    Some(code)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use seccompiler::{BpfProgram, TargetArch, sock_filter};

    use super::super::{AUDIT_ARCH_AARCH64, AUDIT_ARCH_X86_64, arch_guard, compile, jump, link, stmt};
    use super::*;

    const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;

    /// A classic BPF interpreter for what seccomp programs use, over a
    /// `struct seccomp_data`: nr, arch, instruction pointer, six arguments.
    fn run(prog: &[sock_filter], data: &[u8; 64]) -> u32 {
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = &prog[pc];
            pc += 1;
            match (i.code & BPF_CLASS_MASK, i.code) {
                (_, BPF_RET_K) => return i.k,
                (_, BPF_LD_W_ABS) => {
                    let at = i.k as usize;
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                }
                (BPF_ALU, code) if code & BPF_SRC_X == 0 => a = alu(code & BPF_OP_MASK, a, i.k).unwrap(),
                (BPF_JMP, code) if code & BPF_OP_MASK == BPF_JA => pc += i.k as usize,
                (BPF_JMP, code) => {
                    let taken = match code & BPF_OP_MASK {
                        BPF_JEQ => a == i.k,
                        BPF_JGT => a > i.k,
                        BPF_JGE => a >= i.k,
                        BPF_JSET => a & i.k != 0,
                        other => panic!("jump op {other:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                _ => panic!("instruction {i:?}"),
            }
        }
    }

    fn data(nr: u32, arch: u32, args: [u64; 6]) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[0..4].copy_from_slice(&nr.to_le_bytes());
        d[4..8].copy_from_slice(&arch.to_le_bytes());
        d[8..16].copy_from_slice(&0x4000_1234u64.to_le_bytes());
        for (i, arg) in args.iter().enumerate() {
            d[16 + 8 * i..24 + 8 * i].copy_from_slice(&arg.to_le_bytes());
        }
        d
    }

    /// The program as linked, without the rewrite.
    fn linked(json: &str, arch: TargetArch) -> Vec<sock_filter> {
        let filters = seccompiler::compile_from_json(json.as_bytes(), arch).unwrap();
        let ordered: BTreeMap<String, BpfProgram> = filters.into_iter().collect();
        link(arch, ordered.into_values().collect()).unwrap()
    }

    /// Every syscall number around every constant of the program's jumps
    /// (there, with argument values made of each such constant in each
    /// argument), and every other one of the first 1100, the ends of the
    /// range and some x32 ones (there, with a few argument values), under
    /// the native and a foreign architecture: both programs answer alike.
    fn assert_same(before: &[sock_filter], after: &[sock_filter], native: u32) {
        let constants: Vec<u32> = before.iter().filter(|i| i.code & BPF_CLASS_MASK == BPF_JMP || i.code & BPF_CLASS_MASK == BPF_ALU).map(|i| i.k).collect();
        let mut near: Vec<u32> = constants.iter().flat_map(|k| [k.wrapping_sub(1), *k, k.wrapping_add(1)]).collect();
        near.sort_unstable();
        near.dedup();
        let mut others: Vec<u32> = (0..1100).collect();
        others.extend([0x3fff_ffff, 0x4000_0000, 0x4000_0010, 0xffff_fffe, 0xffff_ffff]);
        others.retain(|nr| near.binary_search(nr).is_err());
        let mut few = vec![[0u64; 6], [u64::MAX; 6]];
        let mut argsets = Vec::new();
        for &k in &constants {
            for i in 0..6 {
                let mut args = [0u64; 6];
                args[i] = u64::from(k);
                argsets.push(args);
                args[i] = u64::from(k) | 0xdead_0000_0000;
                argsets.push(args);
            }
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..16 {
            let mut args = [0u64; 6];
            for arg in &mut args {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *arg = seed;
            }
            few.push(args);
        }
        argsets.extend(few.iter().copied());
        for arch in [native, AUDIT_ARCH_I386] {
            for (nrs, argsets) in [(&near, &argsets), (&others, &few)] {
                for &nr in nrs {
                    for args in argsets {
                        let d = data(nr, arch, *args);
                        assert_eq!(run(before, &d), run(after, &d), "nr {nr:#x} arch {arch:#x} args {args:x?}");
                    }
                }
            }
        }
    }

    #[test]
    fn default_policies_answer_alike_in_half_the_instructions() {
        for (json, arch, native) in [
            (include_str!("seccomp_policy.x86_64.json"), TargetArch::x86_64, AUDIT_ARCH_X86_64),
            (include_str!("seccomp_policy.aarch64.json"), TargetArch::aarch64, AUDIT_ARCH_AARCH64),
        ] {
            let before = linked(json, arch);
            let after = compile(json, arch).unwrap();
            assert_eq!(&after[..arch_guard(arch).len()], &arch_guard(arch)[..], "the guard comes first, untouched");
            assert!(after.len() * 2 <= before.len() + 20, "{} -> {} instructions", before.len(), after.len());
            assert_same(&before, &after, native);
        }
    }

    /// Every comparison seccompiler writes, on dword and qword arguments, and
    /// several filters linked.
    #[test]
    fn custom_policies_answer_alike() {
        let json = r#"{
            "a": {"mismatch_action": "allow", "filter_action": {"errno": 1}, "filter": [
                {"syscall": "mount"},
                {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 21522}]},
                {"syscall": "socket", "args": [{"index": 0, "type": "dword", "op": "gt", "val": 10},
                                               {"index": 1, "type": "dword", "op": "lt", "val": 3}]},
                {"syscall": "mmap", "args": [{"index": 2, "type": "qword", "op": "ge", "val": 81985529216486895}]},
                {"syscall": "mmap", "args": [{"index": 3, "type": "qword", "op": "le", "val": 4294967296}]},
                {"syscall": "prctl", "args": [{"index": 0, "type": "dword", "op": "ne", "val": 15}]},
                {"syscall": "clone", "args": [{"index": 0, "type": "qword", "op": {"masked_eq": 268435456}, "val": 268435456}]}
            ]},
            "b": {"mismatch_action": "allow", "filter_action": {"errno": 38}, "filter": [
                {"syscall": "clone3"}, {"syscall": "read", "args": [{"index": 2, "type": "qword", "op": "eq", "val": 7}]}
            ]},
            "c": {"mismatch_action": "allow", "filter_action": "kill_process", "filter": [
                {"syscall": "reboot"}, {"syscall": "kexec_load"}
            ]}
        }"#;
        let before = linked(json, TargetArch::x86_64);
        let after = compile(json, TargetArch::x86_64).unwrap();
        assert!(after.len() < before.len(), "{} -> {}", before.len(), after.len());
        assert_same(&before, &after, AUDIT_ARCH_X86_64);
    }

    /// A deny-by-default policy: the most common answer is then the error,
    /// and the allowed syscalls are the exceptions.
    #[test]
    fn allow_lists_answer_alike() {
        let json = r#"{"only": {"mismatch_action": {"errno": 1}, "filter_action": "allow", "filter": [
            {"syscall": "read"}, {"syscall": "write"}, {"syscall": "exit_group"}, {"syscall": "futex"},
            {"syscall": "openat", "args": [{"index": 2, "type": "dword", "op": {"masked_eq": 3}, "val": 0}]}
        ]}}"#;
        let before = linked(json, TargetArch::x86_64);
        let after = compile(json, TargetArch::x86_64).unwrap();
        assert_ne!(before, after);
        assert_same(&before, &after, AUDIT_ARCH_X86_64);
    }

    /// No policy today is large enough to need them: a search whose lower
    /// half passes 255 instructions, and a residual branch whose taken side
    /// does, jump through a `ja`.
    #[test]
    fn far_jumps_go_through_ja() {
        let (deny, allow) = (Residual::Ret(0x0005_0001), Residual::Ret(super::super::SECCOMP_RET_ALLOW));
        let exceptions: Vec<(u32, &Residual)> = (0..600).map(|i| (i * 3 + 1, &deny)).collect();
        let mut prog = vec![stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR)];
        prog.extend(search(&exceptions, &allow).unwrap());
        assert!(prog.iter().any(|i| i.code == BPF_JMP_JA), "no far jump in {} instructions", prog.len());
        for nr in 0..2000u32 {
            let want = if nr % 3 == 1 && nr < 1800 { &deny } else { &allow };
            assert_eq!(Residual::Ret(run(&prog, &data(nr, AUDIT_ARCH_X86_64, [0; 6]))), *want, "nr {nr}");
        }

        let mut long = Residual::Ret(1);
        for _ in 0..300 {
            long = Residual::Op(stmt(BPF_LD_W_ABS, 16), Box::new(long));
        }
        let branch = Residual::Branch(jump(BPF_JMP_JEQ_K, 7, 0, 0), Box::new(long), Box::new(Residual::Ret(2)));
        let mut prog = vec![stmt(BPF_LD_W_ABS, 16)];
        prog.extend(emit(&branch));
        assert!(prog.iter().any(|i| i.code == BPF_JMP_JA));
        assert_eq!(run(&prog, &data(0, AUDIT_ARCH_X86_64, [7, 0, 0, 0, 0, 0])), 1);
        assert_eq!(run(&prog, &data(0, AUDIT_ARCH_X86_64, [8, 0, 0, 0, 0, 0])), 2);
    }

    #[test]
    fn programs_it_does_not_understand_stay_as_they_were() {
        let ld_nr = stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR);
        let ret = |k| stmt(BPF_RET_K, k);
        // Arithmetic on the number, a bit test of it, the X register.
        for odd in [stmt(BPF_ALU | 0x50, 0xff), jump(BPF_JMP | BPF_JSET, 4, 0, 1), stmt(0x07, 0)] {
            let prog = [ld_nr.clone(), odd, jump(BPF_JMP_JEQ_K, 3, 0, 1), ret(1), ret(0x7fff_0000)];
            assert!(dispatch(&prog, AUDIT_ARCH_X86_64).is_none(), "{prog:?}");
        }
        // A jump out of the program.
        assert!(dispatch(&[ld_nr.clone(), jump(BPF_JMP_JEQ_K, 3, 9, 0), ret(0)], AUDIT_ARCH_X86_64).is_none());
        // A test of what the guard left in the accumulator.
        assert!(dispatch(&[jump(BPF_JMP_JEQ_K, 3, 0, 1), ret(1), ret(0x7fff_0000)], AUDIT_ARCH_X86_64).is_none());
    }

    /// Any syscall's answer (its rules, if it has some) is a few comparisons
    /// away, where the linear program compares it with every listed number.
    #[test]
    fn any_syscall_is_reached_in_a_few_steps() {
        let prog = compile(include_str!("seccomp_policy.x86_64.json"), TargetArch::x86_64).unwrap();
        let steps = |nr: u32| {
            let d = data(nr, AUDIT_ARCH_X86_64, [0; 6]);
            let mut pc = 0;
            let mut n = 0;
            // Count the instructions run, with the same interpreter rules.
            loop {
                let i = &prog[pc];
                n += 1;
                pc += 1;
                if i.code == BPF_RET_K {
                    return n;
                }
                match i.code & BPF_OP_MASK {
                    _ if i.code & BPF_CLASS_MASK != BPF_JMP => {}
                    BPF_JA => pc += i.k as usize,
                    op => {
                        let a = u32::from_le_bytes(d[0..4].try_into().unwrap());
                        let taken = match op {
                            BPF_JEQ => a == i.k,
                            BPF_JGE => a >= i.k,
                            BPF_JGT => a > i.k,
                            _ => a & i.k != 0,
                        };
                        pc += usize::from(if taken { i.jt } else { i.jf });
                    }
                }
            }
        };
        // getpid, read, write, openat, exit_group: allowed, no rules.
        for nr in [39, 0, 1, 257, 231] {
            assert!(steps(nr) <= 20, "syscall {nr}: {} instructions", steps(nr));
        }
    }
}
