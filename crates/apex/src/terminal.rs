//! Text from a server, made safe to print on a terminal (placeholder; replaced on merge).

use std::borrow::Cow;

/// `text` without control characters other than newline and tab.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text
        .chars()
        .all(|c| !c.is_control() || c == '\n' || c == '\t')
    {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
            .collect(),
    )
}
