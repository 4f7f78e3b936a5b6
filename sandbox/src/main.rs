//! `agentd-sandbox`: the sandbox subcommands of agentd in a binary of their
//! own (see the library's docs). Only the runtime crate is linked: every
//! sandbox's PID 1 is a fork of this binary, and what it links (code to
//! fault in, relocations to apply) is paid per sandbox.

fn main() -> anyhow::Result<()> {
    agentd_sandbox::main()
}
