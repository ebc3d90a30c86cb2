//! RFC 3339 timestamps (`2026-11-23T23:58:42.123Z`) without a date library.
//!
//! The emissary writes UTC with milliseconds; it reads any RFC 3339 offset because
//! `EMISSARY_DEADLINE`/`ARGO_DEADLINE` come from controllers written in other languages.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Formats `t` as UTC with millisecond precision. Times before 1970 clamp to the epoch.
pub fn format_rfc3339(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    // Digits written in place: every event carries one, and `format!` cost a microsecond.
    let mut text = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for slot in text[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, y.clamp(0, 9999));
    put(5, 2, m);
    put(8, 2, d);
    put(11, 2, day_secs / 3600);
    put(14, 2, day_secs / 60 % 60);
    put(17, 2, day_secs % 60);
    put(20, 3, i64::from(since.subsec_millis()));
    String::from_utf8(text.to_vec()).expect("ASCII digits")
}

/// Why a timestamp did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeError(String);

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid RFC 3339 time {:?} (expected e.g. 2026-01-02T15:04:05Z)",
            self.0
        )
    }
}

impl std::error::Error for TimeError {}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; `t` or a space may separate date and time.
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, TimeError> {
    let fail = || TimeError(s.to_owned());
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return Err(fail());
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return Err(fail());
    }
    let num = |range: std::ops::Range<usize>| -> Result<i64, TimeError> {
        let part = s.get(range).ok_or_else(fail)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(fail());
        }
        part.parse().map_err(|_| fail())
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(fail());
    }
    if hour > 23 || minute > 59 || second > 60 {
        return Err(fail());
    }
    let mut rest = &s[19..];
    let mut nanos: u32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(fail());
        }
        let mut place = 100_000_000;
        for c in frac[..digits].bytes().take(9) {
            nanos += u32::from(c - b'0') * place;
            place /= 10;
        }
        rest = &frac[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return Err(fail()),
            };
            let hh: i64 = rest[1..3].parse().map_err(|_| fail())?;
            let mm: i64 = rest[4..6].parse().map_err(|_| fail())?;
            sign * (hh * 3600 + mm * 60)
        }
        _ => return Err(fail()),
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_secs;
    let secs = u64::try_from(secs).map_err(|_| fail())?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's civil calendar algorithms (public domain), for the proleptic Gregorian calendar.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_478_322_123);
        assert_eq!(format_rfc3339(t), "2026-11-23T23:58:42.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn parses_offsets_and_fractions() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_478_322_123);
        assert_eq!(parse_rfc3339("2026-11-23T23:58:42.123Z"), Ok(t));
        assert_eq!(parse_rfc3339("2026-11-24T01:58:42.123+02:00"), Ok(t));
        assert_eq!(parse_rfc3339("2026-11-23t22:58:42.123-01:00"), Ok(t));
        assert_eq!(
            parse_rfc3339("2026-11-23T23:58:42Z"),
            Ok(UNIX_EPOCH + Duration::from_secs(1_795_478_322))
        );
    }

    #[test]
    fn round_trips_over_a_range_of_days() {
        for day in (0..80_000u64).step_by(37) {
            let t = UNIX_EPOCH + Duration::from_millis(day * 86_400_000 + day * 1013);
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Ok(t));
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-11-23",
            "2026-13-01T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T00:00:00",
            "2026-11-23T00:00:00.Z",
            "2026-11-23T00:00:00+0200",
            "20x6-11-23T00:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
