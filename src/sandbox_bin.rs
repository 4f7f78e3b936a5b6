//! Finding `agentd`, the small binary the node starts its zygote from.

use std::path::PathBuf;

/// The binary's file name; it is installed (and built) beside `agentd-daemon`.
pub const NAME: &str = "agentd";

/// `AGENTD_SANDBOX_BIN` if set, else `agentd` in this executable's
/// directory.
pub fn locate() -> std::io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("AGENTD_SANDBOX_BIN") {
        return Ok(PathBuf::from(path));
    }
    Ok(std::env::current_exe()?.with_file_name(NAME))
}
