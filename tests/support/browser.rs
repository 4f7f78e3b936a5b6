//! Headless Chromium (Debian's `chromium`) driven over the DevTools
//! protocol, for the dashboard's tests.
//!
//! A small client over `--remote-debugging-pipe` rather than a crate: the
//! browser reads the protocol's JSON messages from fd 3 and writes its own
//! to fd 4, each ended by a NUL, so there is no port to pick or leak, no
//! websocket and no endpoint to discover, and nothing new to build (the
//! maintained crate, chromiumoxide, compiles the whole generated protocol
//! and a websocket stack for the dozen commands used here).
//!
//! Every browser process carries a marker in its environment: at the end
//! the browser is asked to close, then its process group is killed, then
//! any process still carrying the marker (the crash handler leaves the
//! group with `setsid`) is killed and waited for; the throwaway profile
//! is removed after that. Outside the loopback, nothing is reachable: a
//! dead proxy takes every other address.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::oneshot;

/// Where Debian puts the browser itself (`/usr/bin/chromium` is a shell
/// wrapper that adds flags from /etc/chromium.d).
const CANDIDATES: &[&str] = &["/usr/lib/chromium/chromium", "/usr/bin/chromium"];

const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

pub struct Browser {
    child: Option<Child>,
    /// The throwaway profile, removed once no browser process is left.
    profile: Option<tempfile::TempDir>,
    /// `AGENTD_TEST_BROWSER=<marker>` in every browser process's environment.
    marker: String,
    writer: Mutex<Option<File>>,
    pending: Pending,
    /// Every event the browser sent, in order.
    events: Arc<Mutex<Vec<Value>>>,
    next_id: AtomicU64,
    /// The browser's stderr, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
}

fn executable() -> PathBuf {
    CANDIDATES.iter().map(PathBuf::from).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("Chromium is missing (looked at {CANDIDATES:?}): run scripts/install-test-deps, which installs Debian's `chromium`")
    })
}

impl Browser {
    pub fn launch() -> Browser {
        let profile = tempfile::Builder::new().prefix("agentd-chromium-").tempdir().expect("a profile dir");
        let marker = format!("{}-{}", std::process::id(), profile.path().file_name().unwrap().to_string_lossy());
        // fd 3: what the browser reads; fd 4: what it writes.
        let (to_browser_r, to_browser_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("a pipe");
        let (from_browser_r, from_browser_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("a pipe");
        let (child_in, child_out) = (to_browser_r.as_raw_fd(), from_browser_w.as_raw_fd());
        let mut cmd = Command::new(executable());
        cmd.args([
            "--headless=new",
            // As root, Chromium's own sandbox cannot start.
            "--no-sandbox",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-breakpad",
            "--disable-crash-reporter",
            "--no-pings",
            "--mute-audio",
            "--hide-scrollbars",
            "--password-store=basic",
            "--use-mock-keychain",
            "--window-size=1280,900",
            // Loopback is reached directly (Chromium's implicit bypass);
            // anything else goes to a port where nothing listens.
            "--proxy-server=http://127.0.0.1:9",
            "--lang=en-US",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .env("AGENTD_TEST_BROWSER", &marker)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork
        // and exec. The ends are first moved above 10, so that placing one
        // at 3 cannot overwrite the other.
        unsafe {
            cmd.pre_exec(move || {
                let a = libc::fcntl(child_in, libc::F_DUPFD_CLOEXEC, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD_CLOEXEC, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start chromium");
        drop((to_browser_r, from_browser_w));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn({
            let log = Arc::clone(&log);
            move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            }
        });
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        std::thread::spawn({
            let (pending, events) = (Arc::clone(&pending), Arc::clone(&events));
            move || read_messages(File::from(from_browser_r), &pending, &events)
        });
        Browser {
            child: Some(child),
            profile: Some(profile),
            marker,
            writer: Mutex::new(Some(File::from(to_browser_w))),
            pending,
            events,
            next_id: AtomicU64::new(1),
            log,
        }
    }

    /// Sends one command (to a page's session, if given) and waits for its answer.
    pub async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        {
            let mut writer = self.writer.lock().unwrap();
            let Some(w) = writer.as_mut() else { return Err("the browser is closed".into()) };
            let mut bytes = serde_json::to_vec(&message).unwrap();
            bytes.push(0);
            w.write_all(&bytes).map_err(|e| format!("writing to the browser: {e}"))?;
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(format!("the browser went away during {method}; its log:\n{}", self.log())),
            Err(_) => Err(format!("{method}: no answer within {COMMAND_TIMEOUT:?}")),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// A new tab, attached (flat sessions) with the domains the tests watch.
    pub async fn page(&self) -> Page<'_> {
        let target = self.call(None, "Target.createTarget", json!({"url": "about:blank"})).await.expect("a tab");
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = self.call(None, "Target.attachToTarget", json!({"targetId": target_id, "flatten": true})).await.expect("attach");
        let session = attached["sessionId"].as_str().unwrap().to_string();
        let page = Page { browser: self, session, seen: Mutex::new(0), allowed: Mutex::new(Vec::new()) };
        for domain in ["Page", "Runtime", "Network", "Log"] {
            page.call(&format!("{domain}.enable"), json!({})).await;
        }
        page
    }

    /// Closes the browser and checks that it left nothing: no process and
    /// no profile directory.
    pub fn close(mut self) {
        let profile = self.shutdown();
        assert!(!profile.exists(), "the profile {} is left", profile.display());
        let left = marked_processes(&self.marker);
        assert!(left.is_empty(), "browser processes left: {left:?}");
    }

    /// Stops every browser process, removes the profile; returns its path.
    fn shutdown(&mut self) -> PathBuf {
        let profile = self.profile.as_ref().map(|p| p.path().to_owned()).unwrap_or_default();
        // A closed pipe makes the browser quit by itself.
        self.writer.lock().unwrap().take();
        // Every browser process, to see each one gone at the end.
        let mut seen: Vec<i32> = marked_processes(&self.marker);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        // Helpers that left the group (the crash handler), and any group
        // member still exiting.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = marked_processes(&self.marker);
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                seen.push(pid);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Killed helpers outside the group are reparented to init, which
        // reaps them shortly after: wait for that, so none is left even as
        // a zombie when the test ends.
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(dir) = self.profile.take() {
            let _ = dir.close();
        }
        profile
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if self.child.is_some() || self.profile.is_some() {
            self.shutdown();
        }
    }
}

/// Pids of processes whose environment holds the marker (zombies have none).
fn marked_processes(marker: &str) -> Vec<i32> {
    let needle = format!("AGENTD_TEST_BROWSER={marker}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        if environ.split(|b| *b == 0).any(|var| var == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

fn read_messages(mut from: File, pending: &Pending, events: &Mutex<Vec<Value>>) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(end) = buf.iter().position(|b| *b == 0) {
            let message: Vec<u8> = buf.drain(..=end).collect();
            let Ok(value) = serde_json::from_slice::<Value>(&message[..end]) else { continue };
            match value.get("id").and_then(Value::as_u64) {
                Some(id) => {
                    if let Some(tx) = pending.lock().unwrap().remove(&id) {
                        let answer = match value.get("error") {
                            Some(e) => Err(e.to_string()),
                            None => Ok(value.get("result").cloned().unwrap_or(Value::Null)),
                        };
                        let _ = tx.send(answer);
                    }
                }
                None => events.lock().unwrap().push(value),
            }
        }
    }
    // The browser is gone: nothing will answer.
    pending.lock().unwrap().clear();
}

/// A failed request the test causes on purpose: its status (0 for a
/// network failure) and a part of its URL.
#[derive(Debug, Clone)]
pub struct Allowed {
    pub status: u16,
    pub url_part: String,
}

/// One tab.
pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
    /// How many of the browser's events `problems` has looked at.
    seen: Mutex<usize>,
    allowed: Mutex<Vec<Allowed>>,
}

impl Page<'_> {
    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await.unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    pub async fn goto(&self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'", "the page to load").await;
    }

    /// Evaluates `expression` (awaiting a promise) and returns its value;
    /// a thrown exception fails the test.
    pub async fn eval(&self, expression: &str) -> Value {
        self.try_eval(expression).await.unwrap_or_else(|e| panic!("{e}\nin: {expression}"))
    }

    pub async fn try_eval(&self, expression: &str) -> Result<Value, String> {
        let answer = self.call("Runtime.evaluate", json!({"expression": expression, "awaitPromise": true, "returnByValue": true})).await;
        if let Some(details) = answer.get("exceptionDetails") {
            let text = details["exception"]["description"].as_str().or(details["text"].as_str()).unwrap_or("an exception");
            return Err(format!("the page threw: {text}"));
        }
        Ok(answer["result"]["value"].clone())
    }

    /// Waits (up to 20 s, looking every 100 ms) until `condition` is truthy.
    pub async fn wait_for(&self, condition: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(value) = self.try_eval(condition).await
                && !matches!(value, Value::Null | Value::Bool(false))
                && value != json!(0)
                && value != json!("")
            {
                return value;
            }
            if Instant::now() > deadline {
                let text = self.try_eval("document.body ? document.body.innerText : ''").await.unwrap_or_default();
                panic!("timed out waiting for {what} ({condition}); the page says:\n{}\nproblems: {:?}", text.as_str().unwrap_or(""), self.problems());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The centre of the first element matching `selector`, scrolled into view.
    async fn centre(&self, selector: &str) -> (f64, f64) {
        let js = format!(
            "(() => {{ const el = document.querySelector({s}); if (!el) return null; el.scrollIntoView({{block: 'center'}}); \
             const r = el.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            s = json!(selector)
        );
        let at = self.wait_for(&js, &format!("an element {selector}")).await;
        (at[0].as_f64().unwrap(), at[1].as_f64().unwrap())
    }

    /// A real mouse click (pressed and released) on the element's centre.
    pub async fn click(&self, selector: &str) {
        let (x, y) = self.centre(selector).await;
        self.call("Input.dispatchMouseEvent", json!({"type": "mouseMoved", "x": x, "y": y})).await;
        for kind in ["mousePressed", "mouseReleased"] {
            self.call("Input.dispatchMouseEvent", json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})).await;
        }
    }

    /// Focuses the element, selects what it holds, and types `text` over it.
    pub async fn type_into(&self, selector: &str, text: &str) {
        self.wait_for(&format!("document.querySelector({s})", s = json!(selector)), selector).await;
        self.eval(&format!("(() => {{ const el = document.querySelector({s}); el.focus(); el.select && el.select(); return true; }})()", s = json!(selector))).await;
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// Presses and releases a key: Enter, Tab, Escape.
    pub async fn press(&self, key: &str) {
        let (code, text) = match key {
            "Enter" => (13, "\r"),
            "Tab" => (9, ""),
            "Escape" => (27, ""),
            other => panic!("no key {other}"),
        };
        let mut down = json!({"type": "keyDown", "key": key, "code": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code});
        if !text.is_empty() {
            down["text"] = json!(text);
        }
        self.call("Input.dispatchKeyEvent", down).await;
        self.call("Input.dispatchKeyEvent", json!({"type": "keyUp", "key": key, "code": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code})).await;
    }

    /// The viewport: a laptop (1280 x 900) or a phone (390 x 844, touch).
    pub async fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.call("Emulation.setDeviceMetricsOverride", json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})).await;
    }

    /// A PNG of what the page shows, written to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true})).await;
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// The statuses of the answers so far to `method` requests whose URL ends with `url_end`.
    pub fn statuses(&self, method: &str, url_end: &str) -> Vec<u16> {
        let events = self.browser.events.lock().unwrap();
        let mut wanted = std::collections::HashSet::new();
        let mut statuses = Vec::new();
        for e in events.iter().filter(|e| e["sessionId"] == json!(self.session)) {
            let p = &e["params"];
            match e["method"].as_str().unwrap_or("") {
                "Network.requestWillBeSent" if p["request"]["method"] == method && p["request"]["url"].as_str().is_some_and(|u| u.ends_with(url_end)) => {
                    wanted.insert(p["requestId"].as_str().unwrap_or("").to_string());
                }
                "Network.responseReceived" if wanted.contains(p["requestId"].as_str().unwrap_or("")) => {
                    statuses.push(p["response"]["status"].as_u64().unwrap_or(0) as u16);
                }
                _ => {}
            }
        }
        statuses
    }

    /// Failed requests that are expected from now on (until `allow_none`).
    pub fn allow(&self, status: u16, url_part: &str) {
        self.allowed.lock().unwrap().push(Allowed { status, url_part: url_part.to_string() });
    }

    pub fn allow_none(&self) {
        self.allowed.lock().unwrap().clear();
    }

    /// What went wrong in the page since the last look: console errors,
    /// uncaught exceptions, error log entries (CSP violations among them),
    /// failed requests and 4xx/5xx answers not allowed. A request the page
    /// itself aborted (a stream closed on leaving its page) is no failure.
    pub fn problems(&self) -> Vec<String> {
        let events = self.browser.events.lock().unwrap();
        let mut seen = self.seen.lock().unwrap();
        let allowed = self.allowed.lock().unwrap();
        let is_allowed = |status: u16, url: &str| allowed.iter().any(|a| a.status == status && url.contains(&a.url_part));
        let mut urls: HashMap<String, String> = HashMap::new();
        let mut problems = Vec::new();
        for e in &events[..] {
            if e["method"] == "Network.requestWillBeSent" {
                urls.insert(e["params"]["requestId"].as_str().unwrap_or("").into(), e["params"]["request"]["url"].as_str().unwrap_or("").into());
            }
        }
        for e in &events[*seen..] {
            if e["sessionId"] != json!(self.session) {
                continue;
            }
            let p = &e["params"];
            match e["method"].as_str().unwrap_or("") {
                "Runtime.exceptionThrown" => {
                    let d = &p["exceptionDetails"];
                    problems.push(format!("uncaught: {}", d["exception"]["description"].as_str().or(d["text"].as_str()).unwrap_or("?")));
                }
                "Runtime.consoleAPICalled" if p["type"] == "error" || p["type"] == "assert" => {
                    let args: Vec<String> = p["args"].as_array().into_iter().flatten().map(|a| a["value"].as_str().map(str::to_string).unwrap_or_else(|| a["description"].as_str().unwrap_or("").to_string())).collect();
                    problems.push(format!("console.{}: {}", p["type"].as_str().unwrap(), args.join(" ")));
                }
                // Network errors are judged by the Network events below.
                "Log.entryAdded" if p["entry"]["level"] == "error" && p["entry"]["source"] != "network" => {
                    problems.push(format!("log ({}): {}", p["entry"]["source"], p["entry"]["text"]));
                }
                "Network.responseReceived" => {
                    let status = p["response"]["status"].as_u64().unwrap_or(0) as u16;
                    let url = p["response"]["url"].as_str().unwrap_or("");
                    if status >= 400 && !is_allowed(status, url) {
                        problems.push(format!("{status} from {url}"));
                    }
                }
                "Network.loadingFailed" if p["canceled"] != json!(true) => {
                    let url = urls.get(p["requestId"].as_str().unwrap_or("")).map(String::as_str).unwrap_or("?");
                    if !is_allowed(0, url) {
                        problems.push(format!("request to {url} failed: {} {}", p["errorText"], p["blockedReason"]));
                    }
                }
                _ => {}
            }
        }
        *seen = events.len();
        problems
    }

    /// Fails the test on any problem since the last look.
    pub fn assert_clean(&self, at: &str) {
        let problems = self.problems();
        assert!(problems.is_empty(), "{at}: the page had problems: {problems:#?}");
    }
}
