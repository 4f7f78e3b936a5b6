//! The web dashboard (`/ui`) in a real headless Chromium, driven over the
//! DevTools protocol (support/browser.rs) against a real `agentd up`: log
//! in, start a session with the echo agent, watch its answer stream in,
//! answer a permission request, cancel a turn, hibernate, resume and
//! delete a container, sync the registry, read the audit log; a
//! screenshot of each page goes to `<target>/dashboard-screenshots/`. Any
//! console error, uncaught exception or failed request the test did not
//! cause on purpose fails it.

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::browser::{Browser, Page};
use crate::support::{Agentd, agentd_bin, session_body};

/// `<target dir>/dashboard-screenshots`: beside the binaries, never committed.
fn screenshots() -> PathBuf {
    agentd_bin().parent().unwrap().parent().unwrap().join("dashboard-screenshots")
}

/// Labels, names, ids and headings a keyboard or screen reader user needs.
const A11Y_PROBLEMS: &str = r#"(() => {
  const problems = [];
  for (const el of document.querySelectorAll('input, select, textarea')) {
    if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby')) problems.push('unlabelled ' + el.name);
  }
  for (const el of document.querySelectorAll('button, a[href]')) {
    if (!(el.getAttribute('aria-label') || el.textContent || '').trim()) problems.push('nameless ' + el.tagName + ' ' + el.className);
  }
  const ids = new Set();
  for (const el of document.querySelectorAll('[id]')) { if (ids.has(el.id)) problems.push('duplicate id ' + el.id); ids.add(el.id); }
  for (const img of document.querySelectorAll('img')) if (!img.hasAttribute('alt')) problems.push('img without alt');
  for (const el of document.querySelectorAll('[aria-labelledby]')) {
    for (const id of el.getAttribute('aria-labelledby').split(' ')) if (!document.getElementById(id)) problems.push('dangling aria-labelledby ' + id);
  }
  if (document.querySelectorAll('main h1').length !== 1) problems.push('h1s: ' + document.querySelectorAll('main h1').length);
  return problems;
})()"#;

/// Goes to a page by its nav link (a real click), waits for `ready`, checks
/// focus moved to its heading and its accessibility, and takes its picture.
async fn visit(page: &Page<'_>, link: &str, ready: &str, shot: &str) {
    page.click(&format!("nav a[href='{link}']")).await;
    let route = link.trim_start_matches('#');
    page.wait_for(&format!("document.getElementById('main').dataset.route === '{route}' && ({ready})"), &format!("{link} to show")).await;
    settle(page, shot).await;
}

async fn settle(page: &Page<'_>, shot: &str) {
    let focused = page.eval("document.activeElement === document.querySelector('main h1')").await;
    assert_eq!(focused, json!(true), "{shot}: focus goes to the new page's heading");
    let wide = page.eval("[...document.querySelectorAll('.table-wrap')].filter(w => w.scrollWidth > w.clientWidth + 1).map(w => w.querySelector('caption').textContent)").await;
    assert_eq!(wide, json!([]), "{shot}: tables fit a laptop's width");
    let problems = page.eval(A11Y_PROBLEMS).await;
    assert_eq!(problems, json!([]), "{shot}: accessibility");
    page.screenshot(&screenshots().join(format!("{shot}.png"))).await;
    page.assert_clean(shot);
}

fn text_of(selector: &str) -> String {
    format!("(document.querySelector({s}) || {{}}).textContent || ''", s = json!(selector))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_static_and_served_under_a_strict_policy_without_a_token() {
    let agentd = Agentd::start().await;
    let anonymous = reqwest::Client::new();
    for path in ["/ui", "/ui/"] {
        let r = anonymous.get(agentd.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let h = r.headers();
        assert_eq!(h["content-type"], "text/html; charset=utf-8");
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in ["default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'", "require-trusted-types-for 'script'"] {
            assert!(csp.contains(directive), "{csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    }
    let r = anonymous.get(agentd.url("/ui/app.js")).send().await.unwrap();
    assert_eq!((r.status(), r.headers()["content-type"].to_str().unwrap()), (StatusCode::OK, "text/javascript; charset=utf-8"));
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let etag = r.headers()["etag"].clone();
    let again = anonymous.get(agentd.url("/ui/app.js")).header("if-none-match", etag).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    for missing in ["/ui/nope.js", "/ui/..%2fCargo.toml", "/ui/pages/../app.js.map"] {
        let r = anonymous.get(agentd.url(missing)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{missing}");
        assert!(r.headers().contains_key("content-security-policy"));
    }
    // The data behind it still needs the token.
    let r = anonymous.get(agentd.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A live stream advises its reconnect delay first.
    let s = agentd.create_session(&[]).await;
    let id = s["id"].as_str().unwrap();
    let mut r = agentd.http.get(agentd.url(&format!("/v1/sessions/{id}/events"))).send().await.unwrap();
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("retry: 1000\n"), "{first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_runs_a_session_and_manages_containers_in_a_real_browser() {
    let mut agentd = Agentd::start().await;
    let token = std::fs::read_to_string(agentd.state_dir().join("admin.token")).unwrap().trim().to_string();
    // A container of its own to hibernate, resume and delete from the page.
    let (status, ctr) = agentd.post("/v1/containers", &json!({"labels": {"team": "ui"}})).await;
    assert_eq!(status, StatusCode::CREATED, "{ctr}");
    let ctr_id = ctr["id"].as_str().unwrap().to_string();
    let node_id = ctr["node_id"].as_str().unwrap().to_string();
    // A registry file with the echo agent, for the page to sync.
    let scratch = tempfile::tempdir().unwrap();
    let registry = scratch.path().join("registry.json");
    let mut entry = session_body(&[])["manual_agent"].clone();
    entry["id"] = json!("echo-ui");
    entry["name"] = json!("Echo (dashboard test)");
    entry["description"] = json!("echoes prompts");
    std::fs::write(&registry, json!({"agents": [entry]}).to_string()).unwrap();
    let _ = std::fs::remove_dir_all(screenshots());

    let browser = Browser::launch();
    let page = browser.page().await;
    page.goto(&agentd.url("/ui")).await;
    eprintln!("dashboard screenshots: {}", screenshots().display());

    // The watch itself: a console error and a failed request are caught.
    page.eval("console.error('harness probe'); fetch('/ui/no-such-file.js').then(() => true)").await;
    let mut caught = Vec::new();
    for _ in 0..50 {
        caught.extend(page.problems());
        if caught.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(caught.iter().any(|p| p == "console.error: harness probe"), "{caught:?}");
    assert!(caught.iter().any(|p| p.starts_with("404 from ") && p.ends_with("/ui/no-such-file.js")), "{caught:?}");

    // Not logged in: the login page, and a wrong token is refused clearly.
    page.wait_for("location.hash === '#/login' && document.querySelector('form.login')", "the login form").await;
    settle(&page, "01-login").await;
    page.allow(401, "/v1/sessions?limit=1");
    page.type_into("input[name=token]", "not-a-token").await;
    page.press("Enter").await;
    let error = page.wait_for("!document.getElementById('login-error').hidden && document.getElementById('login-error').textContent", "the refusal").await;
    assert!(error.as_str().unwrap().contains("refused the token (invalid_token)"), "{error}");
    page.screenshot(&screenshots().join("02-login-refused.png")).await;
    page.assert_clean("a bad token");
    page.allow_none();

    // The admin token, typed and sent with Enter: the overview.
    page.type_into("input[name=token]", &token).await;
    page.press("Enter").await;
    page.wait_for(&format!("location.hash === '#/overview' && document.body.textContent.includes({n})", n = json!(node_id)), "the overview").await;
    page.wait_for("document.querySelector('.counts a[href=\"#/containers?state=ready\"] .count').textContent === '1'", "a ready container counted").await;
    settle(&page, "03-overview").await;
    // Kept in this tab's sessionStorage only: in no URL, cookie or localStorage.
    let kept = page.eval("[sessionStorage.getItem('agentd.token'), location.href, document.cookie, localStorage.length]").await;
    assert_eq!(kept[0], json!(token));
    assert!(!kept[1].as_str().unwrap().contains(&token), "{kept}");
    assert_eq!((kept[2].clone(), kept[3].clone()), (json!(""), json!(0)));

    // Start a session with the echo agent, its definition typed as JSON.
    visit(&page, "#/sessions", "document.querySelector('form.create')", "04-sessions").await;
    let agent = session_body(&["--delay-ms", "150"])["manual_agent"].clone();
    page.type_into("textarea[name=definition]", &agent.to_string()).await;
    page.type_into("input[name=labels]", "via=dashboard").await;
    page.click("form.create button[type=submit]").await;
    // Answered at once, the session still being set up; the page opens
    // its prompt box when it is ready.
    let hash = page.wait_for("/^#\\/sessions\\/ses_/.test(location.hash) && document.querySelector('.stream .badge').textContent === 'live' && location.hash", "the session page, live").await;
    let session_id = hash.as_str().unwrap().trim_start_matches("#/sessions/").to_string();
    assert_eq!(page.statuses("POST", "/v1/sessions"), vec![202]);
    page.wait_for("!document.querySelector('textarea[name=prompt]').disabled && !document.querySelector('form.prompt button[type=submit]').disabled", "the prompt box open").await;
    let (_, s) = agentd.get(&format!("/v1/sessions/{session_id}")).await;
    assert_eq!((s["state"].as_str(), s["labels"]["via"].as_str()), (Some("ready"), Some("dashboard")), "{s}");
    settle(&page, "05-session-new").await;

    // A prompt, sent with Enter: its answer streams in, chunks merged into one text.
    page.type_into("textarea[name=prompt]", "hello from the dashboard").await;
    page.press("Enter").await;
    page.wait_for("document.querySelector('.turn .msg.agent .text') && document.querySelector('.turn .msg.agent .text').textContent.length > 0", "the first chunk").await;
    page.wait_for("document.querySelector('.turn .turn-end')", "the end of the turn").await;
    let turn = page.eval("[...document.querySelectorAll('.turn')].map(t => [t.querySelector('.msg.user .text').textContent, [...t.querySelectorAll('.msg.agent .text')].map(e => e.textContent), t.querySelector('.turn-end').dataset.stop])").await;
    assert_eq!(turn, json!([["hello from the dashboard", ["hello from the dashboard"], "end_turn"]]));
    assert_eq!(page.eval(&text_of(".run-state")).await, json!("The turn ended: end_turn."));

    // A permission request: its options are buttons; Allow answers it.
    page.type_into("textarea[name=prompt]", "/ask deploy to production").await;
    page.press("Enter").await;
    page.wait_for("document.querySelector('section.permission button[data-option=allow]')", "the permission request").await;
    let question = page.eval("[document.querySelector('section.permission h4').textContent, document.querySelector('section.permission').getAttribute('role'), [...document.querySelectorAll('section.permission button')].map(b => b.textContent)]").await;
    assert_eq!(question, json!(["Permission requested: deploy to production", "group", ["Allow", "Reject"]]));
    page.screenshot(&screenshots().join("06-session-permission.png")).await;
    page.click("section.permission button[data-option=allow]").await;
    page.wait_for("(document.querySelector('section.permission .perm-outcome').textContent || '').startsWith('Answered: Allow')", "the answer recorded").await;
    page.wait_for("document.querySelectorAll('.turn .turn-end').length === 2", "the second turn's end").await;
    let said = page.eval("[...document.querySelectorAll('.turn')][1].querySelector('.msg.agent .text').textContent").await;
    assert_eq!(said, json!("permission: selected allow"));
    assert_eq!(page.eval(&text_of("section.permission .perm-outcome")).await, json!("Answered: Allow (by client)"));

    // A long turn, cancelled from the page once it streams.
    let long: Vec<String> = (0..80).map(|i| format!("word{i}")).collect();
    page.type_into("textarea[name=prompt]", &long.join(" ")).await;
    page.click("form.prompt button[type=submit]").await;
    page.wait_for("document.querySelectorAll('.turn').length === 3 && [...document.querySelectorAll('.turn')][2].querySelector('.msg.agent .text')", "the third turn streaming").await;
    page.wait_for("!document.querySelector('form.prompt button.danger').disabled", "cancel enabled").await;
    page.click("form.prompt button.danger").await;
    page.wait_for("document.querySelectorAll('.turn .turn-end').length === 3", "the cancelled turn's end").await;
    let end = page.eval("[[...document.querySelectorAll('.turn-end')][2].dataset.stop, [...document.querySelectorAll('.turn .turn-title .badge')][2].textContent, document.querySelector('.run-state').textContent]").await;
    assert_eq!(end, json!(["cancelled", "cancelled", "The turn ended: cancelled."]));
    let streamed = page.eval("[...document.querySelectorAll('.turn')][2].querySelector('.msg.agent .text').textContent").await;
    assert!(streamed.as_str().unwrap().starts_with("word0") && streamed.as_str().unwrap().len() < long.join(" ").len(), "{streamed}");
    let (_, s) = agentd.get(&format!("/v1/sessions/{session_id}")).await;
    let states: Vec<&str> = s["runs"].as_array().unwrap().iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(states.iter().filter(|s| **s == "completed").count() + states.iter().filter(|s| **s == "cancelled").count(), 3, "{s}");
    // A tool call: its title, kind and status, updated in place as it runs.
    page.type_into("textarea[name=prompt]", "/run /bin/echo tool-ok").await;
    page.press("Enter").await;
    page.wait_for("document.querySelectorAll('.turn .turn-end').length === 4", "the tool turn's end").await;
    let tool = page.eval("(() => { const t = [...document.querySelectorAll('.turn')][3]; const s = t.querySelectorAll('section.tool'); \
        return [s.length, s[0].querySelector('.tool-kind').textContent, s[0].querySelector('.badge').textContent, t.querySelector('.msg.agent .text').textContent]; })()").await;
    assert_eq!(tool, json!([1, "(execute)", "completed", "tool-ok\n[exit code 0]"]));
    page.screenshot(&screenshots().join("07-session-laptop.png")).await;
    page.viewport(390, 844, true).await;
    page.screenshot(&screenshots().join("08-session-phone.png")).await;
    let overflow = page.eval("document.documentElement.scrollWidth <= window.innerWidth + 1").await;
    assert_eq!(overflow, json!(true), "nothing wider than a phone");
    page.viewport(1280, 900, false).await;
    page.assert_clean("the session page");

    // The stream client in this browser: a connection cut mid-stream is
    // resumed with Last-Event-ID after the server's retry delay, and every
    // event arrives once, in order.
    let resumed = page.eval(&format!(r#"(async () => {{
      const {{ EventStream }} = await import('/ui/sse.js');
      const {{ authHeaders }} = await import('/ui/api.js');
      const last = (await (await fetch('/v1/sessions/{session_id}', {{ headers: authHeaders() }})).json()).last_event_id;
      const sent = [];
      let connects = 0;
      const cutting = async (url, init) => {{
        connects += 1;
        sent.push(init.headers['Last-Event-ID'] ?? null);
        const response = await fetch(url, init);
        if (connects > 1) return response;
        // Passes bytes through up to the id line of event 5, then drops:
        // event 5 is half received and must come again.
        const reader = response.body.getReader();
        let text = '';
        let cut = false;
        const body = new ReadableStream({{ async pull(controller) {{
          if (cut) {{ controller.error(new TypeError('network error')); return; }}
          const {{ value, done }} = await reader.read();
          if (done) {{ controller.close(); return; }}
          const before = text.length;
          text += new TextDecoder().decode(value);
          const m = /\nid: 5\n/.exec(text);
          if (m) {{
            controller.enqueue(value.slice(0, m.index + m[0].length - before));
            cut = true;
            reader.cancel();
            return;
          }}
          controller.enqueue(value);
        }} }});
        return new Response(body, {{ status: response.status, headers: response.headers }});
      }};
      const ids = [];
      const started = performance.now();
      await new Promise((resolve) => {{
        const stream = new EventStream('/v1/sessions/{session_id}/events', {{ headers: authHeaders, fetch: cutting,
          onEvent: (e) => {{ ids.push(Number(e.id)); if (Number(e.id) >= last) {{ stream.close(); resolve(); }} }} }}).start();
        setTimeout(() => {{ stream.close(); resolve(); }}, 15000);
      }});
      return {{ ids, last, sent, connects, waited: performance.now() - started }};
    }})()"#)).await;
    let last = resumed["last"].as_u64().unwrap();
    let ids: Vec<u64> = resumed["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=last).collect::<Vec<_>>(), "{resumed}");
    assert_eq!(resumed["connects"], json!(2), "{resumed}");
    assert_eq!(resumed["sent"][0], Value::Null, "{resumed}");
    assert_eq!(resumed["sent"][1], json!("4"), "resumed after the last whole event: {resumed}");
    assert!(resumed["waited"].as_f64().unwrap() >= 1000.0, "the server's retry: 1000 was honoured: {resumed}");
    // The parser itself, on what networks do to a stream.
    let parsed = page.eval(r#"(async () => {
      const { SseParser } = await import('/ui/sse.js');
      const p = new SseParser();
      const bytes = new TextEncoder().encode('data: é\n\n');
      const events = [];
      for (const chunk of ['\uFEFFid: 7\r', '\nevent: a\r\ndata: x\rdata:  y\n', ': keep-alive\n', 'retry: 250\nretry: x\n\n', 'id: 8\ndata\n\n', 'event: none\n\n', 'id: 9\0\ndata: z\n\n'])
        events.push(...p.feed(chunk));
      events.push(...p.feed(bytes.slice(0, 7)), ...p.feed(bytes.slice(7)));
      return { events, retry: p.retry, last: p.dispatchedId };
    })()"#).await;
    assert_eq!(parsed, json!({"events": [
        {"id": "7", "type": "a", "data": "x\n y"},
        {"id": "8", "type": "message", "data": ""},
        {"id": "8", "type": "message", "data": "z"},
        {"id": "8", "type": "message", "data": "é"},
    ], "retry": 250, "last": "8"}));
    page.assert_clean("the stream client");
    // Diffs and plans, which the echo agent never sends: ACP updates as
    // the stream carries them, rendered by the page's own Conversation.
    let rendered = page.eval(r#"(async () => {
      const { Conversation } = await import('/ui/conversation.js');
      const log = document.createElement('div');
      const c = new Conversation(log);
      const update = (u) => c.apply({ type: 'session.update', data: JSON.stringify({ update: u }) });
      c.apply({ type: 'run.started', data: JSON.stringify({ run_id: 'run_x' }) });
      update({ sessionUpdate: 'plan', entries: [{ content: 'read', status: 'completed', priority: 'high' }, { content: 'edit', status: 'pending', priority: 'low' }] });
      update({ sessionUpdate: 'plan', entries: [{ content: 'read', status: 'completed' }, { content: 'edit', status: 'in_progress' }] });
      update({ sessionUpdate: 'tool_call', toolCallId: 't1', title: 'Edit a.txt', kind: 'edit', status: 'pending' });
      update({ sessionUpdate: 'tool_call_update', toolCallId: 't1', status: 'completed',
        content: [{ type: 'diff', path: '/w/a.txt', oldText: 'one\ntwo\nthree', newText: 'one\n2\nthree' }] });
      const plans = log.querySelectorAll('section.plan');
      return {
        plans: plans.length,
        entries: [...plans[0].querySelectorAll('li')].map((li) => li.dataset.state),
        tools: log.querySelectorAll('section.tool').length,
        status: log.querySelector('section.tool .badge').textContent,
        caption: log.querySelector('figure.diff figcaption').textContent,
        lines: [...log.querySelectorAll('figure.diff .line')].map((l) => [l.className, l.textContent]),
      };
    })()"#).await;
    assert_eq!(rendered, json!({
        "plans": 1, "entries": ["completed", "in_progress"], "tools": 1, "status": "completed",
        "caption": "Diff of /w/a.txt",
        "lines": [["line unchanged", "  one\n"], ["line removed", "- removed: two\n"], ["line added", "+ added: 2\n"], ["line unchanged", "  three\n"]],
    }));

    // Containers: filtered by label and node, live usage, hibernate and resume.
    visit(&page, "#/containers", "document.querySelector('table, .empty')", "09-containers").await;
    page.type_into("input[name=label]", "team=ui").await;
    page.eval(&format!("(() => {{ const s = document.querySelector('select[name=node]'); s.value = {n}; return s.value; }})()", n = json!(node_id))).await;
    page.click("form.filters button[type=submit]").await;
    let row = format!("document.querySelector('tr button[aria-label=\"Hibernate {ctr_id}\"]')");
    page.wait_for(&format!("location.hash.includes('label=team') && document.querySelectorAll('tbody tr').length === 1 && {row}"), "only the labelled container").await;
    page.wait_for("/memory \\d/.test(document.querySelector('tbody tr .usage').textContent)", "live usage").await;
    settle(&page, "10-containers-filtered").await;
    page.click(&format!("button[aria-label='Hibernate {ctr_id}']")).await;
    page.wait_for(&format!("document.querySelector('tbody tr .badge').textContent === 'hibernated' && document.querySelector('button[aria-label=\"Resume {ctr_id}\"]')"), "hibernated").await;
    let (_, c) = agentd.get(&format!("/v1/containers/{ctr_id}")).await;
    assert_eq!((c["state"].as_str(), c["usage"]["frozen"].as_bool()), (Some("hibernated"), Some(true)), "{c}");
    page.screenshot(&screenshots().join("11-containers-hibernated.png")).await;
    page.click(&format!("button[aria-label='Resume {ctr_id}']")).await;
    page.wait_for("document.querySelector('tbody tr .badge').textContent === 'ready'", "resumed").await;
    let (_, c) = agentd.get(&format!("/v1/containers/{ctr_id}")).await;
    assert_eq!((c["state"].as_str(), c["usage"]["frozen"].as_bool()), (Some("ready"), Some(false)), "{c}");

    // Delete asks first: Escape keeps the container, and focus returns.
    page.click(&format!("button[aria-label='Delete {ctr_id}']")).await;
    page.wait_for("document.getElementById('confirm').open && document.activeElement.id === 'confirm-cancel'", "the confirmation, focused").await;
    page.screenshot(&screenshots().join("12-containers-confirm.png")).await;
    page.press("Escape").await;
    page.wait_for(&format!("!document.getElementById('confirm').open && document.activeElement.getAttribute('aria-label') === 'Delete {ctr_id}'"), "the dialog closed, focus back").await;
    let (_, c) = agentd.get(&format!("/v1/containers/{ctr_id}")).await;
    assert_eq!(c["state"], "ready", "{c}");
    page.click(&format!("button[aria-label='Delete {ctr_id}']")).await;
    page.wait_for("document.getElementById('confirm').open", "the confirmation").await;
    page.click("#confirm-ok").await;
    agentd.wait_for(&format!("/v1/containers/{ctr_id}"), |c| c["state"] == "deleted").await;
    page.wait_for("['deleted', 'stopping'].includes(document.querySelector('tbody tr .badge').textContent)", "deleted on the page").await;
    page.assert_clean("the containers page");

    // The registry: synced from the page, its agent listed.
    visit(&page, "#/registry", "document.querySelector('form')", "13-registry-empty").await;
    page.type_into("input[name=source]", registry.to_str().unwrap()).await;
    page.click("form button[type=submit]").await;
    page.wait_for("document.body.textContent.includes('Echo (dashboard test)') && document.querySelector('.status').textContent.startsWith('Synced')", "the synced agent").await;
    page.screenshot(&screenshots().join("14-registry.png")).await;
    page.assert_clean("the registry page");

    // The audit log names what the dashboard did, as the dashboard.
    visit(&page, "#/audit", "document.querySelector('tbody tr')", "15-audit").await;
    let audit = page.eval("document.querySelector('tbody').textContent").await;
    for call in [format!("POST /v1/containers/{ctr_id}:hibernate"), format!("POST /v1/sessions/{session_id}:cancel"), "POST /v1/registry:sync".to_string()] {
        assert!(audit.as_str().unwrap().contains(&call), "{call} in {audit}");
    }
    assert!(audit.as_str().unwrap().contains("dashboard"), "the actor: {audit}");

    // A read-only token: the audit log says why it is closed to it.
    let (status, read) = agentd.post("/v1/tokens", &json!({"scope": "read", "name": "dashboard-read"})).await;
    assert_eq!(status, StatusCode::CREATED, "{read}");
    page.click("#logout").await;
    page.wait_for("location.hash === '#/login'", "logged out").await;
    assert_eq!(page.eval("sessionStorage.getItem('agentd.token')").await, Value::Null);
    page.type_into("input[name=token]", read["token"].as_str().unwrap()).await;
    page.press("Enter").await;
    page.wait_for("location.hash === '#/overview'", "the overview again").await;
    page.allow(403, "/v1/audit");
    page.click("nav a[href='#/audit']").await;
    let refused = page.wait_for("document.querySelector('.status').textContent", "the refusal").await;
    assert!(refused.as_str().unwrap().contains("This token may not do that (insufficient_scope)"), "{refused}");
    page.screenshot(&screenshots().join("16-audit-read-token.png")).await;
    page.assert_clean("a read token");
    page.allow_none();

    // The server goes away: the page says so plainly.
    visit(&page, "#/overview", "document.querySelector('.counts')", "17-overview-again").await;
    agentd.interrupt();
    page.allow(0, "/v1/");
    let banner = page.wait_for("!document.getElementById('banner').hidden && document.getElementById('banner').textContent", "the unreachable banner").await;
    assert!(banner.as_str().unwrap().starts_with("Cannot reach the agentd server at http://127.0.0.1:"), "{banner}");
    page.screenshot(&screenshots().join("18-unreachable.png")).await;
    page.assert_clean("an unreachable server");
    drop(page);
    browser.close();
}
