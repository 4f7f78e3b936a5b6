//! The `Idempotency-Key` request header of `POST /v1/sessions` and
//! `POST /v1/sessions/{id}:prompt`.
//!
//! A client that did not get an answer (a timeout, a dropped connection, a
//! 503 after the write had committed) sends the request again with the same
//! key and gets the first request's answer instead of a second session or
//! run. The key is stored with what the first request made (the session, the
//! run: migration 0005), with a digest of the request; a repeat waits for
//! that request's step as the first did, and answers as it did. The same key
//! with a different request is refused (422 `idempotency_key_reused`).
//! Prompt keys are per session; create keys are global.

use crate::domain::Code;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

use super::Problem;

pub const HEADER: &str = "idempotency-key";

/// Set on an answer that repeats a first request's answer.
pub const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest key accepted.
const MAX_LEN: usize = 255;

/// A request's key and the digest of what it asked.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub key: String,
    pub digest: String,
}

/// The request's `Idempotency-Key`, if any, with the digest of `request`
/// (the request as parsed and normalized, so that spellings of one request
/// that mean the same match).
pub fn from_headers(headers: &HeaderMap, request: &serde_json::Value) -> Result<Option<Keyed>, Problem> {
    let Some(value) = headers.get(HEADER) else { return Ok(None) };
    let key = value.to_str().ok().filter(|k| !k.is_empty() && k.len() <= MAX_LEN && k.bytes().all(|b| b.is_ascii_graphic()));
    let Some(key) = key else {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidIdempotencyKey,
            format!("Idempotency-Key must be 1 to {MAX_LEN} visible ASCII characters"),
        ));
    };
    let mut canonical = String::new();
    write_canonical(request, &mut canonical);
    let digest = hex::encode(Sha256::digest(canonical.as_bytes()));
    Ok(Some(Keyed { key: key.to_string(), digest }))
}

/// `value` as JSON with every object's keys sorted, so that equal values
/// print alike (serde_json keeps insertion order when a crate of the build
/// enables its `preserve_order` feature).
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The answer to a key already used: the first request's, unless this
/// request is a different one.
pub fn check_same(keyed: &Keyed, stored_digest: Option<&str>, what: &str) -> Result<(), Problem> {
    if stored_digest == Some(keyed.digest.as_str()) {
        return Ok(());
    }
    Err(Problem::invalid(
        Code::IdempotencyKeyReused,
        format!("Idempotency-Key {:?} was used for a different {what}: use a new key for a new request", keyed.key),
    ))
}

/// Marks a replayed answer.
pub fn replayed() -> (HeaderName, HeaderValue) {
    (REPLAYED, HeaderValue::from_static("true"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_str(key).unwrap());
        h
    }

    #[test]
    fn keys_are_checked_and_requests_digested_by_meaning() {
        assert!(from_headers(&HeaderMap::new(), &json!({})).unwrap().is_none());
        let a = from_headers(&headers("k-1"), &json!({"b": 1, "a": [1, 2]})).unwrap().unwrap();
        let b = from_headers(&headers("k-1"), &serde_json::from_str(r#"{"a":[1,2],"b":1}"#).unwrap()).unwrap().unwrap();
        assert_eq!((a.key.as_str(), a.digest.len()), ("k-1", 64));
        assert_eq!(a.digest, b.digest, "key order does not matter");
        let nested = from_headers(&headers("k"), &json!({"x": {"b": 1, "a": 2}})).unwrap().unwrap();
        let reordered = from_headers(&headers("k"), &serde_json::from_str(r#"{"x":{"a":2,"b":1}}"#).unwrap()).unwrap().unwrap();
        assert_eq!(nested.digest, reordered.digest, "nor in nested objects");
        check_same(&a, Some(&b.digest), "prompt").unwrap();
        let other = from_headers(&headers("k-1"), &json!({"a": [2, 1], "b": 1})).unwrap().unwrap();
        assert_eq!(check_same(&other, Some(&a.digest), "prompt").unwrap_err().code, "idempotency_key_reused");
        for bad in ["has space", &"x".repeat(256)] {
            assert_eq!(from_headers(&headers(bad), &json!({})).unwrap_err().code, "invalid_idempotency_key");
        }
        let mut empty = HeaderMap::new();
        empty.insert(HEADER, HeaderValue::from_static(""));
        assert_eq!(from_headers(&empty, &json!({})).unwrap_err().code, "invalid_idempotency_key");
    }
}
