//! How Knative's Go code spells values, for what the activator reads from Knative's ConfigMaps and
//! writes where upstream's bytes are compared: Go's `strconv.ParseBool`, `time.ParseDuration` and
//! `%q`. Pure functions; must not know which key or answer they serve.

use std::time::Duration;

/// Go's `strconv.ParseBool`, which every boolean of Knative's ConfigMaps goes through: exactly
/// `1 t T TRUE true True` and `0 f F FALSE false False`, untrimmed.
pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Go's `time.ParseDuration` for non-negative durations: a sequence of decimal numbers, each with
/// an optional fraction and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), as `1h30m` or `2.5s`;
/// `0` alone is zero.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let unit_end = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let nanos = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += number.parse::<f64>().ok()? * nanos;
        rest = after;
    }
    // Go's durations are int64 nanoseconds: anything longer does not parse.
    (total <= i64::MAX as f64).then(|| Duration::from_nanos(total as u64))
}

/// `s` quoted as Go's `%q` quotes a string: printable characters as they are, `"` and `\`
/// escaped, control characters as `\n`, `\t`, `\x01`, ….
pub(crate) fn quote(s: &str) -> String {
    let mut quoted = String::with_capacity(s.len() + 2);
    quoted.push('"');
    for c in s.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\r' => quoted.push_str("\\r"),
            '\t' => quoted.push_str("\\t"),
            '\u{7}' => quoted.push_str("\\a"),
            '\u{8}' => quoted.push_str("\\b"),
            '\u{c}' => quoted.push_str("\\f"),
            '\u{b}' => quoted.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => quoted.push_str(&format!("\\x{:02x}", c as u32)),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04x}", c as u32)),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn booleans_are_gos() {
        for yes in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(yes), Some(true), "{yes}");
        }
        for no in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(no), Some(false), "{no}");
        }
        for neither in ["", "yes", "on", " true", "tRUE", "enabled"] {
            assert_eq!(parse_bool(neither), None, "{neither:?}");
        }
    }

    #[test]
    fn durations_are_gos() {
        let ms = Duration::from_millis;
        for (text, want) in [("0", ms(0)), ("300ms", ms(300)), ("1h30m", ms(5_400_000)), ("2.5s", ms(2500))] {
            assert_eq!(parse_duration(text), Some(want), "{text}");
        }
        assert_eq!(parse_duration("1us"), Some(Duration::from_micros(1)));
        for bad in ["", "60", "1.2.3s", "5 s", "-1s", "1d", "s", "3000000h"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn quotes_as_go_does() {
        assert_eq!(quote("counter-00001"), "\"counter-00001\"");
        assert_eq!(quote("a\"b\\c\td\u{1}é"), "\"a\\\"b\\\\c\\td\\x01é\"");
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in "\\PC{0,24}") {
            let _ = parse_bool(&text);
            let _ = parse_duration(&text);
            prop_assert!(quote(&text).starts_with('"'));
        }
    }
}
