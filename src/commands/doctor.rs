//! `agentd doctor [--json]`: runs the host checks ([`crate::doctor`]) with
//! the settings `agentd up` would use and prints them; exits non-zero when
//! one failed.

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::DoctorArgs;
use crate::config::Loaded;
use crate::doctor::{self, Settings, ids::IdSettings};

/// A database that has not answered by then will not: doctor goes on.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: DoctorArgs, config: Option<Loaded>) -> anyhow::Result<ExitCode> {
    let up = args.up;
    let sandbox_bin = match up.node.sandbox_bin {
        Some(path) => path,
        None => crate::sandbox_bin::locate()?,
    };
    let settings = Settings {
        config,
        state_dir: up.common.state_dir,
        ids: IdSettings { base: up.node.id_base, range_size: up.node.id_range_size, max_sandboxes: up.node.max_sandboxes },
        database_url: up.api.database_url().map(str::to_owned),
        sandbox_bin,
        proc: "/proc".into(),
        etc: "/etc".into(),
        cgroup_root: "/sys/fs/cgroup".into(),
        database_timeout: DATABASE_TIMEOUT,
    };
    let rows = doctor::run(&settings);
    if args.json {
        println!("{}", doctor::json(&rows));
    } else {
        print!("{}", doctor::table(&rows));
    }
    Ok(if doctor::passed(&rows) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
