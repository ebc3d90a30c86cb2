//! Human durations as the command line takes them: `1500ms`, `30s`, `2m`, `1h30m`, `0.5s`.
//!
//! A bare number is rejected: `--deadline 30` could mean seconds or minutes, and a deadline
//! that is off by 60× is worse than an error.

use std::fmt;
use std::time::Duration;

/// Why a duration did not parse; the message names the offending text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError {
    input: String,
    why: &'static str,
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid duration {:?}: {} (examples: 1500ms, 30s, 2m, 1h30m)",
            self.input, self.why
        )
    }
}

impl std::error::Error for DurationError {}

/// The longest duration accepted: longer than any task, and far from overflowing a clock
/// reading it is added to.
pub const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses a sequence of `<number><unit>` terms; units are `ms`, `s`, `m` and `h`.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let fail = |why| DurationError {
        input: input.to_owned(),
        why,
    };
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(fail("empty"));
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        if number.is_empty() {
            return Err(fail("expected a number"));
        }
        let unit_len = tail
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(fail("missing unit")),
            _ => return Err(fail("unknown unit")),
        };
        total_ns = scale(number, unit_ns)
            .and_then(|ns| total_ns.checked_add(ns))
            .ok_or_else(|| fail("bad number"))?;
        rest = tail;
    }
    if total_ns > MAX.as_nanos() {
        return Err(fail("longer than 100 years"));
    }
    let secs = (total_ns / 1_000_000_000) as u64;
    Ok(Duration::new(secs, (total_ns % 1_000_000_000) as u32))
}

/// `number × unit_ns` computed exactly on decimal digits (no float rounding).
fn scale(number: &str, unit_ns: u128) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return None;
    }
    let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut ns = int.checked_mul(unit_ns)?;
    let mut place = unit_ns;
    for digit in frac.bytes() {
        place /= 10;
        ns = ns.checked_add(u128::from(digit - b'0') * place)?;
    }
    Some(ns)
}

/// Formats a duration the way [`parse`] reads it back, e.g. `1500ms` or `30s`.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("0.5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse(".25s"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("876000h"), Ok(MAX));
    }

    #[test]
    fn rejects_ambiguous_or_malformed() {
        for bad in [
            "",
            "30",
            "5x",
            "s",
            "1..5s",
            "ms",
            "-1s",
            "1s 2s",
            "99999999999999999999h",
            "4000000000000000h",
            "876001h",
            "340282366920938463463374607431768211455h340282366920938463463374607431768211455h",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
        let message = parse("30").unwrap_err().to_string();
        assert!(
            message.contains("\"30\"") && message.contains("missing unit"),
            "{message}"
        );
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::from_millis(1500),
            Duration::from_secs(10),
            Duration::ZERO,
        ] {
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
