//! Listings as aligned columns, and the small formatting they share.

use serde_json::Value;

pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    /// Columns two spaces apart, each as wide as its widest cell; the last
    /// one unpadded. Control characters (a hostile agent id, say) are shown
    /// as `?`.
    pub fn render(&self) -> String {
        let clean = |cell: &str| cell.chars().map(|c| if c.is_control() { '?' } else { c }).collect::<String>();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        let rows: Vec<Vec<String>> = std::iter::once(header).chain(self.rows.iter().map(|r| r.iter().map(|c| clean(c)).collect())).collect();
        let mut widths = vec![0; self.header.len()];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let last = row.len() - 1;
            for (i, cell) in row.iter().enumerate() {
                if i == last {
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
                }
            }
            out.push('\n');
        }
        out
    }
}

/// How long ago `ms` (milliseconds since the epoch) was: `12s`, `5m`,
/// `3h`, `2d`; `-` when unknown.
pub fn age(ms: &Value, now_ms: i64) -> String {
    let Some(ms) = ms.as_i64() else { return "-".into() };
    let s = (now_ms - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A value as a cell: strings bare, numbers as they are, `-` for nothing.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Bytes as `512M`, `1.5G`.
pub fn bytes(v: &Value) -> String {
    let Some(n) = v.as_u64().filter(|n| *n > 0) else { return "-".into() };
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value >= 10.0 || value.fract() == 0.0 { format!("{value:.0}{}", UNITS[unit]) } else { format!("{value:.1}{}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn columns_align_and_the_last_is_not_padded() {
        let mut t = Table::new(&["ID", "STATE", "AGENT"]);
        t.row(vec!["ses_1".into(), "ready".into(), "echo@1.0".into()]);
        t.row(vec!["ses_22222".into(), "closed\x1b[2J".into(), "x".into()]);
        assert_eq!(t.render(), "ID         STATE       AGENT\nses_1      ready       echo@1.0\nses_22222  closed?[2J  x\n");
    }

    #[test]
    fn ages_sizes_and_cells_read_short() {
        let now = 10_000_000;
        assert_eq!(age(&json!(now - 5_000), now), "5s");
        assert_eq!(age(&json!(now - 125_000), now), "2m");
        assert_eq!(age(&json!(now - 7_200_000), now), "2h");
        assert_eq!(age(&json!(now + 1000), now), "0s");
        assert_eq!(age(&Value::Null, now), "-");
        assert_eq!(bytes(&json!(256u64 << 20)), "256M");
        assert_eq!(bytes(&json!(1536u64 << 20)), "1.5G");
        assert_eq!(bytes(&json!(100)), "100");
        assert_eq!(bytes(&json!(0)), "-");
        assert_eq!((cell(&json!("")), cell(&json!(null)), cell(&json!(3)), cell(&json!("a"))), ("-".into(), "-".into(), "3".into(), "a".into()));
    }
}
