//! How an echoed text is cut into `agent_message_chunk` updates.
//!
//! Clients under test reassemble the streamed chunks, so the one property that
//! matters is that concatenating the chunks gives back the input exactly:
//! no whitespace is trimmed, merged or invented, and multi-byte characters are
//! never split.

use std::num::NonZeroUsize;

/// The chunk boundaries the agent streams with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    /// One chunk per whitespace-separated word, carrying the whitespace that
    /// follows it. Resembles how a model streams tokens, which is what most
    /// client code is written against.
    Words,
    /// Fixed-size chunks of this many characters (not bytes), for tests that
    /// need a predictable number of updates.
    Chars(NonZeroUsize),
}

/// Splits `text` into chunks whose concatenation is exactly `text`.
///
/// An empty text gives no chunks: an empty `agent_message_chunk` would carry no
/// information and only complicate update counting in tests.
pub fn split(text: &str, chunking: Chunking) -> Vec<&str> {
    match chunking {
        Chunking::Words => split_words(text),
        Chunking::Chars(n) => split_chars(text, n.get()),
    }
}

/// A chunk ends where a new word starts after whitespace. Leading whitespace
/// stays with the first word so that no chunk is whitespace only, except for
/// an all-whitespace text.
fn split_words(text: &str) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut seen_word = false;
    let mut prev_space = false;
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        if !space && prev_space && seen_word {
            chunks.push(&text[start..i]);
            start = i;
        }
        seen_word |= !space;
        prev_space = space;
    }
    if start < text.len() {
        chunks.push(&text[start..]);
    }
    chunks
}

fn split_chars(text: &str, n: usize) -> Vec<&str> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in text.char_indices().enumerate() {
        if count > 0 && count % n == 0 {
            chunks.push(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        chunks.push(&text[start..]);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(n: usize) -> Chunking {
        Chunking::Chars(NonZeroUsize::new(n).unwrap())
    }

    #[test]
    fn words_keep_their_trailing_whitespace() {
        assert_eq!(split("hello world", Chunking::Words), ["hello ", "world"]);
        assert_eq!(
            split("one  two\tthree\n", Chunking::Words),
            ["one  ", "two\t", "three\n"]
        );
    }

    #[test]
    fn leading_whitespace_joins_the_first_word() {
        assert_eq!(split("  hi there", Chunking::Words), ["  hi ", "there"]);
        assert_eq!(split(" \n ", Chunking::Words), [" \n "]);
    }

    #[test]
    fn single_word_and_empty_text() {
        assert_eq!(split("hello", Chunking::Words), ["hello"]);
        assert!(split("", Chunking::Words).is_empty());
        assert!(split("", chars(3)).is_empty());
    }

    #[test]
    fn fixed_size_chunks_count_characters_not_bytes() {
        assert_eq!(split("abcdefg", chars(3)), ["abc", "def", "g"]);
        assert_eq!(split("abcdef", chars(3)), ["abc", "def"]);
        assert_eq!(
            split("héllo wörld", chars(2)),
            ["hé", "ll", "o ", "wö", "rl", "d"]
        );
        assert_eq!(split("日本語", chars(1)), ["日", "本", "語"]);
        assert_eq!(split("short", chars(100)), ["short"]);
    }

    #[test]
    fn chunks_always_reassemble_to_the_input() {
        let samples = [
            "",
            "x",
            "hello world",
            "  padded  text  ",
            "tabs\tand\nnewlines\r\n",
            "ünïcödé  🙂 emoji 🙂🙂 mixed",
            "\u{3000}ideographic\u{3000}space",
        ];
        for text in samples {
            for chunking in [Chunking::Words, chars(1), chars(2), chars(7)] {
                let chunks = split(text, chunking);
                assert_eq!(chunks.concat(), text, "{chunking:?} on {text:?}");
                assert!(
                    chunks.iter().all(|c| !c.is_empty()),
                    "{chunking:?} on {text:?}"
                );
            }
        }
    }
}
