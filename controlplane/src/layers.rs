//! The control plane's layers, checked on its sources: each module uses only
//! modules of its own layer or below (see [`crate::domain`]'s doc). A
//! `use crate::api::...` in a flow, say, fails here naming the line.

use std::path::Path;

/// Layers, lowest first: every top-level module of the crate is in one.
const LAYERS: &[&[&str]] = &[
    &["domain", "plan", "agent_spec", "mcp", "powers", "metrics"],
    &["store"],
    &["workflow"],
    &["context", "AppState", "fleet", "flows", "teardown", "agent_registry", "audit", "auth"],
    &["api"],
    &["process", "lib", "reconcile", "sync_registry_at_start", "start_workflows", "serve", "serve_on", "serve_metrics_on", "bind", "stop_all_containers", "app"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `crate::<name>` references on the code lines (not comments) of `text`.
fn references(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + 7..];
            let ident = |s: &str| s.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the first segment of each path.
                let inner = group.split('}').next().unwrap_or("");
                found.extend(inner.split(',').map(ident).filter(|i| !i.is_empty()).map(|i| (n + 1, i)));
            } else {
                found.push((n + 1, ident(rest)));
            }
        }
    }
    found
}

fn violations(src: &Path) -> Vec<String> {
    let mut broken = Vec::new();
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let name = relative.file_stem().unwrap().to_string_lossy().to_string();
        // Tests may reach anything they exercise.
        if ["tests", "conformance", "outage_tests", "layers"].contains(&name.as_str()) {
            continue;
        }
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        let Some(from) = layer_of(&top) else {
            broken.push(format!("{}: module {top} is in no layer: add it to LAYERS", relative.display()));
            continue;
        };
        for (line, target) in references(&std::fs::read_to_string(&file).unwrap()) {
            match layer_of(&target) {
                Some(to) if to > from => broken.push(format!("{}:{line}: {top} uses crate::{target}, a layer above it", relative.display())),
                Some(_) => {}
                None if target.chars().next().is_some_and(char::is_uppercase) || target == "new_id" => {}
                None => broken.push(format!("{}:{line}: crate::{target} is in no layer", relative.display())),
            }
        }
    }
    broken
}

#[test]
fn modules_use_only_their_layer_and_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let broken = violations(&src);
    assert!(broken.is_empty(), "layering broken:\n  {}", broken.join("\n  "));
}

#[test]
fn an_upward_use_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("flows")).unwrap();
    std::fs::write(dir.path().join("flows/x.rs"), "// crate::api in a comment is fine\nuse crate::api::Problem;\nuse crate::store::Store;\n").unwrap();
    assert_eq!(violations(dir.path()), ["flows/x.rs:2: flows uses crate::api, a layer above it"]);
}
