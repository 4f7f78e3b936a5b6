//! The workspace's dependency rules, checked on `cargo metadata`: each crate
//! may reach only the crates below it (see HACKING.md, "Crates"). A rule
//! broken by a new `[dependencies]` line, directly or through another crate,
//! fails here with the path that breaks it.

use std::collections::{BTreeMap, BTreeSet};

/// What each crate must never link, directly or transitively. Dev- and
/// build-only edges are not links of the shipped binaries and are ignored.
const FORBIDDEN: &[(&str, &[&str])] = &[
    // The vocabulary both planes share: no kernel code, no RPC.
    ("agentd-plan", &["agentd-proto", "agentd-builder", "agentd-cgroups", "agentd-harden", "agentd-supervisor", "agentd-acp", "agentd-node", "agentd-controlplane", "agentd-sandbox"]),
    // Contracts only.
    ("agentd-proto", &["agentd-builder", "agentd-cgroups", "agentd-harden", "agentd-supervisor", "agentd-acp", "agentd-node", "agentd-controlplane", "agentd-sandbox"]),
    // The control plane reaches sandboxes only through a node, over gRPC.
    ("agentd-controlplane", &["agentd-builder", "agentd-cgroups", "agentd-harden", "agentd-supervisor", "agentd-acp", "agentd-node", "agentd-sandbox", "agentd-egress"]),
    // The node talks to supervisors over gRPC; it never runs one.
    ("agentd-node", &["agentd-supervisor", "agentd-acp", "agentd-controlplane", "agentd-sandbox"]),
    // The builder hands PID 1 to a payload it is given.
    ("agentd-builder", &["agentd-supervisor", "agentd-acp", "agentd-proto", "agentd-node", "agentd-controlplane", "agentd-sandbox"]),
    ("agentd-cgroups", &["agentd-builder", "agentd-harden", "agentd-supervisor", "agentd-acp", "agentd-proto", "agentd-node", "agentd-controlplane"]),
    ("agentd-harden", &["agentd-builder", "agentd-cgroups", "agentd-supervisor", "agentd-acp", "agentd-proto", "agentd-node", "agentd-controlplane"]),
    // PID 1 inside the sandbox: no namespace or cgroup code, no daemon.
    ("agentd-supervisor", &["agentd-builder", "agentd-cgroups", "agentd-node", "agentd-controlplane", "agentd-sandbox"]),
    ("agentd-acp", &["agentd-proto", "agentd-builder", "agentd-cgroups", "agentd-harden", "agentd-supervisor", "agentd-node", "agentd-controlplane"]),
    // Certificates and tokens: no kernel code, no daemon.
    ("agentd-pki", &["agentd-builder", "agentd-cgroups", "agentd-harden", "agentd-supervisor", "agentd-acp", "agentd-node", "agentd-controlplane", "agentd-sandbox"]),
    // Egress enforcement (links, nftables, the gateway): used by the node and
    // `sandbox run`, using neither.
    ("agentd-egress", &["agentd-proto", "agentd-builder", "agentd-supervisor", "agentd-acp", "agentd-node", "agentd-controlplane", "agentd-sandbox"]),
    // The small binary every sandbox is forked from: no daemon in it.
    ("agentd-sandbox", &["agentd-node", "agentd-controlplane"]),
];

/// Normal dependencies between workspace packages, by name.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn workspace_graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path", manifest])
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let packages = doc["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages.iter().map(|p| p["name"].as_str().unwrap().to_string()).collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().unwrap().to_string())
                .filter(|d| names.contains(d))
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

/// Every rule broken in `graph`, each as the path from the crate to what it
/// must not reach.
fn violations(graph: &Graph) -> Vec<String> {
    let mut broken = Vec::new();
    for (krate, forbidden) in FORBIDDEN {
        // Breadth-first from the crate, remembering how each crate was reached.
        let mut via: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = vec![*krate];
        while let Some(at) = queue.pop() {
            for dep in graph.get(at).into_iter().flatten() {
                if dep != krate && !via.contains_key(dep.as_str()) {
                    via.insert(dep, at);
                    queue.push(dep);
                }
            }
        }
        for bad in *forbidden {
            if via.contains_key(bad) {
                let mut path = vec![*bad];
                while let Some(prev) = via.get(path.last().unwrap()) {
                    path.push(prev);
                    if prev == krate {
                        break;
                    }
                }
                path.reverse();
                broken.push(path.join(" -> "));
            }
        }
    }
    broken
}

#[test]
fn crates_depend_only_downwards() {
    let graph = workspace_graph();
    for (krate, _) in FORBIDDEN {
        assert!(graph.contains_key(*krate), "rule for {krate}, which is not in the workspace: update FORBIDDEN");
    }
    let broken = violations(&graph);
    assert!(broken.is_empty(), "forbidden dependencies:\n  {}", broken.join("\n  "));
}

/// The check itself: an edge from the control plane to the sandbox builder,
/// or one through a crate in between, is caught and named.
#[test]
fn a_control_plane_edge_to_kernel_code_is_caught() {
    let mut graph = workspace_graph();
    graph.get_mut("agentd-controlplane").unwrap().insert("agentd-builder".into());
    assert!(violations(&graph).contains(&"agentd-controlplane -> agentd-builder".to_string()), "{:?}", violations(&graph));

    let mut graph = workspace_graph();
    graph.get_mut("agentd-plan").unwrap().insert("agentd-cgroups".into());
    let broken = violations(&graph);
    assert!(broken.iter().any(|p| p.starts_with("agentd-controlplane -> ") && p.ends_with(" -> agentd-plan -> agentd-cgroups") || p == "agentd-controlplane -> agentd-plan -> agentd-cgroups"), "{broken:?}");
}
