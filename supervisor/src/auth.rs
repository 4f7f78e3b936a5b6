//! `authenticate`: which of an agent's `authMethods` agentd can use without a
//! human, given the credentials the plan put in the agent's environment.
//!
//! ACP v1 methods are `agent` (the agent authenticates itself when asked;
//! the default when `type` is absent) and `terminal` (an interactive login
//! the client runs; never usable here). Drafts add `env_var` (credentials
//! passed as environment variables, `vars: [{name, optional}]`, earlier
//! `varName`): codex-acp 0.16 sends its `codex-api-key` and `openai-api-key`
//! that way. Other real agents leave key-based methods as `agent`, and say
//! which variable in words or not at all: gemini-cli 0.61 sends
//! `gemini-api-key` "Use an API key with Gemini Developer API" and reads
//! `GEMINI_API_KEY` (older releases spelled the variable out). So an `agent`
//! method is usable when its id spelled as a variable (`gemini-api-key` ->
//! `GEMINI_API_KEY`), or a variable named in its name or description, is set;
//! any other `agent` method (a browser login, say) would wait for a human and
//! is never tried unless the plan names it.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

pub use agentd_acp::AUTH_REQUIRED;

/// Variables every plan sets: naming one proves no credential.
const BASE_VARS: &[&str] = &["PATH", "HOME", "LANG", "TMPDIR", "TERM", "USER", "SHELL"];

/// One entry of the agent's `authMethods`, as far as agentd reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthMethod {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    /// `agent`, `terminal`, `env_var` or whatever a newer agent sends.
    pub kind: String,
    /// For `env_var`: the variables, and whether each is optional.
    pub vars: Vec<(String, bool)>,
}

#[derive(Deserialize)]
struct RawVar {
    name: String,
    #[serde(default)]
    optional: bool,
}

impl AuthMethod {
    fn from_json(v: &Value) -> Option<Self> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let kind = text("type").unwrap_or_else(|| "agent".into());
        let mut vars: Vec<(String, bool)> = v
            .get("vars")
            .and_then(|vars| serde_json::from_value::<Vec<RawVar>>(vars.clone()).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.name, r.optional))
            .collect();
        if let Some(name) = text("varName") {
            vars.push((name, false));
        }
        Some(Self { id: text("id")?, name: text("name").unwrap_or_default(), description: text("description"), kind, vars })
    }

    /// The variables this method needs, as far as they can be told.
    fn needs(&self) -> Vec<String> {
        if self.kind == "env_var" {
            return self.vars.iter().filter(|(_, optional)| !optional).map(|(n, _)| n.clone()).collect();
        }
        let from_id = self.id_var();
        let named = self.named_vars().into_iter().filter(|v| *v != from_id);
        std::iter::once(from_id.clone()).chain(named).collect()
    }

    /// The method's id spelled as a variable: `gemini-api-key` -> `GEMINI_API_KEY`.
    fn id_var(&self) -> String {
        self.id.to_uppercase().replace(['-', '.'], "_")
    }

    /// Whether the id names a credential (`gemini-api-key`, `github-token`),
    /// so that its variable spelling is worth telling a human.
    fn id_names_credential(&self) -> bool {
        self.id.to_ascii_lowercase().split(['-', '_', '.']).any(|w| matches!(w, "key" | "apikey" | "token"))
    }

    /// Variables the method's name or description spells out (`GEMINI_API_KEY`).
    fn named_vars(&self) -> Vec<String> {
        let mut named: Vec<String> = Vec::new();
        let words = format!("{} {}", self.name, self.description.as_deref().unwrap_or(""));
        for word in words.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            let looks_like_var = word.len() > 2
                && word.contains('_')
                && word.starts_with(|c: char| c.is_ascii_uppercase())
                && word.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if looks_like_var && !BASE_VARS.contains(&word) && !named.iter().any(|n| n == word) {
                named.push(word.to_string());
            }
        }
        named
    }

    /// Whether the credentials this method needs are in `env`.
    fn usable(&self, env: &HashMap<String, String>) -> bool {
        let set = |name: &String| env.get(name).is_some_and(|v| !v.is_empty());
        match self.kind.as_str() {
            "env_var" => self.vars.iter().any(|(_, optional)| !optional) && self.needs().iter().all(set),
            "agent" => self.needs().iter().any(set),
            _ => false,
        }
    }

    /// `id (name; needs VAR)`, for an error a human reads.
    pub fn describe(&self) -> String {
        let mut out = self.id.clone();
        let mut notes = Vec::new();
        if !self.name.is_empty() {
            notes.push(self.name.clone());
        }
        match self.kind.as_str() {
            "terminal" => notes.push("interactive login".into()),
            "env_var" => notes.push(format!("needs {}", self.needs().join(", "))),
            _ => {
                // Names the agent spelled out; else the id's spelling, but
                // only when the id names a key (not `OAUTH_PERSONAL`).
                let mut named = self.named_vars();
                if named.is_empty() && self.id_names_credential() {
                    named.push(self.id_var());
                }
                if !named.is_empty() {
                    notes.push(format!("needs {}", named.join(", ")));
                }
            }
        }
        if !notes.is_empty() {
            out.push_str(&format!(" ({})", notes.join("; ")));
        }
        out
    }
}

/// The agent's `authMethods`, from its `initialize` answer.
pub fn methods(initialize: &str) -> Vec<AuthMethod> {
    let answer: Value = serde_json::from_str(initialize).unwrap_or(Value::Null);
    answer.get("authMethods").and_then(Value::as_array).map(|a| a.iter().filter_map(AuthMethod::from_json).collect()).unwrap_or_default()
}

/// Why agentd cannot authenticate the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the agent requires authentication but advertises no authMethods")]
    NoMethods,
    #[error("the agent requires authentication and the plan provides credentials for none of its methods: {}", list(.0))]
    NoCredentials(Vec<AuthMethod>),
    #[error("auth method {wanted:?} is not one the agent offers: {}", list(.offered))]
    UnknownMethod { wanted: String, offered: Vec<AuthMethod> },
    #[error("the agent refused every usable auth method: {}", .0.join("; "))]
    Refused(Vec<String>),
}

fn list(methods: &[AuthMethod]) -> String {
    methods.iter().map(AuthMethod::describe).collect::<Vec<_>>().join(", ")
}

/// The method ids to try, in order: the plan's choice alone when it names
/// one, else every method whose credentials are in `env`, in the agent's order.
pub fn candidates(methods: &[AuthMethod], env: &HashMap<String, String>, preferred: Option<&str>) -> Result<Vec<String>, AuthError> {
    if let Some(wanted) = preferred {
        return match methods.iter().find(|m| m.id == wanted) {
            Some(m) => Ok(vec![m.id.clone()]),
            None => Err(AuthError::UnknownMethod { wanted: wanted.to_string(), offered: methods.to_vec() }),
        };
    }
    if methods.is_empty() {
        return Err(AuthError::NoMethods);
    }
    let usable: Vec<String> = methods.iter().filter(|m| m.usable(env)).map(|m| m.id.clone()).collect();
    if usable.is_empty() {
        return Err(AuthError::NoCredentials(methods.to_vec()));
    }
    Ok(usable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Every shape agentd reads (older gemini and codex-acp releases named
    /// their variables in the description).
    const REAL: &str = r#"{"protocolVersion":1,"authMethods":[
        {"id":"oauth-personal","name":"Log in with Google","description":null},
        {"id":"gemini-api-key","name":"Use Gemini API key","description":"Requires setting the `GEMINI_API_KEY` environment variable"},
        {"id":"openai-api-key","name":"Use OPENAI_API_KEY","description":"Requires setting the `OPENAI_API_KEY` environment variable."},
        {"id":"tui","name":"Terminal login","type":"terminal","args":["--login"]},
        {"id":"env","name":"Token","type":"env_var","vars":[{"name":"X_TOKEN"},{"name":"X_REGION","optional":true}]},
        {"id":"old-env","name":"Old draft","type":"env_var","varName":"OLD_TOKEN"}]}"#;

    #[test]
    fn methods_are_picked_by_the_credentials_in_the_environment() {
        let m = methods(REAL);
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].kind, "agent");
        let base = env(&[("PATH", "/bin"), ("HOME", "/workspace")]);
        match candidates(&m, &base, None) {
            Err(AuthError::NoCredentials(all)) => assert_eq!(all.len(), 6),
            other => panic!("{other:?}"),
        }
        assert_eq!(candidates(&m, &env(&[("GEMINI_API_KEY", "k")]), None).unwrap(), ["gemini-api-key"]);
        assert_eq!(candidates(&m, &env(&[("OPENAI_API_KEY", "k"), ("X_TOKEN", "t")]), None).unwrap(), ["openai-api-key", "env"]);
        assert_eq!(candidates(&m, &env(&[("OLD_TOKEN", "t")]), None).unwrap(), ["old-env"]);
        assert!(candidates(&m, &env(&[("GEMINI_API_KEY", "")]), None).is_err(), "an empty value is no credential");
        assert!(candidates(&m, &env(&[("X_REGION", "eu")]), None).is_err(), "optional vars alone are not enough");
        assert_eq!(candidates(&m, &base, Some("oauth-personal")).unwrap(), ["oauth-personal"]);
        assert!(matches!(candidates(&m, &base, Some("nope")), Err(AuthError::UnknownMethod { .. })));
        assert_eq!(candidates(&[], &base, None), Err(AuthError::NoMethods));
    }

    /// codex-acp 0.16.0's and gemini-cli 0.61.0's `authMethods`, verbatim
    /// from their `initialize` answers (run by hand with an empty HOME).
    const CODEX_ACP: &str = r#"{"protocolVersion":1,"authMethods":[
        {"id":"chatgpt","name":"Login with ChatGPT","description":"Use your ChatGPT login with Codex CLI (requires a paid ChatGPT subscription)"},
        {"type":"env_var","id":"codex-api-key","name":"Use CODEX_API_KEY","description":"Requires setting the `CODEX_API_KEY` environment variable.","vars":[{"name":"CODEX_API_KEY"}]},
        {"type":"env_var","id":"openai-api-key","name":"Use OPENAI_API_KEY","description":"Requires setting the `OPENAI_API_KEY` environment variable.","vars":[{"name":"OPENAI_API_KEY"}]}]}"#;
    const GEMINI_CLI: &str = r#"{"protocolVersion":1,"authMethods":[
        {"id":"oauth-personal","name":"Log in with Google","description":"Log in with your Google account"},
        {"id":"gemini-api-key","name":"Gemini API key","description":"Use an API key with Gemini Developer API","_meta":{"api-key":{"provider":"google"}}},
        {"id":"vertex-ai","name":"Vertex AI","description":"Use an API key with Vertex AI GenAI API"},
        {"id":"gateway","name":"AI API Gateway","description":"Use a custom AI API Gateway","_meta":{"gateway":{"protocol":"google","restartRequired":"false"}}}]}"#;

    #[test]
    fn real_agents_methods_are_picked_by_their_keys() {
        let codex = methods(CODEX_ACP);
        assert_eq!(codex.iter().map(|m| m.kind.as_str()).collect::<Vec<_>>(), ["agent", "env_var", "env_var"]);
        assert!(matches!(candidates(&codex, &env(&[("HOME", "/workspace")]), None), Err(AuthError::NoCredentials(_))));
        assert_eq!(candidates(&codex, &env(&[("OPENAI_API_KEY", "k")]), None).unwrap(), ["openai-api-key"]);
        assert_eq!(candidates(&codex, &env(&[("CODEX_API_KEY", "k"), ("OPENAI_API_KEY", "k")]), None).unwrap(), ["codex-api-key", "openai-api-key"]);
        let e = candidates(&codex, &HashMap::new(), None).unwrap_err().to_string();
        assert!(e.ends_with("chatgpt (Login with ChatGPT), codex-api-key (Use CODEX_API_KEY; needs CODEX_API_KEY), openai-api-key (Use OPENAI_API_KEY; needs OPENAI_API_KEY)"), "{e}");

        let gemini = methods(GEMINI_CLI);
        assert_eq!(candidates(&gemini, &env(&[("GEMINI_API_KEY", "k")]), None).unwrap(), ["gemini-api-key"]);
        assert!(candidates(&gemini, &env(&[("GOOGLE_API_KEY", "k")]), None).is_err(), "vertex-ai is not guessed from GOOGLE_API_KEY");
        let e = candidates(&gemini, &HashMap::new(), None).unwrap_err().to_string();
        // The key's variable is told from the id; a login's id is not a variable.
        assert!(e.ends_with("oauth-personal (Log in with Google), gemini-api-key (Gemini API key; needs GEMINI_API_KEY), vertex-ai (Vertex AI), gateway (AI API Gateway)"), "{e}");
    }

    #[test]
    fn the_error_names_each_method_and_what_it_needs() {
        let e = candidates(&methods(REAL), &HashMap::new(), None).unwrap_err().to_string();
        assert!(e.contains("oauth-personal (Log in with Google)"), "{e}");
        assert!(e.contains("gemini-api-key (Use Gemini API key; needs GEMINI_API_KEY)"), "{e}");
        assert!(e.contains("tui (Terminal login; interactive login)"), "{e}");
        assert!(e.contains("env (Token; needs X_TOKEN)"), "{e}");
    }
}
