//! Client-supplied text in log lines: control characters are escaped, so a value holding a
//! newline (a callback's `error`, a path) cannot start a forged line in the text log.

use std::fmt;

/// `value` for a log field: printed as is, but with control characters, line and paragraph
/// separators and bidirectional overrides written as `\n`, `\u{202e}` and so on.
pub fn log_safe(value: &str) -> Escaped<'_> {
    Escaped(value)
}

pub struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write as _;
        for c in self.0.chars() {
            if needs_escape(c) {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || c == '\\'
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            log_safe("bad\nINFO forged\r\u{1b}[31m\u{202e}").to_string(),
            "bad\\nINFO forged\\r\\u{1b}[31m\\u{202e}"
        );
        assert_eq!(log_safe("доступ запрещён").to_string(), "доступ запрещён");
        // The escape character itself is escaped, so `\n` in the log always means a newline.
        assert_eq!(log_safe("a\\nb").to_string(), "a\\\\nb");
    }
}
