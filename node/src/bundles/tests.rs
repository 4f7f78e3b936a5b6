use std::io::Write;

use super::*;

/// A tar.gz of `(path, mode, contents)` entries, written raw so that hostile
/// paths (`../x`, `/etc/x`) can be made too.
fn tar_gz(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, mode, data) in entries {
        let mut header = tar::Header::new_old();
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_mode(*mode);
        header.set_size(data.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct Fixture {
    dir: tempfile::TempDir,
    cache: BundleCache,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cache = BundleCache::open(dir.path().join("bundles")).unwrap();
        Self { dir, cache }
    }

    /// Writes `bytes` as a file next to the cache and returns its file:// URL.
    fn archive(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        format!("file://{}", path.display())
    }

    /// Everything in the cache directory, temp entries included.
    fn cache_entries(&self) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(self.cache.root()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }
}

fn agent_archive() -> Vec<u8> {
    tar_gz(&[("./bin/agent", 0o4750, b"#!/bin/sh\necho hi\n"), ("share/readme.txt", 0o600, b"hello")])
}

#[tokio::test]
async fn unpacks_once_under_the_archive_digest_with_sandbox_readable_modes() {
    let f = Fixture::new();
    let bytes = agent_archive();
    let url = f.archive("agent.tar.gz", &bytes);
    let dir = f.cache.ensure(&url, Some(&sha(&bytes).to_uppercase())).await.unwrap();
    assert_eq!(dir, f.cache.root().join(sha(&bytes)));
    assert_eq!(fs::read(dir.join("bin/agent")).unwrap(), b"#!/bin/sh\necho hi\n");
    let mode = |p: &str| fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("bin/agent"), 0o755, "set-id bits dropped, executable for everyone");
    assert_eq!(mode("share/readme.txt"), 0o644);
    assert_eq!(mode("bin"), 0o755);
    assert_eq!(f.cache_entries(), vec![sha(&bytes)], "no temp left");

    // Cached: with its digest, the bundle answers without the archive.
    fs::remove_file(f.dir.path().join("agent.tar.gz")).unwrap();
    assert_eq!(f.cache.ensure(&url, Some(&sha(&bytes))).await.unwrap(), dir);
}

#[tokio::test]
async fn without_a_digest_the_archive_names_its_own_tree() {
    let f = Fixture::new();
    let bytes = agent_archive();
    let url = f.archive("agent.tar.gz", &bytes);
    let dir = f.cache.ensure(&url, None).await.unwrap();
    assert_eq!(dir, f.cache.root().join(sha(&bytes)));
    assert_eq!(f.cache.ensure(&url, None).await.unwrap(), dir);
    assert_eq!(f.cache_entries(), vec![sha(&bytes)]);
}

#[tokio::test]
async fn a_plain_tar_is_accepted_too() {
    let f = Fixture::new();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o755);
    header.set_cksum();
    builder.append_data(&mut header, "agent", &b"abc"[..]).unwrap();
    let bytes = builder.into_inner().unwrap();
    let dir = f.cache.ensure(&f.archive("agent.tar", &bytes), None).await.unwrap();
    assert_eq!(fs::read(dir.join("agent")).unwrap(), b"abc");
}

#[tokio::test]
async fn a_digest_mismatch_is_refused_and_nothing_is_cached() {
    let f = Fixture::new();
    let bytes = agent_archive();
    let wrong = "0".repeat(64);
    match f.cache.ensure(&f.archive("agent.tar.gz", &bytes), Some(&wrong)).await {
        Err(BundleError::Mismatch { expected, actual, .. }) => assert_eq!((expected, actual), (wrong, sha(&bytes))),
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert!(f.cache_entries().is_empty(), "{:?}", f.cache_entries());
    assert_eq!(agentd_proto::error::code_of(&BundleError::Mismatch { url: "u".into(), expected: "e".into(), actual: "a".into() }.status()), Some("bundle_checksum_mismatch"));
}

#[tokio::test]
async fn hostile_and_corrupt_archives_are_refused_and_nothing_is_cached() {
    let f = Fixture::new();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot.tar.gz", tar_gz(&[("ok", 0o644, b"x"), ("../escaped", 0o644, b"evil")]), "outside the bundle"),
        ("nested.tar.gz", tar_gz(&[("a/../../escaped", 0o644, b"evil")]), "outside the bundle"),
        ("absolute.tar.gz", tar_gz(&[("/tmp/agentd-bundle-absolute", 0o644, b"evil")]), "outside the bundle"),
        ("corrupt.tar.gz", {
            let mut b = agent_archive();
            let mid = b.len() / 2;
            b[mid..].iter_mut().for_each(|x| *x ^= 0x5a);
            b
        }, "corrupt"),
        ("garbage.tar.gz", vec![0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5, 6, 7], "corrupt"),
        ("empty.tar.gz", tar_gz(&[]), "empty"),
        ("agent.zip", b"PK\x03\x04rest-of-a-zip".to_vec(), "zip"),
    ];
    for (name, bytes, expect) in cases {
        match f.cache.ensure(&f.archive(name, &bytes), None).await {
            Err(e @ BundleError::Invalid { .. }) => {
                assert!(e.to_string().contains(expect), "{name}: {e}");
                assert_eq!(agentd_proto::error::code_of(&e.status()), Some("bundle_invalid"));
            }
            other => panic!("{name}: expected an invalid bundle, got {other:?}"),
        }
        assert!(f.cache_entries().is_empty(), "{name}: {:?}", f.cache_entries());
    }
    assert!(!f.dir.path().join("escaped").exists() && !Path::new("/tmp/agentd-bundle-absolute").exists());
}

#[tokio::test]
async fn bad_urls_and_digests_are_clear_errors() {
    let f = Fixture::new();
    for url in ["ftp://example.invalid/a.tar.gz", "not a url", "/plain/path.tar.gz"] {
        assert!(matches!(f.cache.ensure(url, None).await, Err(BundleError::BadUrl(_))), "{url}");
    }
    assert!(matches!(f.cache.ensure("file:///x.tar.gz", Some("abc")).await, Err(BundleError::BadDigest(_))));
    match f.cache.ensure("file:///definitely/not/here.tar.gz", None).await {
        Err(e @ BundleError::Fetch { .. }) => {
            assert!(e.to_string().contains("/definitely/not/here.tar.gz"), "{e}");
            assert_eq!(agentd_proto::error::code_of(&e.status()), Some("bundle_fetch_failed"));
        }
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert!(f.cache_entries().is_empty());
}

#[tokio::test]
async fn archives_over_the_limit_are_refused_while_streaming() {
    let dir = tempfile::tempdir().unwrap();
    let cache = BundleCache::open(dir.path().join("bundles")).unwrap().with_max_archive_bytes(100);
    let path = dir.path().join("big.tar.gz");
    fs::write(&path, agent_archive().repeat(10)).unwrap();
    assert!(matches!(cache.ensure(&format!("file://{}", path.display()), None).await, Err(BundleError::TooLarge { .. })));
    assert_eq!(fs::read_dir(cache.root()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_of_one_bundle_share_one_whole_tree() {
    let f = Fixture::new();
    let bytes = tar_gz(&(0..200).map(|i| (Box::leak(format!("d/f{i}").into_boxed_str()) as &str, 0o644, &b"data"[..])).collect::<Vec<_>>());
    let url = f.archive("many.tar.gz", &bytes);
    // Two caches on one directory stand for two node processes.
    let a = Arc::new(f.cache);
    let b = Arc::new(BundleCache::open(a.root().to_owned()).unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let cache = Arc::clone(if i % 2 == 0 { &a } else { &b });
        let url = url.clone();
        let digest = (i % 4 == 0).then(|| sha(&bytes));
        tasks.spawn(async move { cache.ensure(&url, digest.as_deref()).await.unwrap() });
    }
    let dirs: Vec<PathBuf> = tasks.join_all().await;
    assert!(dirs.iter().all(|d| *d == a.root().join(sha(&bytes))), "{dirs:?}");
    assert_eq!(fs::read_dir(&dirs[0]).unwrap().count(), 1);
    assert_eq!(fs::read_dir(dirs[0].join("d")).unwrap().count(), 200);
    let names: Vec<_> = fs::read_dir(a.root()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[tokio::test]
async fn leftover_temps_are_removed_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bundles");
    fs::create_dir_all(root.join(".tmp-1234/x")).unwrap();
    fs::write(root.join(".tmp-1234.archive"), b"partial").unwrap();
    fs::create_dir_all(root.join("a".repeat(64))).unwrap();
    let cache = BundleCache::open(root.clone()).unwrap();
    let names: Vec<_> = fs::read_dir(cache.root()).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["a".repeat(64)]);
}

/// Serves `responses` over plain HTTP/1.1 on loopback, one per connection.
async fn http_server(responses: Vec<(u16, Vec<u8>)>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for (code, body) in responses {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let mut request = vec![0u8; 4096];
            let _ = conn.read(&mut request).await;
            let mut head = Vec::new();
            write!(head, "HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len()).unwrap();
            let _ = conn.write_all(&head).await;
            let _ = conn.write_all(&body).await;
        }
    });
    addr
}

#[tokio::test]
async fn fetches_over_http_and_reports_http_errors() {
    let f = Fixture::new();
    let bytes = agent_archive();
    let addr = http_server(vec![(200, bytes.clone()), (404, b"nope".to_vec())]).await;
    let dir = f.cache.ensure(&format!("http://{addr}/agent.tar.gz"), Some(&sha(&bytes))).await.unwrap();
    assert!(dir.join("bin/agent").is_file());
    match f.cache.ensure(&format!("http://{addr}/missing.tar.gz"), None).await {
        Err(e @ BundleError::Fetch { .. }) => assert!(e.to_string().contains("404"), "{e}"),
        other => panic!("expected a fetch error, got {other:?}"),
    }
    assert_eq!(f.cache_entries(), vec![sha(&bytes)]);
}
