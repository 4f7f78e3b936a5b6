//! One sandbox's gateway: its slot ([`crate::link`]), resolver, proxy and
//! datagram sink, its counters, and its denials handed to the caller.
//!
//! Three steps, because the sandbox's creator may be single-threaded while
//! it builds (`agentd sandbox run`): [`Gateway::reserve`] before the build
//! (the resolver's address goes into the sandbox's /etc/resolv.conf),
//! [`Gateway::attach`] once PID 1's network namespace exists (link, bound
//! sockets, rules: no threads), [`Gateway::serve`] in a tokio runtime. A
//! connection made between attach and serve waits in the listen queue.
//! Dropping the [`Serving`] gateway stops its tasks and removes the link
//! and the rules.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_plan::network::EgressPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

use crate::decide::{Decider, Verdict};
use crate::dns::{self, ParseError, Query};
use crate::link::Slot;
use crate::sni::{self, Hello};

/// How long the proxy waits for a client's first bytes (a ClientHello)
/// before deciding without them: a protocol where the server speaks first
/// (SSH, SMTP) sends none.
const FIRST_BYTES: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const UPSTREAM_DNS_TIMEOUT: Duration = Duration::from_secs(3);
/// Denial events per second a sandbox may cause; the rest are counted in
/// the next event's `suppressed`.
const EVENTS_PER_SECOND: u32 = 20;
/// Connections one sandbox may have open through its proxy at once, and
/// names it may have looked up upstream at once: past them a connection
/// waits in the listen queue, a query is answered SERVFAIL.
const MAX_CONNECTIONS: usize = 1024;
const MAX_UPSTREAM_QUERIES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Dns,
}

/// Something the gateway refused, to be reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub protocol: Protocol,
    /// The address connected to, or the name asked for.
    pub destination: String,
    /// 0 for a name.
    pub port: u16,
    /// The TLS server name the connection asked for, if any.
    pub name: String,
    pub missing_rule: String,
    pub reason: String,
    /// Denials not reported since the last event (rate limit).
    pub suppressed: u64,
}

/// A sandbox's egress counters since its gateway started.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_allowed: AtomicU64,
    pub connections_denied: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub names_allowed: AtomicU64,
    pub names_denied: AtomicU64,
    pub datagrams_denied: AtomicU64,
}

/// A plain copy of [`Counters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub connections_allowed: u64,
    pub connections_denied: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub names_allowed: u64,
    pub names_denied: u64,
    pub datagrams_denied: u64,
}

impl Counters {
    pub fn usage(&self) -> Usage {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Usage {
            connections_allowed: r(&self.connections_allowed),
            connections_denied: r(&self.connections_denied),
            bytes_out: r(&self.bytes_out),
            bytes_in: r(&self.bytes_in),
            names_allowed: r(&self.names_allowed),
            names_denied: r(&self.names_denied),
            datagrams_denied: r(&self.datagrams_denied),
        }
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The resolver the gateway asks: `AGENTD_EGRESS_DNS` (`IP:PORT` or
/// `IP`), else the first IPv4 `nameserver` of the node's /etc/resolv.conf.
pub fn upstream_dns() -> Result<SocketAddr, String> {
    if let Ok(v) = std::env::var("AGENTD_EGRESS_DNS") {
        return v
            .parse::<SocketAddr>()
            .or_else(|_| v.parse::<Ipv4Addr>().map(|ip| SocketAddr::from((ip, 53))))
            .map_err(|_| format!("AGENTD_EGRESS_DNS={v:?} is not IP or IP:PORT"));
    }
    let conf = std::fs::read_to_string("/etc/resolv.conf").map_err(|e| format!("/etc/resolv.conf: {e}"))?;
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddr::from((ip, 53)))
        .ok_or_else(|| "no IPv4 nameserver in /etc/resolv.conf for the egress resolver to ask".to_string())
}

fn own_addrs() -> Vec<Ipv4Addr> {
    let mut addrs = Vec::new();
    // SAFETY: getifaddrs fills a list we walk and free.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return addrs;
        }
        let mut at = list;
        while !at.is_null() {
            let a = (*at).ifa_addr;
            if !a.is_null() && i32::from((*a).sa_family) == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                addrs.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            at = (*at).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    addrs
}

/// A gateway with its slot reserved, not yet attached.
pub struct Gateway {
    slot: Slot,
    policy: EgressPolicy,
    upstream: SocketAddr,
    sockets: Option<Sockets>,
}

struct Sockets {
    resolver: std::net::UdpSocket,
    proxy: std::net::TcpListener,
    sink: std::net::UdpSocket,
}

impl Gateway {
    pub fn reserve(policy: EgressPolicy, upstream: SocketAddr) -> Result<Gateway, String> {
        let slot = Slot::reserve().map_err(|e| format!("egress slot: {e}"))?;
        Ok(Gateway { slot, policy, upstream, sockets: None })
    }

    /// The sandbox's /etc/resolv.conf: the gateway's resolver only.
    pub fn resolv_conf(&self) -> String {
        format!("# agentd egress: names resolve through the node, for allowed names only\nnameserver {}\noptions attempts:1 timeout:2\n", self.slot.gateway())
    }

    pub fn slot(&self) -> &Slot {
        &self.slot
    }

    /// Gives process `pid`'s network namespace its route out, with the
    /// resolver, proxy and sink bound (not served yet) and the rules in place.
    pub fn attach(&mut self, pid: i32) -> Result<(), String> {
        self.slot.connect(pid)?;
        let gw = self.slot.gateway();
        let bind_err = |what: &str, e: std::io::Error| format!("bind the {what} on {gw}: {e}");
        let resolver = std::net::UdpSocket::bind((gw, 53)).map_err(|e| bind_err("resolver", e))?;
        let proxy = std::net::TcpListener::bind((gw, 0)).map_err(|e| bind_err("proxy", e))?;
        let sink = std::net::UdpSocket::bind((gw, 0)).map_err(|e| bind_err("datagram sink", e))?;
        let port = |a: std::io::Result<SocketAddr>| a.map(|a| a.port()).map_err(|e| e.to_string());
        self.slot.install_rules(port(proxy.local_addr())?, port(sink.local_addr())?)?;
        for s in [resolver.as_fd_nonblocking(), proxy.as_fd_nonblocking(), sink.as_fd_nonblocking()] {
            s.map_err(|e| format!("nonblocking: {e}"))?;
        }
        self.sockets = Some(Sockets { resolver, proxy, sink });
        Ok(())
    }

    /// Serves the sandbox from the current tokio runtime; `report` gets
    /// each denial (rate-limited).
    pub fn serve(self, report: impl Fn(Denial) + Send + Sync + 'static) -> Result<Serving, String> {
        let Gateway { slot, policy, upstream, sockets } = self;
        let sockets = sockets.ok_or("the gateway was never attached")?;
        let decider = Arc::new(Decider::new(policy, &own_addrs()));
        let counters = Arc::new(Counters::default());
        let reporter = Arc::new(Reporter { report: Box::new(report), window: Mutex::new((Instant::now(), 0, 0)) });
        let shared = Shared { decider, counters: Arc::clone(&counters), reporter };
        let mut tasks = JoinSet::new();
        let resolver = UdpSocket::from_std(sockets.resolver).map_err(|e| e.to_string())?;
        let proxy = TcpListener::from_std(sockets.proxy).map_err(|e| e.to_string())?;
        let sink = UdpSocket::from_std(sockets.sink).map_err(|e| e.to_string())?;
        tasks.spawn(resolve(Arc::new(resolver), slot.sandbox_addr(), upstream, shared.clone()));
        tasks.spawn(proxy_loop(proxy, shared.clone()));
        tasks.spawn(sink_loop(sink, slot.sandbox_addr(), shared));
        Ok(Serving { counters, _tasks: tasks, _slot: slot })
    }
}

trait Nonblocking {
    fn as_fd_nonblocking(&self) -> std::io::Result<()>;
}
impl Nonblocking for std::net::UdpSocket {
    fn as_fd_nonblocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(true)
    }
}
impl Nonblocking for std::net::TcpListener {
    fn as_fd_nonblocking(&self) -> std::io::Result<()> {
        self.set_nonblocking(true)
    }
}

/// A gateway at work: dropping it stops it (tasks first, then the slot's
/// link and rules).
pub struct Serving {
    counters: Arc<Counters>,
    _tasks: JoinSet<()>,
    _slot: Slot,
}

impl Serving {
    pub fn usage(&self) -> Usage {
        self.counters.usage()
    }
}

/// Rate limit of denial events: [`EVENTS_PER_SECOND`] per one-second window.
struct Reporter {
    report: Box<dyn Fn(Denial) + Send + Sync>,
    /// Window start, events sent in it, denials suppressed since the last event.
    window: Mutex<(Instant, u32, u64)>,
}

impl Reporter {
    fn deny(&self, mut denial: Denial) {
        let send = {
            let mut w = self.window.lock().unwrap();
            if w.0.elapsed() >= Duration::from_secs(1) {
                *w = (Instant::now(), 0, w.2);
            }
            if w.1 < EVENTS_PER_SECOND {
                w.1 += 1;
                denial.suppressed = std::mem::take(&mut w.2);
                true
            } else {
                w.2 += 1;
                false
            }
        };
        if send {
            (self.report)(denial);
        }
    }
}

#[derive(Clone)]
struct Shared {
    decider: Arc<Decider>,
    counters: Arc<Counters>,
    reporter: Arc<Reporter>,
}

async fn resolve(socket: Arc<UdpSocket>, sandbox: Ipv4Addr, upstream: SocketAddr, shared: Shared) {
    let asking = Arc::new(tokio::sync::Semaphore::new(MAX_UPSTREAM_QUERIES));
    let mut buf = vec![0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else { continue };
        // Only the sandbox is answered (the rules drop spoofed sources too).
        if from.ip() != std::net::IpAddr::V4(sandbox) {
            continue;
        }
        let query = match Query::parse(&buf[..n]) {
            Ok(q) => q,
            Err(ParseError::Drop) => continue,
            Err(ParseError::Formerr(id)) => {
                let _ = socket.send_to(&dns::formerr(id), from).await;
                continue;
            }
        };
        let refuse = |reason: String, missing: String| {
            bump(&shared.counters.names_denied, 1);
            shared.reporter.deny(Denial {
                protocol: Protocol::Dns,
                destination: query.name.clone(),
                port: 0,
                name: String::new(),
                missing_rule: missing,
                reason,
                suppressed: 0,
            });
            query.answer(dns::RCODE_REFUSED, &[])
        };
        let answer = match shared.decider.name(&query.name) {
            Verdict::Deny(d) => refuse(d.reason, d.missing_rule),
            Verdict::Allow(_) if query.qclass != dns::CLASS_IN || !matches!(query.qtype, dns::TYPE_A | dns::TYPE_AAAA) => {
                refuse(format!("only A and AAAA queries are answered (type {} for {})", query.qtype, query.name), String::new())
            }
            Verdict::Allow(_) if query.qtype == dns::TYPE_AAAA => {
                bump(&shared.counters.names_allowed, 1);
                // No IPv6 in the sandbox: an empty answer sends the client to A.
                query.answer(dns::RCODE_OK, &[])
            }
            Verdict::Allow(_) => {
                let Ok(permit) = Arc::clone(&asking).try_acquire_owned() else {
                    let _ = socket.send_to(&query.answer(dns::RCODE_SERVFAIL, &[]), from).await;
                    continue;
                };
                let (socket, shared) = (Arc::clone(&socket), shared.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let answer = match ask_upstream(upstream, &query.name).await {
                        Ok((rcode, addrs)) => {
                            bump(&shared.counters.names_allowed, 1);
                            shared.decider.resolved(&query.name, addrs.iter().map(|(a, _)| *a));
                            query.answer(rcode, &addrs)
                        }
                        Err(_) => query.answer(dns::RCODE_SERVFAIL, &[]),
                    };
                    let _ = socket.send_to(&answer, from).await;
                });
                continue;
            }
        };
        let _ = socket.send_to(&answer, from).await;
    }
}

async fn ask_upstream(upstream: SocketAddr, name: &str) -> std::io::Result<(u8, Vec<(Ipv4Addr, u32)>)> {
    let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    socket.connect(upstream).await?;
    // An id the sandbox cannot predict: the low bits of the clock and the port.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    let id = (nanos as u16) ^ socket.local_addr()?.port().rotate_left(7);
    socket.send(&dns::a_query(id, name)).await?;
    let mut buf = vec![0u8; 4096];
    let deadline = tokio::time::Instant::now() + UPSTREAM_DNS_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream resolver"))??;
        if let Some(answer) = dns::read_a_answer(&buf[..n], id) {
            return Ok(answer);
        }
    }
}

/// The destination a redirected connection was for (`SO_ORIGINAL_DST`).
fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddrV4> {
    use std::os::fd::AsRawFd;
    // SAFETY: getsockopt into a sockaddr_in of the size we pass.
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::getsockopt(stream.as_raw_fd(), libc::SOL_IP, libc::SO_ORIGINAL_DST, (&raw mut addr).cast(), &mut len);
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), u16::from_be(addr.sin_port)))
    }
}

/// Makes the close a reset (SO_LINGER 0), so the client sees "refused".
/// Set on the socket directly: tokio deprecates its setter because a
/// nonzero linger blocks on close, which a zero one never does.
fn reset_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a linger struct of the size we pass.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn proxy_loop(listener: TcpListener, shared: Shared) {
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&open).acquire_owned().await else { return };
        let Ok((stream, _)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            proxy_one(stream, shared).await;
            drop(permit);
        });
    }
}

/// Reads the client's first bytes, up to a whole ClientHello or
/// [`FIRST_BYTES`]: what it asked for, and the bytes to pass on.
async fn first_bytes(stream: &mut TcpStream) -> (Option<Option<String>>, Vec<u8>) {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + FIRST_BYTES;
    let mut chunk = [0u8; 4096];
    loop {
        match sni::client_hello(&buf) {
            Hello::Name(n) => return (Some(Some(n)), buf),
            Hello::NoName | Hello::Malformed => return (Some(None), buf),
            Hello::NotTls => return (None, buf),
            Hello::Incomplete => {}
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            // Closed, failed, or silent: decide on what came.
            _ => return (if buf.is_empty() { None } else { Some(None) }, buf),
        }
    }
}

async fn proxy_one(mut stream: TcpStream, shared: Shared) {
    let Ok(dst) = original_dst(&stream) else { return };
    let (hello, head) = first_bytes(&mut stream).await;
    let server_name = hello.as_ref().map(|h| h.as_deref());
    match shared.decider.connection(*dst.ip(), dst.port(), server_name) {
        Verdict::Deny(d) => {
            bump(&shared.counters.connections_denied, 1);
            shared.reporter.deny(Denial {
                protocol: Protocol::Tcp,
                destination: dst.ip().to_string(),
                port: dst.port(),
                name: hello.flatten().unwrap_or_default(),
                missing_rule: d.missing_rule,
                reason: d.reason,
                suppressed: 0,
            });
            reset_on_close(&stream);
        }
        Verdict::Allow(_) => {
            let Ok(Ok(mut upstream)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(SocketAddr::V4(dst))).await else {
                reset_on_close(&stream);
                return;
            };
            bump(&shared.counters.connections_allowed, 1);
            if upstream.write_all(&head).await.is_err() {
                return;
            }
            bump(&shared.counters.bytes_out, head.len() as u64);
            if let Ok((out, back)) = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await {
                bump(&shared.counters.bytes_out, out);
                bump(&shared.counters.bytes_in, back);
            }
        }
    }
}

/// Where a datagram redirected to the sink was going: the conntrack entry
/// of its source port (the redirect rewrote the destination).
fn datagram_destination(sandbox: Ipv4Addr, sport: u16) -> Option<(String, u16)> {
    let table = std::fs::read_to_string("/proc/net/nf_conntrack").ok()?;
    let (src, sport) = (format!("src={sandbox}"), format!("sport={sport}"));
    table.lines().filter(|l| l.contains(" udp ")).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // The first src/dst/sport/dport are the original direction's.
        let first = |key: &str| fields.iter().find_map(|f| f.strip_prefix(key));
        if fields.iter().find(|f| f.starts_with("src=")) != Some(&src.as_str()) || fields.iter().find(|f| f.starts_with("sport=")) != Some(&sport.as_str()) {
            return None;
        }
        Some((first("dst=")?.to_string(), first("dport=")?.parse().ok()?))
    })
}

async fn sink_loop(socket: UdpSocket, sandbox: Ipv4Addr, shared: Shared) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((_, from)) = socket.recv_from(&mut buf).await else { continue };
        bump(&shared.counters.datagrams_denied, 1);
        let (destination, port) = datagram_destination(sandbox, from.port()).unwrap_or_else(|| ("unknown".into(), 0));
        shared.reporter.deny(Denial {
            protocol: Protocol::Udp,
            missing_rule: String::new(),
            reason: format!("UDP goes only to the sandbox's resolver ({destination}:{port} asked)"),
            destination,
            port,
            name: String::new(),
            suppressed: 0,
        });
    }
}
