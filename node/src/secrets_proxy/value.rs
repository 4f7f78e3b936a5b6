//! A secret's value in the node's memory.

use zeroize::Zeroizing;

/// The value of one secret. Debug shows no part of it and there is no
/// Display, so it cannot reach a log by `{}` or `{:?}`; its buffer is wiped
/// when dropped. Copies made to send it (the header in hyper's buffers) are
/// not wiped: they live as long as a request.
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// A value that can be sent as a header: visible ASCII, spaces and tabs,
    /// not empty (a line break would end the header and start another).
    pub fn new(value: String) -> Result<SecretValue, String> {
        let value = Zeroizing::new(value);
        if value.is_empty() {
            return Err("is empty".into());
        }
        if !value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            return Err("holds a character a header cannot carry (a line break, a control character or non-ASCII)".into());
        }
        Ok(SecretValue(value))
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_never_shown_and_must_fit_a_header() {
        let v = SecretValue::new("sk-very-secret".into()).unwrap();
        assert_eq!(format!("{v:?}"), "SecretValue(redacted)");
        assert_eq!(format!("{:?}", Some(&v)), "Some(SecretValue(redacted))");
        assert_eq!(v.expose(), "sk-very-secret");
        for bad in ["", "a\nb", "a\rb", "caf\u{e9}", "a\0b"] {
            assert!(SecretValue::new(bad.into()).is_err(), "{bad:?}");
        }
    }
}
