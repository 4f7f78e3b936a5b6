//! Egress allow-lists end to end: `agentd sandbox run --network egress` in a
//! test network namespace ("node"), beside another ("net") that stands in
//! for the internet: HTTP on two ports, a TLS-like server on 443 (it only
//! reads a ClientHello and answers), a UDP port, and the resolver the
//! gateway asks, which knows two names. Everything lives in namespaces the
//! test makes; the gateway's slot locks in a directory of the test's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentd_egress::{dns, sni};
use agentd_testkit::netns::{Fabric, Host};

use crate::support::agentd_bin;

/// The gateway of slot 0 (the test's lock directory is empty): where the
/// sandbox's resolver is.
const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 127, 0, 1);
const ALLOWED: &str = "allowed.test";
const OTHER: &str = "other.test";
const TYPE_TXT: u16 = 16;
/// The "net" host's public-looking address (TEST-NET-3), added inside its
/// namespace with a route to it in the node's: names resolve to it, since a
/// private address (the fabric's) is reached through a name only if a rule
/// names it.
const PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// A name that resolves to the fabric's private address.
const PRIVATE_NAME: &str = "private.test";

/// What the test's servers saw.
#[derive(Default)]
struct Seen {
    /// Names and types the upstream resolver was asked.
    asked: Mutex<Vec<(String, u16)>>,
    /// Requests per HTTP port, ClientHellos on 443, datagrams on the UDP port,
    /// connections to the node's own listeners.
    http_8080: AtomicUsize,
    http_8081: AtomicUsize,
    hellos: AtomicUsize,
    datagrams: AtomicUsize,
    /// Datagrams to the "net" host's port 5353: what a resolver answering a
    /// spoofed query would send there.
    reflected: AtomicUsize,
    node_services: AtomicUsize,
}

struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Accepts on `listener` until stopped, handing each connection to `serve`.
fn serve_tcp(listener: TcpListener, stop: Arc<AtomicBool>, serve: impl Fn(TcpStream) + Send + 'static) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    serve(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

fn serve_udp(socket: UdpSocket, stop: Arc<AtomicBool>, serve: impl Fn(&UdpSocket, &[u8], SocketAddr) + Send + 'static) -> JoinHandle<()> {
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                serve(&socket, &buf[..n], from);
            }
        }
    })
}

fn http_reply(mut s: TcpStream, port: u16) {
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return,
        }
    }
    let body = format!("hello-{port}");
    let _ = write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
}

fn start_servers(net: &Host, node: &Host, seen: &Arc<Seen>) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = |mut c: std::process::Command| assert!(c.status().unwrap().success());
    let mut add = net.command("ip");
    add.args(["addr", "add", &format!("{PUBLIC}/32"), "dev", "eth0"]);
    ok(add);
    let mut route = node.command("ip");
    route.args(["route", "add", &format!("{PUBLIC}/32"), "via", &net.addr().to_string()]);
    ok(route);
    let (ip, private) = (PUBLIC, net.addr());
    let mut threads = Vec::new();
    for port in [8080u16, 8081] {
        let seen = Arc::clone(seen);
        let listener = net.listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).unwrap();
        threads.push(serve_tcp(listener, Arc::clone(&stop), move |s| {
            let counter = if port == 8080 { &seen.http_8080 } else { &seen.http_8081 };
            counter.fetch_add(1, Ordering::Relaxed);
            http_reply(s, port);
        }));
    }
    let tls_seen = Arc::clone(seen);
    threads.push(serve_tcp(net.listen(SocketAddr::from((ip, 443))).unwrap(), Arc::clone(&stop), move |mut s| {
        let mut buf = [0u8; 4096];
        if let Ok(n) = s.read(&mut buf)
            && n > 0
        {
            tls_seen.hellos.fetch_add(1, Ordering::Relaxed);
            let _ = s.write_all(b"tls-ok");
        }
    }));
    let dns_seen = Arc::clone(seen);
    let resolver = net.within(move || UdpSocket::bind((private, 53))).unwrap();
    threads.push(serve_udp(resolver, Arc::clone(&stop), move |socket, msg, from| {
        let Ok(query) = dns::Query::parse(msg) else { return };
        dns_seen.asked.lock().unwrap().push((query.name.clone(), query.qtype));
        let answer = if (query.name == ALLOWED || query.name == OTHER) && query.qtype == dns::TYPE_A {
            query.answer(dns::RCODE_OK, &[(ip, 300)])
        } else if query.name == PRIVATE_NAME && query.qtype == dns::TYPE_A {
            query.answer(dns::RCODE_OK, &[(private, 300)])
        } else {
            query.answer(3, &[])
        };
        let _ = socket.send_to(&answer, from);
    }));
    let udp_seen = Arc::clone(seen);
    let udp = net.within(move || UdpSocket::bind((ip, 9999))).unwrap();
    threads.push(serve_udp(udp, Arc::clone(&stop), move |_, _, _| {
        udp_seen.datagrams.fetch_add(1, Ordering::Relaxed);
    }));
    let reflected = Arc::clone(seen);
    let udp = net.within(move || UdpSocket::bind((private, 5353))).unwrap();
    threads.push(serve_udp(udp, Arc::clone(&stop), move |_, _, _| {
        reflected.reflected.fetch_add(1, Ordering::Relaxed);
    }));
    // The node's own services: on its fabric address and on every address.
    for addr in [SocketAddr::from((node.addr(), 5556)), SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5557))] {
        let seen = Arc::clone(seen);
        threads.push(serve_tcp(node.listen(addr).unwrap(), Arc::clone(&stop), move |_| {
            seen.node_services.fetch_add(1, Ordering::Relaxed);
        }));
    }
    Servers { stop, threads }
}

/// Runs `f` on a thread in the network namespace of process `pid`.
fn in_netns_of<T: Send>(pid: i32, f: impl FnOnce() -> T + Send) -> T {
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// The child processes of `pid` (any of its threads').
fn children(pid: u32) -> Vec<i32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            found.extend(list.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    found
}

/// Asks the sandbox's resolver for `name` of `qtype`: the rcode and addresses.
fn ask(name: &str, qtype: u16) -> (u8, Vec<Ipv4Addr>) {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut query = dns::a_query(0x4242, name);
    let at = query.len() - 4;
    query[at..at + 2].copy_from_slice(&qtype.to_be_bytes());
    socket.send_to(&query, (GATEWAY, 53)).unwrap();
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).unwrap_or_else(|e| panic!("no answer for {name} type {qtype}: {e}"));
    let (rcode, addrs) = dns::read_a_answer(&buf[..n], 0x4242).expect("an answer to our query");
    (rcode, addrs.into_iter().map(|(a, _)| a).collect())
}

/// A ClientHello for `name` to `addr`; what came back (empty if refused).
fn tls_hello(addr: SocketAddr, name: &str) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) else { return Vec::new() };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&sni::sample_client_hello(Some(name)));
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn stop(mut child: Child) -> std::process::ExitStatus {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().unwrap()
}

fn links_and_tables(node: &Host) -> String {
    let links = node.command("ip").args(["-o", "link"]).output().unwrap();
    let tables = node.command("nft").args(["list", "tables"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout).lines().filter(|l| l.contains("aeg")).collect::<Vec<_>>().join("\n");
    let tables = String::from_utf8_lossy(&tables.stdout).lines().filter(|l| l.contains("agentd_egress")).collect::<Vec<_>>().join("\n");
    format!("{links}{tables}")
}

/// [`links_and_tables`] once empty, or at the end of `within`: a killed
/// sandbox's end of the veth goes with its network namespace, which the
/// kernel tears down asynchronously.
fn gone_within(node: &Host, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = links_and_tables(node);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_egress_sandbox_reaches_what_its_rules_allow_and_nothing_else() {
    let fabric = Fabric::new().unwrap();
    let node = fabric.host("node").unwrap();
    let net = fabric.host("net").unwrap();
    let seen = Arc::new(Seen::default());
    let servers = start_servers(&net, &node, &seen);
    let locks = tempfile::tempdir().unwrap();
    let (n, g) = (net.addr(), node.addr());
    let script = format!(
        "curl -sS -m 5 http://{ALLOWED}:8080/ && echo ' ALLOWED-OK'
curl -sS -m 5 http://{ALLOWED}:8081/ || echo PORT-REFUSED
curl -sS -m 5 http://{OTHER}:8080/ || echo NAME-REFUSED
curl -sS -m 5 http://{PUBLIC}:8081/ || echo IP-REFUSED
curl -sS -m 5 http://{PRIVATE_NAME}:8080/ || echo PRIVATE-REFUSED
curl -sS -m 5 http://169.254.169.254/ || echo METADATA-REFUSED
curl -sS -m 5 http://{g}:5556/ || echo HOSTADDR-REFUSED
curl -sS -m 5 http://{GATEWAY}:5557/ || echo GATEWAY-REFUSED
echo READY
sleep 60
"
    );
    let mut child = node
        .command(agentd_bin())
        .args(["sandbox", "run", "--network", "egress", "--allow", &format!("{ALLOWED}:8080"), "--allow", &format!("{ALLOWED}:443")])
        .args(["--allow", &format!("{PRIVATE_NAME}:8080"), "--"])
        .args(["sh", "-c", &script])
        .env("AGENTD_EGRESS_DNS", format!("{n}:53"))
        .env("AGENTD_EGRESS_LOCK_DIR", locks.path())
        .env("AGENTD_EGRESS_USAGE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let err_reader = {
        let (pipe, stderr) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = stderr.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stdout = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while stdout.last().map(String::as_str) != Some("READY") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => stdout.push(line),
            Err(_) => {
                let status = stop(child);
                panic!("no READY ({status}); stdout {stdout:?}; stderr:\n{}", stderr.lock().unwrap());
            }
        }
    }
    let stdout = stdout.join("\n");
    let sandbox = children(child.id());
    assert_eq!(sandbox.len(), 1, "one PID 1 under agentd: {sandbox:?}");
    let tls = SocketAddr::from((PUBLIC, 443));
    let (a, other_a, txt, other_txt, refused_sni, allowed_sni) = in_netns_of(sandbox[0], || {
        let a = ask(ALLOWED, dns::TYPE_A);
        let other_a = ask(OTHER, dns::TYPE_A);
        let txt = ask(ALLOWED, TYPE_TXT);
        let other_txt = ask(OTHER, TYPE_TXT);
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        udp.send_to(b"anyone there?", (PUBLIC, 9999)).unwrap();
        let refused_sni = tls_hello(tls, OTHER);
        let allowed_sni = tls_hello(tls, ALLOWED);
        // A query from a forged source (the "net" host's address, taken by
        // the sandbox's root): no answer may go there.
        let added = std::process::Command::new("ip").args(["addr", "add", &format!("{n}/32"), "dev", "eth0"]).status().unwrap();
        assert!(added.success());
        let forged = UdpSocket::bind((n, 5353)).unwrap();
        forged.send_to(&dns::a_query(7, ALLOWED), (GATEWAY, 53)).unwrap();
        (a, other_a, txt, other_txt, refused_sni, allowed_sni)
    });
    // The datagram's report and the sink's read.
    std::thread::sleep(Duration::from_millis(300));
    let status = stop(child);
    err_reader.join().unwrap();
    out_reader.join().unwrap();
    let stderr = stderr.lock().unwrap().clone();
    drop(servers);
    let context = format!("status {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");

    // What is allowed works, through the resolver and the proxy.
    assert!(stdout.contains("hello-8080 ALLOWED-OK"), "{context}");
    assert_eq!(a, (dns::RCODE_OK, vec![PUBLIC]), "{context}");
    assert_eq!(allowed_sni, b"tls-ok", "{context}");
    // Everything else is refused...
    for refused in ["PORT-REFUSED", "NAME-REFUSED", "IP-REFUSED", "PRIVATE-REFUSED", "METADATA-REFUSED", "HOSTADDR-REFUSED", "GATEWAY-REFUSED"] {
        assert!(stdout.contains(refused), "{refused}: {context}");
    }
    assert_eq!(other_a.0, dns::RCODE_REFUSED, "{context}");
    assert_eq!(txt.0, dns::RCODE_REFUSED, "{context}");
    assert_eq!(other_txt.0, dns::RCODE_REFUSED, "{context}");
    assert!(refused_sni.is_empty(), "{refused_sni:?}: {context}");
    // ... never reaching the other side ...
    assert_eq!(seen.http_8081.load(Ordering::Relaxed), 0, "{context}");
    assert!(seen.http_8080.load(Ordering::Relaxed) >= 1, "{context}");
    assert_eq!(seen.hellos.load(Ordering::Relaxed), 1, "only the allowed name's hello got through: {context}");
    assert_eq!(seen.datagrams.load(Ordering::Relaxed), 0, "{context}");
    assert_eq!(seen.reflected.load(Ordering::Relaxed), 0, "a forged query is not answered: {context}");
    assert_eq!(seen.node_services.load(Ordering::Relaxed), 0, "{context}");
    let asked = seen.asked.lock().unwrap().clone();
    assert!(asked.iter().all(|(name, qtype)| (name == ALLOWED || name == PRIVATE_NAME) && *qtype == dns::TYPE_A), "only allowed A queries go upstream: {asked:?}");
    // ... and each refusal is reported, with the rule that was missing.
    for line in [
        format!("egress denied: tcp {PUBLIC}:8081"),
        format!("egress denied: tcp {n}:8080: {n} is a private address"),
        format!("missing rule: {ALLOWED}:8081"),
        format!("egress denied: name {OTHER}"),
        format!("missing rule: {OTHER}"),
        "egress denied: tcp 169.254.169.254:80".to_string(),
        format!("egress denied: tcp {g}:5556"),
        format!("egress denied: tcp {GATEWAY}:5557"),
        format!("egress denied: udp {PUBLIC}:9999"),
        format!("(TLS name {OTHER})"),
        format!("egress denied: name {ALLOWED}: only A and AAAA queries are answered"),
    ] {
        assert!(stderr.contains(&line), "{line:?} not reported: {context}");
    }
    assert!(stderr.contains("egress usage: connections allowed 2"), "{context}");
    eprintln!("{context}");
    // Nothing is left: no link, no rules.
    assert_eq!(links_and_tables(&node), "", "{context}");
}

#[test]
fn a_malformed_rule_is_refused_naming_it() {
    let out = std::process::Command::new(agentd_bin())
        .args(["sandbox", "run", "--network", "egress", "--allow", "ok.example.com", "--allow", "api.example.com:99999", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("api.example.com:99999"), "{stderr}");
    let out = std::process::Command::new(agentd_bin()).args(["sandbox", "run", "--allow", "a.com", "--", "true"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow needs --network egress"));
}

/// The node's path: a container profile with an egress policy (a bad rule
/// is 422 `invalid_network_policy` naming it), its sandbox reaches the
/// allowed name and nothing else, each refusal a `sandbox.egress_denied`
/// event on its session; the delete and the node's stop leave no link or
/// rules. `agentd up` runs in the "node" namespace host, reached through a
/// relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_sandbox_with_a_policy_reports_its_refusals_as_events() {
    use crate::support::{Agentd, session_body};
    use reqwest::StatusCode;
    use serde_json::json;

    let fabric = Fabric::new().unwrap();
    let node = fabric.host("node").unwrap();
    let net = fabric.host("net").unwrap();
    let seen = Arc::new(Seen::default());
    let servers = start_servers(&net, &node, &seen);
    let n = net.addr();
    let locks = tempfile::tempdir().unwrap();
    let state = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut cmd = node.command(agentd_bin());
    cmd.args(["up", "--listen", "127.0.0.1:0", "--state-dir"]).arg(state.path());
    let dns = format!("{n}:53");
    let lock_dir = locks.path().display().to_string();
    let env = [("AGENTD_EGRESS_DNS", dns.as_str()), ("AGENTD_EGRESS_LOCK_DIR", lock_dir.as_str())];
    let state_path = state.path().to_owned();
    let mut agentd = Agentd::start_command(cmd, state_path, Some(state), &env).await;
    let forward = agentd.reach_in(&node).await;

    let (status, problem) = agentd.post("/v1/containers", &json!({"container_profile": {"network": {"egress": {"allow": ["ok.test", "bad..test:80"]}}}})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_network_policy")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("bad..test:80"), "{problem}");

    let mut body = session_body(&[]);
    body["container_profile"] = json!({"network": {"egress": {"allow": [format!("{ALLOWED}:8080")]}}});
    let (session, mut events) = agentd.create_streaming(&body).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{session}")).await;
    let container = view["container_id"].as_str().unwrap().to_string();
    // The agent works through the policy: a command it runs in the sandbox
    // (an ACP terminal) fetches from the allowed name, and not from another.
    let got = crate::support::turn(&agentd, &session, &mut events, &format!("/run curl -sS -m 5 http://{ALLOWED}:8080/")).await;
    assert!(crate::support::said(&got).contains("hello-8080\n[exit code 0]"), "{got:?}\n{}", agentd.log());
    let got = crate::support::turn(&agentd, &session, &mut events, &format!("/run curl -sS -m 5 http://{OTHER}:8080/")).await;
    assert!(crate::support::said(&got).contains("[exit code 6]"), "{got:?}");
    let during = got.iter().find(|e| e.event == "sandbox.egress_denied").expect("the refused name is reported in the turn").json();
    assert_eq!((during["protocol"].as_str(), during["destination"].as_str()), (Some("dns"), Some(OTHER)), "{during}");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(agentd.sandboxes_dir().join(&container).join("sandbox.json")).unwrap()).unwrap();
    let pid = record["pid"].as_i64().unwrap() as i32;
    let (allowed, refused_port, other) = tokio::task::spawn_blocking(move || {
        in_netns_of(pid, || {
            let (_, addrs) = ask(ALLOWED, dns::TYPE_A);
            let get = |port: u16| {
                let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::from((addrs[0], port)), Duration::from_secs(5)) else { return String::new() };
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                let mut got = String::new();
                let _ = s.read_to_string(&mut got);
                got
            };
            (get(8080), get(8081), ask(OTHER, dns::TYPE_A).0)
        })
    })
    .await
    .unwrap();
    assert!(allowed.ends_with("hello-8080"), "{allowed:?}\n{}", agentd.log());
    assert_eq!(refused_port, "");
    assert_eq!(other, dns::RCODE_REFUSED);
    let mut denied = Vec::new();
    while denied.len() < 2 {
        let event = events.next().await.expect("the stream goes on");
        if event.event == "sandbox.egress_denied" {
            denied.push(event.json());
        }
    }
    assert_eq!(denied[0]["container_id"], container.as_str());
    assert_eq!((denied[0]["protocol"].as_str(), denied[0]["port"].as_u64()), (Some("tcp"), Some(8081)), "{denied:?}");
    assert_eq!(denied[0]["missing_rule"], format!("{ALLOWED}:8081"));
    assert_eq!((denied[1]["protocol"].as_str(), denied[1]["destination"].as_str()), (Some("dns"), Some(OTHER)), "{denied:?}");
    assert_eq!(seen.http_8081.load(Ordering::Relaxed), 0);
    // The counters, in the container's usage.
    let (_, view) = agentd.get(&format!("/v1/containers/{container}")).await;
    let egress = &view["usage"]["egress"];
    assert_eq!(egress["connections_allowed"], 2, "the agent's fetch and ours: {view}");
    assert_eq!(egress["connections_denied"], 1, "{view}");
    assert!(egress["names_denied"].as_u64().unwrap() >= 2, "{view}");
    assert!(egress["bytes_in"].as_u64().unwrap() > 0, "{view}");

    let (status, _) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert!(status.is_success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !links_and_tables(&node).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(links_and_tables(&node), "", "the delete removes the link and rules");
    drop(events);
    drop(agentd);
    drop(forward);
    drop(servers);
}

/// A gateway whose process dies (SIGKILL: no cleanup of its own) leaves its
/// rules; the next process to take the slot, or a node starting, removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_a_killed_gateway_left_are_removed() {
    use crate::support::Agentd;

    let fabric = Fabric::new().unwrap();
    let node = fabric.host("node").unwrap();
    let locks = tempfile::tempdir().unwrap();
    let run = |script: &str| {
        node.command(agentd_bin())
            .args(["sandbox", "run", "--network", "egress", "--allow", "example.com", "--", "sh", "-c", script])
            .env("AGENTD_EGRESS_DNS", "192.0.2.53:53")
            .env("AGENTD_EGRESS_LOCK_DIR", locks.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let killed_and_left = |node: &Host| {
        let mut child = run("echo READY; sleep 60");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "READY");
        child.kill().unwrap();
        child.wait().unwrap();
        crate::hostile::host::remove_run_scratch(child.id());
        let left = links_and_tables(node);
        assert!(left.contains("agentd_egress_0"), "the killed run's rules stay: {left:?}");
    };
    killed_and_left(&node);
    let status = run("true").wait().unwrap();
    assert!(status.success());
    assert_eq!(gone_within(&node, Duration::from_secs(5)), "", "the next run on the slot removed them");

    killed_and_left(&node);
    let state = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut cmd = node.command(agentd_bin());
    cmd.args(["up", "--listen", "127.0.0.1:0", "--state-dir"]).arg(state.path());
    let lock_dir = locks.path().display().to_string();
    let state_path = state.path().to_owned();
    let agentd = Agentd::start_command(cmd, state_path, Some(state), &[("AGENTD_EGRESS_LOCK_DIR", lock_dir.as_str())]).await;
    assert_eq!(gone_within(&node, Duration::from_secs(5)), "", "a starting node removed them");
    drop(agentd);
}

/// Figures, not a check (`--run-ignored only --no-capture`): connection
/// setup (connect, one byte each way) and throughput to a host in another
/// namespace, from the node's namespace directly and from an egress
/// sandbox through its gateway; and `sandbox run -- true` with a policy
/// against `--network none`.
#[test]
#[ignore = "prints figures"]
fn egress_figures() {
    const CONNECTIONS: usize = 300;
    const BYTES: usize = 256 << 20;
    let fabric = Fabric::new().unwrap();
    let node = fabric.host("node").unwrap();
    let net = fabric.host("net").unwrap();
    let n = net.addr();
    // Blocking accepts (the other tests' servers poll): each measurement
    // is served by a thread that takes exactly its connections.
    let echo_listener = net.listen(SocketAddr::from((n, 7000))).unwrap();
    let bulk_listener = net.listen(SocketAddr::from((n, 7001))).unwrap();
    let serve = move |echo: TcpListener, bulk: TcpListener| {
        std::thread::spawn(move || {
            for _ in 0..CONNECTIONS {
                let (mut s, _) = echo.accept().unwrap();
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                }
            }
            let (mut s, _) = bulk.accept().unwrap();
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..BYTES / chunk.len() {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
        })
    };
    let measure = move || {
        let started = Instant::now();
        for _ in 0..CONNECTIONS {
            let mut s = TcpStream::connect((n, 7000)).unwrap();
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
        }
        let setup = started.elapsed() / CONNECTIONS as u32;
        let started = Instant::now();
        let mut s = TcpStream::connect((n, 7001)).unwrap();
        s.write_all(b"go").unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while total < BYTES {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => total += k,
            }
        }
        (setup, total as f64 / started.elapsed().as_secs_f64() / (1 << 20) as f64)
    };
    let server = serve(echo_listener.try_clone().unwrap(), bulk_listener.try_clone().unwrap());
    let (host_setup, host_mibs) = node.within(|| Ok(measure())).unwrap();
    server.join().unwrap();
    let server = serve(echo_listener, bulk_listener);
    let locks = tempfile::tempdir().unwrap();
    let mut child = node
        .command(agentd_bin())
        .args(["sandbox", "run", "--network", "egress", "--allow", &format!("{n}:7000"), "--allow", &format!("{n}:7001"), "--"])
        .args(["sh", "-c", "echo READY; sleep 120"])
        .env("AGENTD_EGRESS_DNS", format!("{n}:53"))
        .env("AGENTD_EGRESS_LOCK_DIR", locks.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let sandbox = children(child.id())[0];
    let (egress_setup, egress_mibs) = in_netns_of(sandbox, measure);
    server.join().unwrap();
    stop_child_quietly(child);
    let time_runs = |network: &[&str]| {
        let started = Instant::now();
        for _ in 0..20 {
            let status = node
                .command(agentd_bin())
                .args(["sandbox", "run"])
                .args(network)
                .args(["--", "true"])
                .env("AGENTD_EGRESS_DNS", format!("{n}:53"))
                .env("AGENTD_EGRESS_LOCK_DIR", locks.path())
                .status()
                .unwrap();
            assert!(status.success());
        }
        started.elapsed() / 20
    };
    let none = time_runs(&["--network", "none"]);
    let egress = time_runs(&["--network", "egress", "--allow", "example.com"]);
    println!("connection setup (connect + 1 byte each way, mean of {CONNECTIONS}): host {host_setup:?}, egress {egress_setup:?}, ratio {:.2}", egress_setup.as_secs_f64() / host_setup.as_secs_f64());
    println!("throughput ({} MiB): host {host_mibs:.0} MiB/s, egress {egress_mibs:.0} MiB/s, ratio {:.2}", BYTES >> 20, egress_mibs / host_mibs);
    println!("sandbox run -- true (mean of 20): none {none:?}, egress {egress:?}, ratio {:.2}", egress.as_secs_f64() / none.as_secs_f64());
}

fn stop_child_quietly(child: Child) {
    let _ = stop(child);
}

/// Live restore takes back what the node left running, but not an egress
/// sandbox: its gateway (resolver, proxy, what the sandbox resolved) died
/// with the node, so it is stopped and reported lost, and its link and
/// rules are removed, rather than left running without a way out or with
/// one nobody enforces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_restore_stops_an_egress_sandbox_instead_of_taking_it_back() {
    use crate::support::host::{become_subreaper, reap_orphans, unique_id_base};
    use crate::support::{Agentd, procfs, session_body};
    use reqwest::StatusCode;
    use serde_json::json;

    become_subreaper();
    let fabric = Fabric::new().unwrap();
    let node = fabric.host("node").unwrap();
    let locks = tempfile::tempdir().unwrap();
    let state = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let id_base = unique_id_base().to_string();
    let flags = ["--live-restore", "--id-base", id_base.as_str(), "--max-sandboxes", "4"];
    let up = |state: &std::path::Path| {
        let mut cmd = node.command(agentd_bin());
        cmd.args(["up", "--listen", "127.0.0.1:0", "--state-dir"]).arg(state).args(flags);
        cmd
    };
    let lock_dir = locks.path().display().to_string();
    let env = [("AGENTD_EGRESS_DNS", "192.0.2.53:53"), ("AGENTD_EGRESS_LOCK_DIR", lock_dir.as_str())];
    let state_path = state.path().to_owned();
    let mut agentd = Agentd::start_command(up(&state_path), state_path.clone(), Some(state), &env).await;
    let forward = agentd.reach_in(&node).await;
    let mut body = session_body(&[]);
    body["container_profile"] = json!({"network": {"egress": {"allow": ["example.com"]}}});
    let (status, view) = agentd.post("/v1/sessions", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{view}\n{}", agentd.log());
    let container = view["container_id"].as_str().unwrap().to_string();
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(agentd.sandboxes_dir().join(&container).join("sandbox.json")).unwrap()).unwrap();
    let pid = record["pid"].as_i64().unwrap() as u32;

    agentd.kill9();
    drop(forward);
    assert!(procfs::is_alive(pid), "the sandbox outlives agentd");
    assert!(links_and_tables(&node).contains("agentd_egress"), "its rules stay while the node is away");
    agentd.restart_command(up(&state_path), &env).await;
    let forward = agentd.reach_in(&node).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::is_alive(pid) && Instant::now() < deadline {
        reap_orphans();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!procfs::is_alive(pid), "the egress sandbox was stopped\n{}", agentd.log());
    assert!(agentd.log().contains("an egress sandbox's gateway cannot be taken back"), "{}", agentd.log());
    assert_eq!(gone_within(&node, Duration::from_secs(5)), "", "its link and rules are removed");
    drop(agentd);
    drop(forward);
    reap_orphans();
}
