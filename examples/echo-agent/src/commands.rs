//! Prompt commands that make the agent call its client's file-system and
//! terminal methods, so a client's implementation of them can be tested end
//! to end through an ordinary prompt:
//!
//! ```text
//! /read PATH [LINE [LIMIT]]     fs/read_text_file
//! /write PATH TEXT              fs/write_text_file (TEXT: the rest of the prompt, verbatim)
//! /run [--limit N] [--cwd DIR] [--env NAME=VALUE]... CMD [ARG...]
//!                               terminal/create, wait_for_exit, output, release
//! /kill CMD [ARG...]            terminal/create, kill, wait_for_exit, output, release
//! /output TERMINAL_ID           terminal/output on any id (an unknown one, say)
//! /ask [--cancel-after MS] [TITLE]
//!                               session/request_permission; with --cancel-after, the
//!                               agent sends `$/cancel_request` for it after MS ms
//! /crash [CODE [orphan]]        the agent exits at once with CODE (default 70), mid-turn;
//!                               with `orphan`, it first starts `sleep 600` in its
//!                               process group, which outlives it unless the client
//!                               kills the group
//! /dirs                         names the session's additionalDirectories ("dirs: none")
//! /logout                       forget `authenticate` (with --require-auth): the next
//!                               prompt is answered `auth_required`
//! /emit garbage|stray|huge MIB  writes a non-JSON line, an answer to a request never
//!                               sent, or a MIB-long line, then ends the turn normally
//! ```
//!
//! Words are split on whitespace; single or double quotes keep a word
//! together (`/run sh -c 'exit 3'`) and a backslash escapes the next
//! character. Any other prompt, including an unknown `/word`, is echoed.

/// One parsed prompt command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Read {
        path: String,
        line: Option<u32>,
        limit: Option<u32>,
    },
    Write {
        path: String,
        content: String,
    },
    Run(RunSpec),
    Kill {
        command: String,
        args: Vec<String>,
    },
    Output {
        terminal_id: String,
    },
    /// `session/request_permission` for a tool call titled `title`, with an
    /// allow and a reject option.
    Ask {
        title: String,
        /// Withdraw the request (`$/cancel_request`) after this many ms.
        cancel_after_ms: Option<u64>,
    },
    /// Exit the whole agent process with this code, without answering.
    Crash {
        code: i32,
        /// Leave a child behind in the agent's process group.
        orphan: bool,
    },
    /// Write something that is not a valid message to stdout.
    Emit(Emit),
    /// Forget the authentication, as an expired token would.
    Logout,
    /// Name the MCP servers the session was given.
    Mcp,
    /// Name the `additionalDirectories` the session was given.
    Dirs,
    /// A known command used wrongly: the text explains how to use it.
    Usage(&'static str),
}

/// What `/emit` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    Garbage,
    /// A response to an id the client never used.
    Stray,
    /// A line of this many MiB.
    Huge(usize),
}

/// What `/run` asks the client to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunSpec {
    pub command: String,
    pub args: Vec<String>,
    pub output_byte_limit: Option<u64>,
    pub cwd: Option<String>,
    pub env: Vec<(String, String)>,
}

const READ_USAGE: &str = "usage: /read PATH [LINE [LIMIT]]";
const WRITE_USAGE: &str = "usage: /write PATH TEXT";
const RUN_USAGE: &str = "usage: /run [--limit N] [--cwd DIR] [--env NAME=VALUE]... CMD [ARG...]";
const KILL_USAGE: &str = "usage: /kill CMD [ARG...]";
const OUTPUT_USAGE: &str = "usage: /output TERMINAL_ID";
const ASK_USAGE: &str = "usage: /ask [--cancel-after MS] [TITLE]";
const CRASH_USAGE: &str = "usage: /crash [CODE [orphan]]";
const EMIT_USAGE: &str = "usage: /emit garbage|stray|huge MIB";

/// The command `text` spells, or `None` for a prompt to echo.
pub fn parse(text: &str) -> Option<Command> {
    let rest = text.strip_prefix('/')?;
    let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let command = match name {
        "read" => parse_read(args),
        "write" => parse_write(args),
        "run" => parse_run(args),
        "kill" => match words(args) {
            Some(mut w) if !w.is_empty() => {
                let command = w.remove(0);
                Command::Kill { command, args: w }
            }
            _ => Command::Usage(KILL_USAGE),
        },
        "ask" => parse_ask(args),
        "crash" => match words(args).as_deref() {
            Some([]) => Command::Crash { code: 70, orphan: false },
            Some([code]) => code.parse().map_or(Command::Usage(CRASH_USAGE), |code| Command::Crash { code, orphan: false }),
            Some([code, o]) if o == "orphan" => {
                code.parse().map_or(Command::Usage(CRASH_USAGE), |code| Command::Crash { code, orphan: true })
            }
            _ => Command::Usage(CRASH_USAGE),
        },
        "logout" => Command::Logout,
        "mcp" => Command::Mcp,
        "dirs" => Command::Dirs,
        "emit" => match words(args).as_deref() {
            Some([w]) if w == "garbage" => Command::Emit(Emit::Garbage),
            Some([w]) if w == "stray" => Command::Emit(Emit::Stray),
            Some([w, mib]) if w == "huge" => mib.parse().map_or(Command::Usage(EMIT_USAGE), |n| Command::Emit(Emit::Huge(n))),
            _ => Command::Usage(EMIT_USAGE),
        },
        "output" => match words(args).as_deref() {
            Some([id]) => Command::Output {
                terminal_id: id.clone(),
            },
            _ => Command::Usage(OUTPUT_USAGE),
        },
        _ => return None,
    };
    Some(command)
}

fn parse_ask(args: &str) -> Command {
    let mut args = args.trim();
    let mut cancel_after_ms = None;
    if let Some(rest) = args.strip_prefix("--cancel-after") {
        let rest = rest.trim_start();
        let (ms, title) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        match ms.parse() {
            Ok(ms) => cancel_after_ms = Some(ms),
            Err(_) => return Command::Usage(ASK_USAGE),
        }
        args = title.trim();
    }
    let title = if args.is_empty() { "a tool call".into() } else { args.to_string() };
    Command::Ask { title, cancel_after_ms }
}

fn parse_read(args: &str) -> Command {
    let Some(w) = words(args) else {
        return Command::Usage(READ_USAGE);
    };
    let number = |s: Option<&String>| match s {
        None => Ok(None),
        Some(s) => s.parse::<u32>().map(Some),
    };
    match (w.first(), number(w.get(1)), number(w.get(2)), w.len()) {
        (Some(path), Ok(line), Ok(limit), 1..=3) => Command::Read {
            path: path.clone(),
            line,
            limit,
        },
        _ => Command::Usage(READ_USAGE),
    }
}

/// The path is the first word; the content is everything after the one
/// whitespace character that follows it, kept exactly (newlines included).
fn parse_write(args: &str) -> Command {
    let args = args.trim_start();
    let Some((path, content)) = args.split_once(char::is_whitespace) else {
        return Command::Usage(WRITE_USAGE);
    };
    // split_once consumed exactly one whitespace character.
    Command::Write {
        path: path.to_string(),
        content: content.to_string(),
    }
}

fn parse_run(args: &str) -> Command {
    let Some(mut w) = words(args) else {
        return Command::Usage(RUN_USAGE);
    };
    let mut spec = RunSpec::default();
    w.reverse();
    while let Some(word) = w.pop() {
        match word.as_str() {
            "--limit" => match w.pop().and_then(|n| n.parse().ok()) {
                Some(n) => spec.output_byte_limit = Some(n),
                None => return Command::Usage(RUN_USAGE),
            },
            "--cwd" => match w.pop() {
                Some(dir) => spec.cwd = Some(dir),
                None => return Command::Usage(RUN_USAGE),
            },
            "--env" => match w.pop().as_deref().and_then(|v| v.split_once('=')) {
                Some((name, value)) => spec.env.push((name.to_string(), value.to_string())),
                None => return Command::Usage(RUN_USAGE),
            },
            _ => {
                spec.command = word;
                w.reverse();
                spec.args = w;
                return Command::Run(spec);
            }
        }
    }
    Command::Usage(RUN_USAGE)
}

/// Shell-like words: whitespace separates, quotes group, a backslash escapes
/// outside single quotes. `None` if a quote is left open.
pub fn words(text: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => w.push(c),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => w.push(chars.next()?),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).push(chars.next()?),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn other_prompts_are_not_commands() {
        assert_eq!(parse("hello"), None);
        assert_eq!(parse("/unknown thing"), None);
        assert_eq!(parse(" /read x"), None);
    }

    #[test]
    fn read_takes_a_path_and_an_optional_range() {
        assert_eq!(
            parse("/read /w/a.txt"),
            Some(Command::Read {
                path: "/w/a.txt".into(),
                line: None,
                limit: None
            })
        );
        assert_eq!(
            parse("/read /w/a.txt 2 3"),
            Some(Command::Read {
                path: "/w/a.txt".into(),
                line: Some(2),
                limit: Some(3)
            })
        );
        assert_eq!(parse("/read"), Some(Command::Usage(READ_USAGE)));
        assert_eq!(parse("/read a b"), Some(Command::Usage(READ_USAGE)));
        assert_eq!(parse("/read a 1 2 3"), Some(Command::Usage(READ_USAGE)));
    }

    #[test]
    fn write_keeps_the_text_verbatim() {
        assert_eq!(
            parse("/write /w/f.txt  two spaces\nand a line\n"),
            Some(Command::Write {
                path: "/w/f.txt".into(),
                content: " two spaces\nand a line\n".into()
            })
        );
        assert_eq!(
            parse("/write /w/f.txt "),
            Some(Command::Write {
                path: "/w/f.txt".into(),
                content: String::new()
            })
        );
        assert_eq!(parse("/write /w/f.txt"), Some(Command::Usage(WRITE_USAGE)));
    }

    #[test]
    fn run_takes_options_then_the_command() {
        assert_eq!(
            parse("/run --limit 10 --env A=b=c --cwd /tmp sh -c 'exit 3' --limit"),
            Some(Command::Run(RunSpec {
                command: "sh".into(),
                args: strings(&["-c", "exit 3", "--limit"]),
                output_byte_limit: Some(10),
                cwd: Some("/tmp".into()),
                env: vec![("A".into(), "b=c".into())],
            }))
        );
        assert_eq!(
            parse("/run /bin/echo hi"),
            Some(Command::Run(RunSpec {
                command: "/bin/echo".into(),
                args: strings(&["hi"]),
                ..RunSpec::default()
            }))
        );
        assert_eq!(parse("/run"), Some(Command::Usage(RUN_USAGE)));
        assert_eq!(parse("/run --limit x sh"), Some(Command::Usage(RUN_USAGE)));
        assert_eq!(
            parse("/run --env NOEQUALS sh"),
            Some(Command::Usage(RUN_USAGE))
        );
    }

    #[test]
    fn kill_and_output() {
        assert_eq!(
            parse("/kill sleep 100"),
            Some(Command::Kill {
                command: "sleep".into(),
                args: strings(&["100"])
            })
        );
        assert_eq!(parse("/kill"), Some(Command::Usage(KILL_USAGE)));
        assert_eq!(
            parse("/output term_x"),
            Some(Command::Output {
                terminal_id: "term_x".into()
            })
        );
        assert_eq!(parse("/output"), Some(Command::Usage(OUTPUT_USAGE)));
    }

    #[test]
    fn ask_takes_an_optional_cancel_delay() {
        assert_eq!(parse("/ask rm -rf /"), Some(Command::Ask { title: "rm -rf /".into(), cancel_after_ms: None }));
        assert_eq!(parse("/ask"), Some(Command::Ask { title: "a tool call".into(), cancel_after_ms: None }));
        assert_eq!(parse("/ask --cancel-after 200 x y"), Some(Command::Ask { title: "x y".into(), cancel_after_ms: Some(200) }));
        assert_eq!(parse("/ask --cancel-after soon"), Some(Command::Usage(ASK_USAGE)));
    }

    #[test]
    fn crash_and_emit() {
        assert_eq!(parse("/crash"), Some(Command::Crash { code: 70, orphan: false }));
        assert_eq!(parse("/crash 9"), Some(Command::Crash { code: 9, orphan: false }));
        assert_eq!(parse("/crash 9 orphan"), Some(Command::Crash { code: 9, orphan: true }));
        assert_eq!(parse("/crash 9 x"), Some(Command::Usage(CRASH_USAGE)));
        assert_eq!(parse("/crash x"), Some(Command::Usage(CRASH_USAGE)));
        assert_eq!(parse("/emit garbage"), Some(Command::Emit(Emit::Garbage)));
        assert_eq!(parse("/emit stray"), Some(Command::Emit(Emit::Stray)));
        assert_eq!(parse("/emit huge 17"), Some(Command::Emit(Emit::Huge(17))));
        assert_eq!(parse("/emit huge"), Some(Command::Usage(EMIT_USAGE)));
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(words("a  b\tc").unwrap(), strings(&["a", "b", "c"]));
        assert_eq!(
            words(r#"sh -c 'echo "hi"; exit 3'"#).unwrap(),
            strings(&["sh", "-c", r#"echo "hi"; exit 3"#])
        );
        assert_eq!(
            words(r#"a"b c"d e\ f "x\"y""#).unwrap(),
            strings(&["ab cd", "e f", "x\"y"])
        );
        assert_eq!(words("''").unwrap(), strings(&[""]));
        assert_eq!(words("").unwrap(), Vec::<String>::new());
        assert_eq!(words("'open"), None);
    }
}
