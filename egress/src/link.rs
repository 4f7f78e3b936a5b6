//! A sandbox's route out: a veth pair (`eth0` in the sandbox, `aeg<N>` on
//! the node) on a /30 of 100.127.0.0/16, and an nftables table
//! `inet agentd_egress_<N>` on the node that sends every TCP connection
//! from the link to the gateway's proxy, lets UDP reach only the resolver
//! (every other datagram goes to a sink that reports it), and drops
//! everything else: forwarding, IPv6, ICMP.
//!
//! Slots: `N` is held by an `flock` on /run/agentd-egress/slot-N, so that
//! every process on the host (a node, several nodes under test, `agentd
//! sandbox run`) picks distinct names and addresses, and a slot whose lock
//! is free while its link or table exists belongs to a process that died:
//! [`clean_leftovers`] removes those, and so does [`Slot::reserve`] before
//! it reuses one.
//!
//! `ip` and `nft` (iproute2, nftables) do the kernel work: one process each
//! per step, batched, which costs a few milliseconds per sandbox create and
//! keeps netlink code out of agentd.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where slot locks live (tmpfs: nothing survives a reboot, as no link does).
pub const LOCK_DIR: &str = "/run/agentd-egress";
/// Slots on one host: /30s of 100.127.0.0/16.
pub const MAX_SLOTS: u32 = 16384;
const BASE: u32 = u32::from_be_bytes([100, 127, 0, 0]);
pub const LINK_PREFIX: &str = "aeg";
pub const TABLE_PREFIX: &str = "agentd_egress_";
/// The sandbox's end of the veth.
pub const SANDBOX_LINK: &str = "eth0";

/// A slot held by this process until dropped.
pub struct Slot {
    n: u32,
    _lock: File,
}

fn lock_dir() -> PathBuf {
    std::env::var_os("AGENTD_EGRESS_LOCK_DIR").map_or_else(|| PathBuf::from(LOCK_DIR), PathBuf::from)
}

fn try_lock(n: u32) -> std::io::Result<Option<File>> {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir)?;
    let file = File::options().create(true).truncate(false).write(true).open(dir.join(format!("slot-{n}")))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(Some(file))
    } else {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(None) } else { Err(e) }
    }
}

impl Slot {
    /// The first free slot, cleared of what a dead owner left in it.
    pub fn reserve() -> std::io::Result<Slot> {
        for n in 0..MAX_SLOTS {
            if let Some(mut lock) = try_lock(n)? {
                // The lock file says "in use" from here until a clean
                // release empties it: a non-empty one was left by a process
                // that died holding the slot, whose link and rules may
                // remain. Checked so, a clean slot costs no `ip`/`nft` run.
                let dirty = lock.metadata()?.len() > 0;
                lock.write_all(b"in use\n")?;
                let slot = Slot { n, _lock: lock };
                if dirty {
                    slot.remove();
                }
                return Ok(slot);
            }
        }
        Err(std::io::Error::other(format!("all {MAX_SLOTS} egress slots are taken")))
    }

    pub fn number(&self) -> u32 {
        self.n
    }

    pub fn link(&self) -> String {
        format!("{LINK_PREFIX}{}", self.n)
    }

    pub fn table(&self) -> String {
        format!("{TABLE_PREFIX}{}", self.n)
    }

    /// The node's address on the link: the resolver's and the proxy's.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(BASE + self.n * 4 + 1)
    }

    pub fn sandbox_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(BASE + self.n * 4 + 2)
    }

    /// Connects the network namespace of process `pid` (host pid): the
    /// veth pair, its addresses, the sandbox's default route. IPv6 is off
    /// on the node's end, so the sandbox has not even a link-local peer.
    pub fn connect(&self, pid: i32) -> Result<(), String> {
        let link = self.link();
        run("ip", &["link", "add", &link, "type", "veth", "peer", "name", SANDBOX_LINK, "netns", &pid.to_string()], None)?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{link}/disable_ipv6"), "1");
        let host = format!("addr add {}/30 dev {link}\nlink set {link} up\n", self.gateway());
        run("ip", &["-batch", "-"], Some(&host))?;
        let sandbox = format!(
            "addr add {}/30 dev {SANDBOX_LINK}\nlink set {SANDBOX_LINK} up\nroute add default via {}\n",
            self.sandbox_addr(),
            self.gateway()
        );
        let netns = format!("--net=/proc/{pid}/ns/net");
        run("nsenter", &[&netns, "ip", "-batch", "-"], Some(&sandbox))
    }

    /// Installs the slot's nftables table: the link's TCP to `proxy_port`,
    /// its UDP to `resolver_port` if for the gateway on port 53, else to
    /// `sink_port`; nothing else in or through.
    pub fn install_rules(&self, proxy_port: u16, sink_port: u16) -> Result<(), String> {
        let (table, link, gw, sandbox) = (self.table(), self.link(), self.gateway(), self.sandbox_addr());
        // Spoofed sources are dropped first: the gateway's answers (a DNS
        // refusal echoing its question, a SYN-ACK) would otherwise go out
        // to any address the sandbox names, a channel past the rules.
        let rules = format!(
            r#"table inet {table} {{}}
delete table inet {table}
table inet {table} {{
  chain spoofed {{
    type filter hook prerouting priority raw; policy accept;
    iifname "{link}" meta nfproto ipv4 ip saddr != {sandbox} drop
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{link}" meta nfproto ipv4 ip daddr {gw} udp dport 53 accept
    iifname "{link}" meta nfproto ipv4 meta l4proto tcp redirect to :{proxy_port}
    iifname "{link}" meta nfproto ipv4 meta l4proto udp redirect to :{sink_port}
  }}
  chain input {{
    type filter hook input priority filter - 1; policy accept;
    iifname "{link}" meta nfproto ipv4 ip daddr {gw} tcp dport {proxy_port} accept
    iifname "{link}" meta nfproto ipv4 ip daddr {gw} udp dport {{ 53, {sink_port} }} accept
    iifname "{link}" drop
  }}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    iifname "{link}" drop
    oifname "{link}" drop
  }}
}}
"#
        );
        run("nft", &["-f", "-"], Some(&rules))
    }

    /// Removes the slot's link and table, whichever exist.
    fn remove(&self) {
        remove_slot(self.n);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.remove();
        let _ = self._lock.set_len(0);
    }
}

fn remove_slot(n: u32) {
    // Not looked up in /sys/class/net: a process that entered a network
    // namespace without mounting a sysfs of its own sees another's there.
    let _ = run("ip", &["link", "del", &format!("{LINK_PREFIX}{n}")], None);
    let _ = run("nft", &["delete", "table", "inet", &format!("{TABLE_PREFIX}{n}")], None);
}

/// Removes the links and tables of slots no live process holds (left by a
/// node or a run that crashed); returns how many slots it cleaned.
pub fn clean_leftovers() -> usize {
    let mut slots = std::collections::BTreeSet::new();
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).stderr(Stdio::null()).output() {
        // `7: aeg3@if6: <...>`
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(": ").nth(1).unwrap_or("").split('@').next().unwrap_or("");
            if let Some(n) = name.strip_prefix(LINK_PREFIX).and_then(|n| n.parse::<u32>().ok()) {
                slots.insert(n);
            }
        }
    }
    if let Ok(out) = Command::new("nft").args(["list", "tables", "inet"]).stderr(Stdio::null()).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(n) = line.trim().strip_prefix("table inet ").and_then(|t| t.strip_prefix(TABLE_PREFIX)).and_then(|n| n.parse::<u32>().ok()) {
                slots.insert(n);
            }
        }
    }
    let mut cleaned = 0;
    for n in slots.into_iter().filter(|n| *n < MAX_SLOTS) {
        if let Ok(Some(_lock)) = try_lock(n) {
            remove_slot(n);
            cleaned += 1;
        }
    }
    cleaned
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(|e| format!("{program}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}
