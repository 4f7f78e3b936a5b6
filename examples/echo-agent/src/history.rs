//! What `--load-session` keeps of each session on disk, so that a later run
//! of the agent (a restart, another agent process in the same sandbox) can
//! `session/load` it and replay it: its working directory and, per echoed
//! turn, the prompt and the answer. One JSON file per session under
//! `$HOME/.echo-agent/sessions/` (the current directory without HOME).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// One session's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub cwd: String,
    /// (prompt, answer) per echoed turn, oldest first.
    pub turns: Vec<(String, String)>,
}

pub struct History {
    dir: PathBuf,
}

impl History {
    pub fn from_env() -> Self {
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        Self::at(&home.join(".echo-agent").join("sessions"))
    }

    pub fn at(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    fn file(&self, id: &str) -> Option<PathBuf> {
        // Session ids name files: nothing that could leave the directory.
        let safe = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        safe.then(|| self.dir.join(format!("{id}.json")))
    }

    pub fn load(&self, id: &str) -> Option<Record> {
        let text = std::fs::read_to_string(self.file(id)?).ok()?;
        let value: Value = serde_json::from_str(&text).ok()?;
        let turns = value["turns"]
            .as_array()?
            .iter()
            .filter_map(|t| Some((t[0].as_str()?.to_string(), t[1].as_str()?.to_string())))
            .collect();
        Some(Record { cwd: value["cwd"].as_str().unwrap_or_default().to_string(), turns })
    }

    /// Writes the record whole (write to a temp file, rename); a failure is
    /// logged, the session goes on in memory.
    pub fn save(&self, id: &str, record: &Record) {
        let Some(file) = self.file(id) else { return };
        let value = json!({"cwd": record.cwd, "turns": record.turns.iter().map(|(p, a)| json!([p, a])).collect::<Vec<_>>()});
        let tmp = file.with_extension("json.tmp");
        let written = std::fs::create_dir_all(&self.dir)
            .and_then(|()| std::fs::write(&tmp, value.to_string()))
            .and_then(|()| std::fs::rename(&tmp, &file));
        if let Err(e) = written {
            tracing::warn!(path = %file.display(), error = %e, "cannot save the session's history");
        }
    }

    /// The ids of every session on disk.
    pub fn ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut ids: Vec<String> =
            entries.filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json").map(str::to_string)).collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_ids_stay_inside() {
        let dir = std::env::temp_dir().join(format!("echo-history-{}", std::process::id()));
        let history = History::at(&dir);
        let record = Record { cwd: "/w".into(), turns: vec![("hi".into(), "hi".into())] };
        history.save("sess_1", &record);
        assert_eq!(history.load("sess_1"), Some(record));
        assert_eq!(history.ids(), vec!["sess_1".to_string()]);
        assert_eq!(history.load("../etc/passwd"), None);
        assert_eq!(history.load("sess_2"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
