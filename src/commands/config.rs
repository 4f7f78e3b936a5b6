//! `agentd config check [FILE]`: the checks every command runs on the config
//! file at start, run on their own, listing every problem.

use std::process::ExitCode;

use crate::cli::ConfigCommand;
use crate::config::{self, ConfigError};

pub fn run(command: ConfigCommand) -> anyhow::Result<ExitCode> {
    match command {
        ConfigCommand::Check { file } => {
            let path = file.unwrap_or_else(|| config::location().0);
            match config::read(&path) {
                Ok(vars) => {
                    println!("ok: {} keys ({})", vars.len(), path.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(ConfigError::Invalid { problems }) => {
                    for problem in &problems {
                        eprintln!("{problem}");
                    }
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.into()),
            }
        }
    }
}
