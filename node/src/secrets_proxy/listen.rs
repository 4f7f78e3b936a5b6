//! Listeners inside a sandbox's network namespace.
//!
//! A socket belongs to the network namespace it was created in, whoever
//! holds it later. So a short-lived thread of the node enters the sandbox's
//! namespace (`setns`, which changes only that thread), binds there and
//! ends; the node serves the sockets from its own runtime. The sandbox sees
//! a port on its own 127.0.0.1 and nothing else of the host, whatever its
//! network mode (loopback only, or an egress route). The sockets hold the
//! namespace alive: they must close with the sandbox.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

use nix::sched::{CloneFlags, setns};

/// One TCP listener on 127.0.0.1 in the network namespace of `pid` (as
/// `proc_root` shows it) per entry of `ports` (0: any free port),
/// non-blocking.
pub fn listeners_in(proc_root: &Path, pid: i32, ports: &[u16]) -> std::io::Result<Vec<TcpListener>> {
    let path = proc_root.join(pid.to_string()).join("ns/net");
    let netns = File::open(&path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    // Never a thread of the runtime's pools: it stays in the namespace it
    // entered, and it ends here.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&netns, CloneFlags::CLONE_NEWNET).map_err(|e| std::io::Error::other(format!("setns into {}: {e}", path.display())))?;
                ports
                    .iter()
                    .map(|port| {
                        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, *port))?;
                        listener.set_nonblocking(true)?;
                        Ok(listener)
                    })
                    .collect()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread binding in the sandbox's namespace panicked")))
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// A socket bound through a child's namespace is in that namespace: the
    /// child reaches it on its loopback, the node's own loopback does not
    /// have it. Needs root (a network namespace of its own).
    #[test]
    fn a_listener_lives_in_the_namespace_it_was_made_in() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A child in a new network namespace (loopback up), waiting on stdin.
        let mut child = std::process::Command::new("unshare")
            .args(["--net", "sh", "-c", "ip link set lo up && echo up && read _ && exec cat"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut up = [0u8; 3];
        child.stdout.as_mut().unwrap().read_exact(&mut up).unwrap();
        let pid = child.id() as i32;
        let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino();
        assert_ne!(theirs, std::fs::metadata("/proc/self/ns/net").unwrap().ino());

        let listeners = listeners_in(Path::new("/proc"), pid, &[0, 0]).unwrap();
        assert_eq!(listeners.len(), 2);
        let port = listeners[0].local_addr().unwrap().port();
        assert!(std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(), "not on the node's loopback");
        // This thread's namespace is unchanged.
        assert_ne!(std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino(), theirs);

        // From inside the namespace (bash's /dev/tcp).
        listeners[0].set_nonblocking(false).unwrap();
        let connector = std::thread::spawn(move || {
            std::process::Command::new("nsenter")
                .args(["-t", &pid.to_string(), "-n", "bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}; echo hi >&3")])
                .status()
                .unwrap()
        });
        let (mut conn, _) = listeners[0].accept().unwrap();
        let mut got = String::new();
        conn.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi\n");
        assert!(connector.join().unwrap().success());

        child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
        drop(child.stdin.take());
        child.wait().unwrap();
    }
}
