//! Finding and executing `agentd-sandbox`, the binary that builds sandboxes.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// The binary's file name; it is installed (and built) beside `agentd`.
pub const NAME: &str = "agentd-sandbox";

/// `AGENTD_SANDBOX_BIN` if set, else `agentd-sandbox` in this executable's
/// directory.
pub fn locate() -> std::io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AGENTD_SANDBOX_BIN") {
        return Ok(PathBuf::from(path));
    }
    Ok(std::env::current_exe()?.with_file_name(NAME))
}

/// Replaces this process with `agentd-sandbox`, passing the command line on
/// unchanged (`agentd sandbox run ...` becomes `agentd-sandbox sandbox run
/// ...`). Exits 125 (as `agentd sandbox run` does when agentd itself fails)
/// if it cannot.
pub fn exec_with_args() -> ! {
    let error = match locate() {
        Ok(bin) => {
            let e = std::process::Command::new(&bin).args(std::env::args_os().skip(1)).exec();
            format!("cannot run {}: {e} (build it with `cargo build --workspace --bins`, or set AGENTD_SANDBOX_BIN)", bin.display())
        }
        Err(e) => format!("cannot find {NAME}: {e}"),
    };
    eprintln!("agentd: {error}");
    std::process::exit(125)
}
