//! Text from the server, made safe to print on a terminal.
//!
//! Model names, workload names, answers and error messages come from the server, and
//! through it from other people's data (an imported usage file, a model's output). Printed
//! as they are, escape sequences in them would act on the user's terminal: retitle the
//! window (`ESC ] 0 ; ... BEL`), clear the screen (`ESC [ 2 J`), move the cursor to forge
//! output, or on some terminals worse. [`clean`] drops every such sequence and every
//! control character but newline and tab, plus the bidirectional overrides that make text
//! display in another order than it reads ("Trojan Source"). Everything the CLI prints
//! that the server supplied goes through it; the CLI's own colours are added afterwards.

use serde_json::Value;

/// `text` without terminal escape sequences (CSI, OSC, DCS, SOS, PM, APC and the short
/// two-character ones, in their 7-bit `ESC` and 8-bit C1 forms), other C0 controls than
/// `\n` and `\t`, DEL, C1 controls, and bidirectional formatting characters.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' | '\t' => out.push(c),
            '\u{1b}' => match chars.next() {
                Some('[') => skip_csi(&mut chars),
                Some(']' | 'P' | 'X' | '^' | '_') => skip_string(&mut chars),
                // `ESC` + intermediates (0x20..=0x2F) + one final character.
                Some(c) if (' '..='/').contains(&c) => {
                    while chars.next_if(|c| (' '..='/').contains(c)).is_some() {}
                    chars.next();
                }
                // `ESC` + one character (ESC c resets the terminal, ESC 7 saves the cursor…).
                Some(_) | None => {}
            },
            // The 8-bit forms: CSI, and the string introducers OSC, DCS, SOS, PM, APC.
            '\u{9b}' => skip_csi(&mut chars),
            '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => skip_string(&mut chars),
            c if c.is_control() || is_bidi_control(c) => {}
            c => out.push(c),
        }
    }
    out
}

/// Every string in `value`, keys included, passed through [`clean`]. Keys too: a tool's
/// parameters are printed as JSON, whose escaping leaves C1 controls and bidi overrides.
pub fn clean_json(value: &mut Value) {
    match value {
        Value::String(text) => *text = clean(text),
        Value::Array(items) => items.iter_mut().for_each(clean_json),
        Value::Object(fields) => {
            *fields = std::mem::take(fields)
                .into_iter()
                .map(|(key, mut value)| {
                    clean_json(&mut value);
                    (clean(&key), value)
                })
                .collect();
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Skips a control sequence's parameters and intermediates up to its final character
/// (0x40..=0x7E). Stops early at anything that cannot be part of one, which is dropped
/// too (a truncated sequence must not leave its tail behind as an introducer).
fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in chars.by_ref() {
        if !(' '..='?').contains(&c) {
            return;
        }
    }
}

/// Skips a control string up to its terminator: BEL, `ESC \` or the 8-bit ST.
fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' | '\u{9c}' => return,
            '\u{1b}' => {
                chars.next_if_eq(&'\\');
                return;
            }
            _ => {}
        }
    }
}

/// The Unicode characters that reorder the display of the text around them.
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_escape_sequences_and_keeps_the_text() {
        assert_eq!(clean("a\u{1b}]0;pwned\u{7}b"), "ab");
        assert_eq!(
            clean("a\u{1b}]8;;http://x\u{1b}\\link\u{1b}]8;;\u{1b}\\"),
            "alink"
        );
        assert_eq!(clean("\u{1b}[2Jclear\u{1b}[1;31mred\u{1b}[0m"), "clearred");
        assert_eq!(clean("\u{1b}[?1049h"), "");
        assert_eq!(clean("\u{1b}Pq#0;2;0;0;0\u{1b}\\x"), "x");
        assert_eq!(clean("\u{1b}(0lqk"), "lqk");
        assert_eq!(clean("\u{1b}cpost-reset"), "post-reset");
        assert_eq!(clean("\u{9b}31mred\u{9d}0;title\u{9c}!"), "red!");
        // Unterminated ones eat the rest rather than leak an introducer.
        assert_eq!(clean("ok\u{1b}]0;never ends"), "ok");
        assert_eq!(clean("ok\u{1b}"), "ok");
    }

    #[test]
    fn removes_controls_but_newline_and_tab() {
        assert_eq!(
            clean("a\tb\nc\rd\u{8}e\u{7}f\u{0}g\u{7f}h\u{85}i"),
            "a\tb\ncdefghi"
        );
        assert_eq!(clean("gpt-4o — ✓ ok é 中文"), "gpt-4o — ✓ ok é 中文");
    }

    #[test]
    fn removes_bidi_overrides() {
        assert_eq!(clean("admin\u{202e}txt.exe\u{202c}"), "admintxt.exe");
        assert_eq!(clean("\u{2067}x\u{2069}\u{200f}"), "x");
    }

    #[test]
    fn cleans_every_string_of_a_json_value() {
        let mut value = serde_json::json!({
            "content": "\u{1b}[2Jhi",
            "list": ["\u{1b}]0;t\u{7}a", 1, null],
            "nested": {"name": "b\u{202e}", "k\u{9b}2J": true}
        });
        clean_json(&mut value);
        assert_eq!(
            value,
            serde_json::json!({"content": "hi", "list": ["a", 1, null], "nested": {"name": "b", "k": true}})
        );
    }
}
