//! The store `agentd up` would open: the embedded SQLite file, opened
//! read-only if it exists (doctor never creates or migrates it), or the
//! PostgreSQL server, connected to and asked its version. Bounded by a
//! timeout: a server that never answers fails the row, it does not hang
//! doctor. The URL's password never reaches the output ([`redact`]).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use super::Row;

const NAME: &str = "database";

pub fn check(database_url: Option<&str>, state_dir: &Path, timeout: Duration) -> Row {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Row::fail(NAME, format!("cannot start a runtime to connect: {e}"), "retry"),
    };
    let row = runtime.block_on(async {
        match database_url {
            Some(url) => postgres(url, timeout).await,
            None => sqlite(&state_dir.join("agentd.db"), timeout).await,
        }
    });
    // A connect still resolving a name on a blocking thread must not hold
    // doctor up on its way out.
    runtime.shutdown_background();
    row
}

async fn sqlite(path: &Path, timeout: Duration) -> Row {
    let shown = path.display();
    if !path.exists() {
        return Row::ok(NAME, format!("SQLite {shown} does not exist yet; agentd up creates it"));
    }
    let options = SqliteConnectOptions::new().filename(path).read_only(true).busy_timeout(timeout);
    let opened = tokio::time::timeout(timeout, async {
        let mut conn = options.connect().await?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM sqlite_master").fetch_one(&mut conn).await?;
        let _ = sqlx::Connection::close(conn).await;
        Ok::<_, sqlx::Error>(count)
    })
    .await;
    match opened {
        Ok(Ok(count)) => Row::ok(NAME, format!("SQLite {shown}: opened read-only ({count} schema objects)")),
        Ok(Err(e)) => Row::fail(NAME, format!("SQLite {shown}: {e}"), format!("check {shown} is a SQLite database agentd may read and write")),
        Err(_) => Row::fail(NAME, format!("SQLite {shown}: no answer within {} ms", timeout.as_millis()), "another process may hold it locked"),
    }
}

async fn postgres(url: &str, timeout: Duration) -> Row {
    let shown = redact(url);
    let remedy = "check that the server runs and accepts agentd, and the URL (--database-url, AGENTD_DATABASE_URL or database_url in the config)";
    let options = match PgConnectOptions::from_str(url) {
        Ok(options) => options,
        Err(e) => return Row::fail(NAME, format!("{shown} is not a PostgreSQL URL: {}", scrub(&e.to_string(), url)), remedy),
    };
    let connected = tokio::time::timeout(timeout, async {
        let mut conn = options.connect().await?;
        let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut conn).await?;
        let _ = sqlx::Connection::close(conn).await;
        Ok::<_, sqlx::Error>(version)
    })
    .await;
    match connected {
        Ok(Ok(version)) => Row::ok(NAME, format!("PostgreSQL {shown}: connected, server {version}")),
        Ok(Err(e)) => Row::fail(NAME, format!("PostgreSQL {shown}: {}", scrub(&e.to_string(), url)), remedy),
        Err(_) => Row::fail(NAME, format!("PostgreSQL {shown}: no answer within {} ms", timeout.as_millis()), remedy),
    }
}

/// `scheme://[userinfo@]rest`, split at the last `@`, so that a password
/// holding an unescaped `/`, `?` or `@` stays in the user info (an `@` in
/// the query makes more of the URL count as user info: hidden, not shown).
fn split(url: &str) -> Option<(&str, Option<&str>, &str)> {
    let (scheme, rest) = url.split_once("://")?;
    Some(match rest.rsplit_once('@') {
        Some((userinfo, after)) => (scheme, Some(userinfo), after),
        None => (scheme, None, rest),
    })
}

/// The URL with its password (in the user info, or a `password=` query
/// parameter, which sqlx also reads) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, userinfo, after)) = split(url) else { return "(a URL without a scheme)".into() };
    let userinfo = match userinfo.map(|ui| ui.split_once(':').map_or(ui, |(user, _)| user)) {
        Some(user) if userinfo.is_some_and(|ui| ui.contains(':')) => format!("{user}:***@"),
        Some(user) => format!("{user}@"),
        None => String::new(),
    };
    let after = match after.split_once('?') {
        Some((before, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{before}?{}", params.join("&"))
        }
        None => after.to_owned(),
    };
    format!("{scheme}://{userinfo}{after}")
}

/// `text` with every form of `url`'s passwords (as written and
/// percent-decoded) replaced by `***`, in case an error quotes one.
pub fn scrub(text: &str, url: &str) -> String {
    let mut out = text.to_owned();
    for secret in secrets(url) {
        for form in [percent_decode(&secret), secret] {
            if !form.is_empty() {
                out = out.replace(&form, "***");
            }
        }
    }
    out
}

fn secrets(url: &str) -> Vec<String> {
    let Some((_, userinfo, after)) = split(url) else { return Vec::new() };
    let mut found: Vec<String> = userinfo.and_then(|ui| ui.split_once(':')).map(|(_, pw)| pw.to_owned()).into_iter().collect();
    if let Some((_, query)) = after.split_once('?') {
        found.extend(query.split('&').filter_map(|p| p.split_once('=')).filter(|(k, _)| k.eq_ignore_ascii_case("password")).map(|(_, v)| v.to_owned()));
    }
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn redacts_passwords_wherever_they_are() {
        assert_eq!(redact("postgres://agentd:s3cret@db:5432/agentd"), "postgres://agentd:***@db:5432/agentd");
        assert_eq!(redact("postgres://agentd@db/agentd"), "postgres://agentd@db/agentd");
        assert_eq!(redact("postgres://db/agentd?user=a&password=pw&sslmode=require"), "postgres://db/agentd?user=a&password=***&sslmode=require");
        assert_eq!(redact("postgres://u:p%40ss@db"), "postgres://u:***@db");
        assert_eq!(redact("postgres://u:a/b?c@d@db/x"), "postgres://u:***@db/x", "unescaped characters stay in the password");
        assert_eq!(scrub("bad p@ss and p%40ss", "postgres://u:p%40ss@db"), "bad *** and ***");
    }

    #[test]
    fn a_closed_port_fails_fast_without_the_password() {
        // A port just bound and released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("postgres://agentd:hunter2@127.0.0.1:{port}/agentd");
        let started = std::time::Instant::now();
        let row = check(Some(&url), Path::new("/nonexistent"), Duration::from_secs(5));
        assert_eq!(row.status, Status::Fail, "{row:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = format!("{row:?}");
        assert!(!text.contains("hunter2") && text.contains("agentd:***@127.0.0.1"), "{text}");
    }

    #[test]
    fn sqlite_is_opened_read_only_or_left_to_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let row = check(None, dir.path(), Duration::from_secs(5));
        assert_eq!(row.status, Status::Ok);
        assert!(!dir.path().join("agentd.db").exists(), "doctor creates no store");
        std::fs::write(dir.path().join("agentd.db"), "not a database, just text that is long enough to be read as a header").unwrap();
        assert_eq!(check(None, dir.path(), Duration::from_secs(5)).status, Status::Fail);
    }
}
