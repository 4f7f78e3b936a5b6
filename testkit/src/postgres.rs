//! A throwaway PostgreSQL cluster per test.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root (as they
//! must, to build sandboxes) the cluster runs as the `postgres` system user.
//! The server gets SIGQUIT if the test process dies, and its directory goes
//! with the [`TempPostgres`] value.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TempPostgres {
    port: u16,
    /// The server; `None` while stopped ([`TempPostgres::stop`]).
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Who the server runs as (`postgres` when the tests run as root).
    user: Option<User>,
}

/// Finds a PostgreSQL program on PATH or in Debian's versioned directories.
pub fn pg_bin(name: &str) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name));
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name));
    on_path.chain(debian).find(|p| p.is_file())
}

/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not
/// the process: a server started from a short-lived thread (tokio's blocking
/// pool retires idle threads after 10 s) would be killed mid-test. Every
/// server is therefore spawned from one thread that lives as long as the
/// test process.
fn spawn_from_lasting_thread(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<Job>>> = std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("temp-postgres-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The senders live in a static: this thread never ends.
            })
            .expect("spawn the postgres spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::channel();
    let job: Job = (std::mem::replace(&mut cmd, Command::new("true")), reply);
    spawner.lock().unwrap().send(job).map_err(|_| std::io::Error::other("postgres spawner thread is gone"))?;
    answer.recv().map_err(|_| std::io::Error::other("postgres spawner thread is gone"))?
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run_as<'a>(cmd: &'a mut Command, user: Option<&User>) -> &'a mut Command {
    if let Some(user) = user {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd
}

impl TempPostgres {
    /// Creates and starts a cluster; returns once it accepts connections.
    pub fn start() -> std::io::Result<Self> {
        let initdb = pg_bin("initdb").ok_or_else(|| std::io::Error::other("initdb not found: install postgresql"))?;
        let user = if nix::unistd::geteuid().is_root() {
            Some(User::from_name("postgres")?.ok_or_else(|| std::io::Error::other("no postgres user to run the server as"))?)
        } else {
            None
        };
        let dir = tempfile::Builder::new().prefix("agentd-pg-").tempdir()?;
        if let Some(user) = &user {
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
        }
        let data = dir.path().join("data");
        let status = run_as(&mut Command::new(initdb), user.as_ref())
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()?;
        if !status.status.success() {
            return Err(std::io::Error::other(format!("initdb failed: {}", String::from_utf8_lossy(&status.stderr))));
        }
        let port = free_port()?;
        let mut pg = Self { port, child: None, dir, user };
        pg.start_server()?;
        Ok(pg)
    }

    /// Spawns the server on the cluster and waits until it accepts connections.
    fn start_server(&mut self) -> std::io::Result<()> {
        let postgres = pg_bin("postgres").ok_or_else(|| std::io::Error::other("postgres not found"))?;
        let pg_isready = pg_bin("pg_isready").ok_or_else(|| std::io::Error::other("pg_isready not found"))?;
        let port = self.port;
        let mut cmd = Command::new(postgres);
        run_as(&mut cmd, self.user.as_ref())
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe; it only sets this child's death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        self.child = Some(spawn_from_lasting_thread(cmd)?);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = Command::new(&pg_isready)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-q"])
                .status()?
                .success();
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("postgres did not become ready"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server as a restart would (fast shutdown: clients' sessions
    /// are ended and their connections drop; committed data stays), keeping
    /// the cluster for [`Self::resume`].
    pub fn stop(&mut self) {
        self.signal_and_wait(Signal::SIGINT);
    }

    fn signal_and_wait(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again on the same cluster and port; returns
    /// once it accepts connections.
    pub fn resume(&mut self) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        self.start_server()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of the `postgres` database as the `postgres` superuser.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// URL of the same database over the server's unix socket (in
    /// [`Self::dir`]): unlike the TCP one on 127.0.0.1, it reaches the server
    /// from any network namespace (a control plane in a `netns` host).
    pub fn socket_url(&self) -> String {
        format!("postgres://postgres@localhost:{}/postgres?host={}", self.port, self.dir.path().display())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's pid, 0 while stopped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown; the data is thrown away anyway.
        self.signal_and_wait(Signal::SIGQUIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_queries_and_leaves_nothing_behind() {
        let pg = TempPostgres::start().expect("start postgres");
        let psql = pg_bin("psql").expect("psql");
        let out = Command::new(&psql).args([&pg.url(), "-tAc", "select 40 + 2"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{}", String::from_utf8_lossy(&out.stderr));
        let out = Command::new(&psql).args([&pg.socket_url(), "-tAc", "select 6 * 7"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "over the socket: {}", String::from_utf8_lossy(&out.stderr));
        let (dir, pid) = (pg.dir().to_owned(), pg.pid());
        drop(pg);
        assert!(!dir.exists(), "cluster directory removed");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "server process gone");
    }

    #[test]
    fn stops_and_resumes_with_its_data() {
        let mut pg = TempPostgres::start().expect("start postgres");
        let psql = pg_bin("psql").expect("psql");
        let url = pg.url();
        let sql = |q: &str| Command::new(&psql).args([&url, "-tAc", q]).output().unwrap();
        assert!(sql("create table t (x int); insert into t values (7)").status.success());
        let pid = pg.pid();
        pg.stop();
        assert!(!pg.is_running());
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "server process gone");
        assert!(!sql("select 1").status.success(), "a stopped server refuses connections");
        pg.resume().expect("resume");
        assert_eq!(String::from_utf8_lossy(&sql("select x from t").stdout).trim(), "7");
    }
}
