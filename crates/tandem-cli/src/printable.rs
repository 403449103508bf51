//! Event text made safe to print. An event's type, subject or payload (and
//! a handler's error about it) can carry terminal escape sequences: clear
//! the screen, set the window title, rewrite lines printed before. What
//! `events tail` and `dead-letters` print goes through here, which writes
//! control characters (C0, DEL, C1, so every escape sequence) and the
//! Unicode bidirectional controls as visible escapes and keeps all other
//! text, Unicode included, as it is.

use std::borrow::Cow;

/// Whether `c` can act on a terminal or reorder the text around it.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

fn rewrite(text: &str, escape: impl Fn(char, &mut String)) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_unsafe(c) {
            escape(c, &mut out);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `text` on one line, each unsafe character written as in a Rust
/// literal: `\u{1b}`, `\n`, `\t`.
pub fn text(text: &str) -> Cow<'_, str> {
    rewrite(text, |c, out| out.extend(c.escape_default()))
}

/// Valid JSON text made safe, meaning the same: an unsafe character, which
/// valid JSON holds raw only inside a string (DEL, C1, bidirectional
/// controls) or between tokens (tab, line feed, carriage return), becomes
/// a `\uXXXX` escape or a space; line feeds stay (pretty output).
pub fn json(json: &str) -> Cow<'_, str> {
    rewrite(json, |c, out| match c {
        '\n' => out.push('\n'),
        '\t' | '\r' => out.push(' '),
        _ => out.push_str(&format!("\\u{:04x}", u32::from(c))),
    })
}

/// [`json`] on one line: line feeds between tokens become spaces too.
pub fn json_line(json: &str) -> Cow<'_, str> {
    rewrite(json, |c, out| match c {
        '\n' | '\t' | '\r' => out.push(' '),
        _ => out.push_str(&format!("\\u{:04x}", u32::from(c))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_sent() {
        assert_eq!(text("plain ünïcode ✓"), "plain ünïcode ✓");
        assert_eq!(
            text("a\u{1b}[2J\u{7}\u{7f}\u{9b}\t\n\u{202e}z"),
            r"a\u{1b}[2J\u{7}\u{7f}\u{9b}\t\n\u{202e}z"
        );
    }

    #[test]
    fn json_stays_json_and_means_the_same() {
        let value = serde_json::json!({"type": "x\u{1b}[2J\u{7f}\u{9b}\u{202e}", "ok": "ü"});
        for shown in [
            json(&serde_json::to_string_pretty(&value).unwrap()).into_owned(),
            json_line(&serde_json::to_string(&value).unwrap()).into_owned(),
            json_line("{\"a\":\r\n\t\"\u{9b}\"}").into_owned(),
        ] {
            assert!(
                !shown.chars().any(|c| c.is_control() && c != '\n'),
                "{shown:?}"
            );
            let parsed: serde_json::Value = serde_json::from_str(&shown).unwrap();
            assert!(parsed == value || parsed == serde_json::json!({"a": "\u{9b}"}));
        }
        assert!(!json_line("{\n\"a\": 1\n}").contains('\n'));
    }
}
