//! Handing the daemon's subcommands to `agentd-daemon`, the binary with the
//! control plane and the node, installed beside `agentd`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// The daemon binary's file name.
pub const NAME: &str = "agentd-daemon";

/// `AGENTD_DAEMON_BIN` if set, else `agentd-daemon` in this executable's
/// directory.
pub fn locate() -> std::io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AGENTD_DAEMON_BIN") {
        return Ok(PathBuf::from(path));
    }
    Ok(std::env::current_exe()?.with_file_name(NAME))
}

/// Executes the daemon in this process's place with this process's
/// arguments (its own name kept, for usage messages); returns only why that
/// failed.
pub fn exec() -> anyhow::Error {
    let path = match locate() {
        Ok(path) => path,
        Err(e) => return anyhow::anyhow!("cannot find this executable to find {NAME} beside it: {e}"),
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "agentd".into());
    let e = std::process::Command::new(&path).arg0(arg0).args(args).exec();
    anyhow::anyhow!("cannot run {}: {e} (it is installed beside agentd; AGENTD_DAEMON_BIN names another)", path.display())
}
