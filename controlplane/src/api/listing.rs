//! What listings share: `limit`, an opaque `cursor` (`next_cursor` of the
//! page before: base64url of the listing's name and the last row's position,
//! so a cursor of another listing, or garbage, is refused with 400), and
//! label filters (`label=k=v`, repeatable; every one must match). Labels
//! given at create are checked here too: at most [`MAX_LABELS`], each a
//! valid key and value.

use crate::domain::Code;
use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::Problem;
use crate::store::listing::{After, Filter};

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// The most labels a container or session takes.
pub const MAX_LABELS: usize = 32;

#[derive(Serialize, Deserialize)]
struct Cursor {
    /// Which listing made it.
    l: String,
    t: i64,
    i: String,
}

pub fn encode_cursor(listing: &str, created_at: i64, id: &str) -> String {
    let json = serde_json::to_vec(&Cursor { l: listing.into(), t: created_at, i: id.into() }).expect("a cursor serializes");
    URL_SAFE_NO_PAD.encode(json)
}

fn decode_cursor(listing: &str, text: &str) -> Result<After, Problem> {
    let bad = || Problem::new(axum::http::StatusCode::BAD_REQUEST, Code::InvalidCursor, format!("cursor {text:?} is not a cursor of this listing"));
    let bytes = URL_SAFE_NO_PAD.decode(text.trim()).map_err(|_| bad())?;
    let c: Cursor = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if c.l != listing {
        return Err(bad());
    }
    Ok(After { created_at: c.t, id: c.i })
}

/// Checks labels a client gives a new container or session.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Problem> {
    if labels.len() > MAX_LABELS {
        return Err(Problem::invalid(Code::InvalidLabels, format!("{} labels; at most {MAX_LABELS}", labels.len())));
    }
    if let Some((k, v)) = labels.iter().find(|(k, v)| !agentd_plan::ids::valid_label(k, v)) {
        return Err(Problem::invalid(
            Code::InvalidLabels,
            format!("label {k:?}={v:?}: keys of letters, digits, '.', '-', '_', '/' (1 to 63), values of at most 63 printable characters"),
        ));
    }
    Ok(())
}

/// A listing's query, as clients write it.
#[derive(Debug, Default, Deserialize)]
pub struct Query {
    pub state: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// The filter of `listing` from its query and its `label=k=v` pairs.
pub fn filter(listing: &str, query: &Query, owner: Option<String>, raw_query: Option<&str>) -> Result<Filter, Problem> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Problem::invalid(Code::InvalidRequest, format!("limit must be 1 to {MAX_LIMIT}, got {limit}")));
    }
    let mut labels = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(raw_query.unwrap_or("").as_bytes()) {
        if key != "label" {
            continue;
        }
        let (k, v) = value.split_once('=').ok_or_else(|| Problem::invalid(Code::InvalidRequest, format!("label filter {value:?} is not key=value")))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let after = query.cursor.as_deref().map(|c| decode_cursor(listing, c)).transpose()?;
    Ok(Filter { state: query.state.clone(), owner, labels, after, limit })
}

/// The cursor of the page after `rows`, if it was full.
pub fn next_cursor(listing: &str, limit: i64, last: Option<(i64, &str)>, count: usize) -> Option<String> {
    if i64::try_from(count).unwrap_or(0) < limit {
        return None;
    }
    last.map(|(t, id)| encode_cursor(listing, t, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage_and_other_listings() {
        let c = encode_cursor("sessions", 42, "ses_1");
        assert_eq!(decode_cursor("sessions", &c).unwrap(), After { created_at: 42, id: "ses_1".into() });
        assert_eq!(decode_cursor("containers", &c).unwrap_err().code, "invalid_cursor");
        assert_eq!(decode_cursor("sessions", "%%%").unwrap_err().code, "invalid_cursor");
        assert_eq!(decode_cursor("sessions", &URL_SAFE_NO_PAD.encode("{}")).unwrap_err().code, "invalid_cursor");
    }

    #[test]
    fn labels_are_bounded() {
        assert!(check_labels(&BTreeMap::from([("team".into(), "a".into())])).is_ok());
        assert!(check_labels(&BTreeMap::from([("bad key".into(), "a".into())])).is_err());
        assert!(check_labels(&BTreeMap::from([("k".into(), "x".repeat(64))])).is_err());
        let many: BTreeMap<String, String> = (0..33).map(|i| (format!("k{i}"), "v".to_string())).collect();
        assert_eq!(check_labels(&many).unwrap_err().code, "invalid_labels");
    }
}
