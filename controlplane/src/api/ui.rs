//! `/ui`: the web dashboard, plain JS modules and CSS from
//! `controlplane/ui/`, compiled into the binary with `include_bytes!`.
//!
//! Why `include_bytes!` and a table rather than an embedding crate: a
//! dozen files, each with a content type we choose; no proc macro, walker
//! or MIME guesser to build; debug and release builds serve the same bytes
//! (rust-embed reads the directory at run time in debug builds); and a
//! file named here that is missing fails the build. The unit test
//! `every_file_is_served` fails when a file is added to `ui/` and not here.
//!
//! The pages are static: they need no token (the routes are open, see
//! `auth::required`) and hold no data. Every call they make for data
//! carries the token the user typed, as an `Authorization` header.
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles,
//! images and connections from this origin only, no inline script or
//! style, Trusted Types enforced (no HTML string ever reaches the DOM),
//! no framing. HTML is `no-store`; assets revalidate by `ETag` each load,
//! so a new binary's files are seen at once.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::Problem;

/// One embedded file.
struct Asset {
    /// Its path under `/ui/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:literal) => {
        Asset { name: $name, content_type: $content_type, body: include_bytes!(concat!("../../ui/", $name)) }
    };
}

const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("sse.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("conversation.js", "text/javascript; charset=utf-8"),
    asset!("pages/login.js", "text/javascript; charset=utf-8"),
    asset!("pages/overview.js", "text/javascript; charset=utf-8"),
    asset!("pages/containers.js", "text/javascript; charset=utf-8"),
    asset!("pages/sessions.js", "text/javascript; charset=utf-8"),
    asset!("pages/session.js", "text/javascript; charset=utf-8"),
    asset!("pages/registry.js", "text/javascript; charset=utf-8"),
    asset!("pages/audit.js", "text/javascript; charset=utf-8"),
];

/// The policy of every `/ui` answer.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

fn find(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// Each asset's strong validator, computed once.
fn etag(asset: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| ASSETS.iter().map(|a| format!("\"{}\"", &hex::encode(Sha256::digest(a.body))[..32])).collect());
    let index = ASSETS.iter().position(|a| a.name == asset.name).expect("an asset of the table");
    &tags[index]
}

/// The headers every `/ui` answer carries, problems included.
fn harden(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    headers.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    response
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let html = asset.content_type.starts_with("text/html");
    let tag = etag(asset);
    let mut response = if !html && request.get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == tag.as_bytes()) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.body.into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        r
    };
    let headers = response.headers_mut();
    if html {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    } else {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        headers.insert(header::ETAG, HeaderValue::from_str(tag).expect("hex is a header value"));
    }
    harden(response)
}

/// `GET /ui`, `GET /ui/`: the page; the views are hash routes in it.
pub async fn index(request: HeaderMap) -> Response {
    serve(find("index.html").expect("index.html is embedded"), &request)
}

/// `GET /ui/{*path}`: a script, style sheet or icon.
pub async fn asset(Path(path): Path<String>, request: HeaderMap) -> Response {
    match find(&path) {
        Some(asset) => serve(asset, &request),
        None => harden(Problem::not_found(crate::domain::Code::NotFound, format!("the dashboard has no file {path:?}")).into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_is_served() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
        let mut on_disk = Vec::new();
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    on_disk.push(path.strip_prefix(&dir).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        on_disk.sort();
        let mut served: Vec<String> = ASSETS.iter().map(|a| a.name.to_string()).collect();
        served.sort();
        assert_eq!(on_disk, served, "controlplane/ui/ and the ASSETS table must list the same files");
    }

    #[test]
    fn scripts_are_modules_without_inline_code() {
        let html = std::str::from_utf8(find("index.html").unwrap().body).unwrap();
        // Inline script or style would be refused by the policy: none is written.
        assert!(!html.contains("<script>") && !html.contains("<style") && !html.contains(" style="), "{html}");
        assert!(html.contains(r#"<script type="module" src="/ui/app.js"></script>"#));
        for a in ASSETS.iter().filter(|a| a.name.ends_with(".js")) {
            assert_eq!(a.content_type, "text/javascript; charset=utf-8");
            let text = std::str::from_utf8(a.body).unwrap();
            // Trusted Types are enforced: an HTML string sink would throw.
            for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"] {
                assert!(!text.contains(sink), "{} uses {sink}", a.name);
            }
        }
    }
}
