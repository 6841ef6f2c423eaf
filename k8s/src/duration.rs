//! Durations as Kubernetes flags take them: Go's `time.ParseDuration` grammar (`300ms`, `1.5h`,
//! `2h45m`; units `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), for flags such as the controller's
//! `--lease-duration` and `--resync`.
//!
//! The algorithm is Go's, step for step (fractions included, computed as Go computes them), so a
//! value means here what it means to kube-controller-manager. Go's durations may be negative;
//! a [`Duration`] cannot, so a negative one other than zero is refused.

use std::time::Duration;

/// Why a duration was refused; each names the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?} (for example 300ms, 1.5h, 2h45m)")]
    Invalid(String),
    #[error("missing unit in duration {0:?} (ns, us, ms, s, m or h)")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?} (ns, us, ms, s, m or h)")]
    UnknownUnit { unit: String, input: String },
    #[error("duration {0:?} is negative")]
    Negative(String),
}

const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1000 * NANOSECOND;
const MILLISECOND: u64 = 1000 * MICROSECOND;
const SECOND: u64 = 1000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// Go's `unitMap`: `µs` as U+00B5 (micro sign) and U+03BC (Greek mu).
const GO_UNITS: &[(&str, u64)] = &[
    ("ns", NANOSECOND),
    ("us", MICROSECOND),
    ("\u{b5}s", MICROSECOND),
    ("\u{3bc}s", MICROSECOND),
    ("ms", MILLISECOND),
    ("s", SECOND),
    ("m", MINUTE),
    ("h", HOUR),
];

/// A duration in Go's `time.ParseDuration` grammar: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0`.
/// At most `i64::MAX` nanoseconds (about 292 years), as in Go.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    parse_with(s, GO_UNITS, None)
}

/// [`parse`], plus what `tapestry flows --since` has always taken besides: white space around
/// the value, a bare number of seconds (`30`), and days (`2d`, `1d12h`).
pub fn parse_lenient(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    parse_with(s, GO_UNITS, Some(("d", DAY)))
}

/// Go's `ParseDuration` over `units` (and `extra`).
fn parse_with(
    orig: &str,
    units: &[(&str, u64)],
    extra: Option<(&str, u64)>,
) -> Result<Duration, DurationError> {
    let invalid = || DurationError::Invalid(orig.to_owned());
    let mut s = orig.as_bytes();
    let mut d: u64 = 0;
    let mut neg = false;
    if let [c @ (b'-' | b'+'), rest @ ..] = s {
        neg = *c == b'-';
        s = rest;
    }
    if s == b"0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    while !s.is_empty() {
        // The next character must be [0-9.].
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        // [0-9]*
        let before = s.len();
        let (mut v, rest) = leading_int(s).ok_or_else(invalid)?;
        s = rest;
        let pre = before != s.len();
        // (\.[0-9]*)?
        let (mut f, mut scale, mut post) = (0u64, 1f64, false);
        if let [b'.', rest @ ..] = s {
            let before = rest.len();
            (f, scale, s) = leading_fraction(rest);
            post = before != s.len();
        }
        if !pre && !post {
            // No digits (".s", "-.s").
            return Err(invalid());
        }
        // The unit: up to the next [0-9.].
        let i = s
            .iter()
            .position(|&c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if i == 0 {
            return Err(DurationError::MissingUnit(orig.to_owned()));
        }
        // Split at an ASCII byte of a &str: both halves are UTF-8.
        let unit = std::str::from_utf8(&s[..i]).map_err(|_| invalid())?;
        s = &s[i..];
        let Some(unit) = units
            .iter()
            .chain(extra.as_ref())
            .find(|(name, _)| *name == unit)
            .map(|(_, ns)| *ns)
        else {
            return Err(DurationError::UnknownUnit {
                unit: unit.to_owned(),
                input: orig.to_owned(),
            });
        };
        if v > (1 << 63) / unit {
            return Err(invalid());
        }
        v *= unit;
        if f > 0 {
            // As Go: float64 is exact to the nanosecond for fractions of an hour.
            v += (f as f64 * (unit as f64 / scale)) as u64;
            if v > 1 << 63 {
                return Err(invalid());
            }
        }
        d += v;
        if d > 1 << 63 {
            return Err(invalid());
        }
    }
    if neg && d != 0 {
        return Err(DurationError::Negative(orig.to_owned()));
    }
    if d > i64::MAX as u64 {
        return Err(invalid());
    }
    Ok(Duration::from_nanos(d))
}

/// Go's `leadingInt`: the leading digits' value, `None` past 2^63.
fn leading_int(s: &[u8]) -> Option<(u64, &[u8])> {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut x: u64 = 0;
    for &c in &s[..n] {
        if x > (1 << 63) / 10 {
            return None;
        }
        x = x * 10 + u64::from(c - b'0');
        if x > 1 << 63 {
            return None;
        }
    }
    Some((x, &s[n..]))
}

/// Go's `leadingFraction`: the leading digits as a fraction `x / scale`; digits past what a u64
/// holds are consumed and dropped.
fn leading_fraction(s: &[u8]) -> (u64, f64, &[u8]) {
    let n = s.iter().take_while(|c| c.is_ascii_digit()).count();
    let (mut x, mut scale, mut overflow) = (0u64, 1f64, false);
    for &c in &s[..n] {
        if overflow {
            continue;
        }
        if x > (i64::MAX as u64) / 10 {
            overflow = true;
            continue;
        }
        let y = x * 10 + u64::from(c - b'0');
        if y > 1 << 63 {
            overflow = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[n..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ns(n: u64) -> Duration {
        Duration::from_nanos(n)
    }

    /// Go's own table (src/time/time_test.go, parseDurationTests), less the negative values.
    #[test]
    fn go_parse_duration_table() {
        let s = SECOND;
        let ms = MILLISECOND;
        let us = MICROSECOND;
        let m = MINUTE;
        let h = HOUR;
        let cases: &[(&str, u64)] = &[
            // Simple.
            ("0", 0),
            ("5s", 5 * s),
            ("30s", 30 * s),
            ("1478s", 1478 * s),
            // Sign.
            ("+5s", 5 * s),
            ("-0", 0),
            ("+0", 0),
            // Decimal.
            ("5.0s", 5 * s),
            ("5.6s", 5 * s + 600 * ms),
            ("5.s", 5 * s),
            (".5s", 500 * ms),
            ("1.0s", s),
            ("1.00s", s),
            ("1.004s", s + 4 * ms),
            ("1.0040s", s + 4 * ms),
            ("100.00100s", 100 * s + ms),
            // Different units.
            ("10ns", 10),
            ("11us", 11 * us),
            ("12\u{b5}s", 12 * us),
            ("12\u{3bc}s", 12 * us),
            ("13ms", 13 * ms),
            ("14s", 14 * s),
            ("15m", 15 * m),
            ("16h", 16 * h),
            // Composite.
            ("3h30m", 3 * h + 30 * m),
            ("10.5s4m", 4 * m + 10 * s + 500 * ms),
            ("1h2m3s4ms5us6ns", h + 2 * m + 3 * s + 4 * ms + 5 * us + 6),
            ("39h9m14.425s", 39 * h + 9 * m + 14 * s + 425 * ms),
            // Large value.
            ("52763797000ns", 52_763_797_000),
            // More than 9 digits after the decimal point.
            ("0.3333333333333333333h", 20 * m),
            // 9007199254740993 = 1<<53 + 1 cannot be stored precisely in a float64.
            ("9007199254740993ns", (1 << 53) + 1),
            // Largest duration that can be represented by int64 in nanoseconds.
            ("9223372036854775807ns", i64::MAX as u64),
            ("9223372036854775.807us", i64::MAX as u64),
            ("9223372036s854ms775us807ns", i64::MAX as u64),
            // Huge string; Go issue 15011.
            ("0.100000000000000000000h", 6 * m),
            // This value tests the first overflow check in leadingFraction.
            ("0.830103483285477580700h", 49 * m + 48 * s + 372_539_827),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Ok(ns(*want)), "{input}");
        }
    }

    #[test]
    fn go_parse_duration_errors() {
        for input in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "\u{85}\u{85}",
            "hello \u{ffff} world",
            "9223372036854775810ns", // overflow
            "9223372036854775808ns", // i64::MAX + 1
            "9223372036854775.808us",
            "9223372036s854ms775us808ns",
            "1.5.2s",
            " 5s",
        ] {
            assert!(parse(input).is_err(), "{input:?} was accepted");
        }
        assert_eq!(parse("15"), Err(DurationError::MissingUnit("15".into())));
        assert_eq!(
            parse("3d"),
            Err(DurationError::UnknownUnit {
                unit: "d".into(),
                input: "3d".into()
            })
        );
        assert_eq!(parse("-5s"), Err(DurationError::Negative("-5s".into())));
        assert_eq!(parse("-0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse("5x").unwrap_err().to_string(),
            r#"unknown unit "x" in duration "5x" (ns, us, ms, s, m or h)"#
        );
    }

    #[test]
    fn lenient_adds_bare_seconds_days_and_white_space() {
        assert_eq!(parse_lenient("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_lenient(" 5m "), Ok(Duration::from_secs(300)));
        assert_eq!(parse_lenient("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_lenient("1d12h"), Ok(Duration::from_secs(129_600)));
        assert_eq!(parse_lenient("1.5h"), Ok(Duration::from_secs(5400)));
        for input in ["", "m", "5x", "-5s", "30 s"] {
            assert!(parse_lenient(input).is_err(), "{input:?} was accepted");
        }
    }
}
