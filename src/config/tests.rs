use super::*;

fn problems(text: &str) -> Vec<Problem> {
    match parse(Path::new("t.toml"), text) {
        Err(ConfigError::Invalid { problems }) => problems,
        other => panic!("{text:?} was not refused: {other:?}"),
    }
}

/// The one problem `text` has: its line, column and message.
fn problem(text: &str) -> (usize, usize, String) {
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:?}");
    (p[0].line, p[0].column, p[0].message.clone())
}

#[test]
fn the_packaged_config_passes() {
    let text = include_str!("../../packaging/agentd.toml");
    let vars = parse(Path::new("agentd.toml"), text).unwrap();
    assert!(vars.contains(&("AGENTD_LISTEN".into(), "127.0.0.1:8080".into())));
    assert!(vars.contains(&("AGENTD_INITIALIZE_TIMEOUT_MS".into(), "30000".into())));
    assert!(vars.contains(&("AGENTD_LOG_JSON".into(), "false".into())));
    assert!(vars.contains(&("AGENTD_LIVE_RESTORE".into(), "true".into())), "the service runs with live restore");
    assert_eq!(vars[0].0, "AGENTD_LISTEN", "in file order");
}

#[test]
fn every_key_of_every_kind_takes_a_good_value() {
    let text = r#"
        listen = "[::1]:9000"
        state_dir = "/var/lib/agentd"
        log = "info,agentd_node=debug"
        log_json = true
        initialize_timeout_ms = 1
        node_call_timeout_ms = 0x10
        node_socket = "/run/agentd/node.sock"
        database_url = "postgres://agentd:secret@db.example:5432/agentd?sslmode=require"
        node_check_interval_ms = 1_000
        node_heartbeat_timeout_ms = 9223372036854775807
        hibernate_after_ms = 0
        container_ttl_ms = 0
        cgroup_subtree = "agentd-2"
        id_base = 4294967295
        id_range_size = 65536
        max_sandboxes = 1
        stop_grace_ms = 0
        registry = "https://example.org/registry.json"
        registry_sync_interval_ms = 0
        sandbox_bin = "/usr/bin/agentd"
        node_id = "node-1"
        labels = "zone=a,disk=ssd"
        capacity_memory = 1073741824
        capacity_cpus = 1.5
        placement = "binpack"
        join = "https://cp.example:8080"
        advertise = "10.0.0.5:7443"
        grpc_listen = "0.0.0.0:7443"
        no_auth = false
        metrics_listen = "127.0.0.1:9100"
        sse_keepalive_ms = 15000
        sse_buffer = 1024
        allowed_host_paths = ["/srv/agents", "/opt/roots"]
        allowed_registry_sources = ["https://example.org/registry.json", "/etc/agentd/registry.json"]
        live_restore = true
        closed_session_retention_ms = 0
        secrets_file = "/etc/agentd/secrets"
        secrets_ca_file = "/etc/agentd/secrets-ca.pem"
    "#;
    let vars = parse(Path::new("t.toml"), text).unwrap();
    assert_eq!(vars.len(), keys::KEYS.len(), "the test names every key");
    assert!(vars.contains(&("AGENTD_NODE_CALL_TIMEOUT_MS".into(), "16".into())), "hex read as its value");
    assert!(vars.contains(&("AGENTD_NODE_CHECK_INTERVAL_MS".into(), "1000".into())));
    assert!(vars.contains(&("AGENTD_LOG_JSON".into(), "true".into())));
    assert!(vars.contains(&("AGENTD_ALLOWED_HOST_PATHS".into(), "/srv/agents,/opt/roots".into())), "lists joined with commas");
    for ok in ["database_url = \"\"", "database_url = \"postgresql://db/agentd\"", "registry = \"/etc/agentd/registry.json\"", "registry = \"file:///r.json\""] {
        parse(Path::new("t.toml"), ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

#[test]
fn an_unknown_key_is_named_with_its_line_and_a_guess() {
    let (line, column, message) = problem("listen = \"127.0.0.1:1\"\n\n  listn = \"a\"\n");
    assert_eq!((line, column), (3, 3));
    assert!(message.contains("unknown key \"listn\"") && message.contains("did you mean \"listen\"?"), "{message}");
    let (_, _, message) = problem("[fleet]\nservers = 2\n");
    assert!(message.contains("unknown key \"fleet\"") && message.contains("known keys: listen, state_dir"), "{message}");
}

#[test]
fn each_kind_of_bad_value_is_refused_where_it_is() {
    let cases: &[(&str, &str)] = &[
        ("id_base = -5", "id_base must be an integer from 1 to 4294967295, found -5"),
        ("id_base = 0", "id_base must be an integer from 1 to 4294967295, found 0"),
        ("id_range_size = 4294967296", "from 1 to 4294967295, found 4294967296"),
        ("stop_grace_ms = \"2000\"", "stop_grace_ms must be an integer from 0 to 4294967295, found the string \"2000\""),
        ("container_ttl_ms = 1.5", "found the float 1.5"),
        ("log_json = \"yes\"", "log_json must be true or false, found the string \"yes\""),
        ("listen = \"localhost\"", "listen must be a socket address"),
        ("listen = 8080", "listen must be a string (a socket address such as \"127.0.0.1:8080\"), found 8080"),
        ("state_dir = \"var/lib/agentd\"", "state_dir must be an absolute path, found \"var/lib/agentd\""),
        ("sandbox_bin = \"\"", "sandbox_bin must be an absolute path"),
        ("node_socket = [\"/a\"]", "node_socket must be a string (an absolute path), found an array"),
        ("database_url = \"mysql://db/x\"", "database_url must be a postgres:// URL, or empty for the embedded SQLite store: scheme \"mysql\""),
        ("database_url = \"postgres:///agentd\"", "no host"),
        ("registry = \"ftp://example.org/r.json\"", "registry must be an absolute path or a file://, http:// or https:// URL"),
        ("registry = \"registry.json\"", "registry must be an absolute path"),
        ("log = \"info,agentd_node=loud\"", "log must be a log filter"),
        ("cgroup_subtree = \"a/b\"", "cgroup_subtree must be a cgroup name"),
        ("hibernate_after_ms = 2024-01-01", "found the datetime 2024-01-01"),
        ("allowed_host_paths = \"/srv\"", "allowed_host_paths must be an array of strings, each an absolute path"),
        ("allowed_host_paths = [\"srv\"]", "allowed_host_paths must be an absolute path, found \"srv\""),
        ("allowed_host_paths = [\"/a,b\"]", "must hold no commas"),
        ("allowed_registry_sources = [1]", "must be an array of strings, found 1 in it"),
    ];
    for (text, want) in cases {
        let text = format!("# comment\n{text}\n");
        let (line, column, message) = problem(&text);
        assert!(message.contains(want), "{text:?}: {message:?} lacks {want:?}");
        let value_column = text.lines().nth(1).unwrap().find('=').unwrap() + 3;
        assert_eq!((line, column), (2, value_column), "{text:?} points at the value");
    }
}

#[test]
fn a_database_password_is_never_quoted() {
    let (_, _, message) = problem("database_url = \"mysql://agentd:hunter2@db/x\"");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn every_problem_is_listed_and_the_error_is_one_line() {
    let text = "id_base = 0\nlistn = 1\nlog_json = 1\n";
    let all = problems(text);
    assert_eq!(all.iter().map(|p| p.line).collect::<Vec<_>>(), [1, 2, 3]);
    let err = parse(Path::new("/etc/agentd/agentd.toml"), text).unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(err.starts_with("config /etc/agentd/agentd.toml:1:11: id_base must be"), "{err}");
    assert!(err.ends_with("(and 2 more: `agentd config check` lists them)"), "{err}");
}

#[test]
fn toml_syntax_errors_have_a_position_on_one_line() {
    let (line, column, message) = problem("log = \"info\"\nlisten = \n");
    assert_eq!(line, 2, "{message}");
    assert!(column >= 9, "{column}");
    assert!(message.starts_with("not valid TOML: ") && !message.contains('\n'), "{message}");
    let p = problems("log = \"a\"\nlog = \"b\"\n");
    assert_eq!(p[0].line, 2, "a duplicate key is refused where it repeats: {p:?}");
}

#[test]
fn columns_count_characters() {
    assert_eq!(line_column("é = 1\nabc", 7), (2, 1));
    assert_eq!(line_column("# é\nxé = 1", 8), (2, 3));
    assert_eq!(line_column("ab", 99), (1, 3));
}
