//! Instants as UTC milliseconds: RFC 3339 parsing and printing without a clock.

use std::fmt;

/// A UTC instant in milliseconds since the Unix epoch.
///
/// Records, control events and deadlines all use it; the core never reads a clock, so
/// "now" always arrives as one of these from the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub i64);

/// Milliseconds in one hour.
pub const HOUR_MS: i64 = 3_600_000;
/// Milliseconds in one day.
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// Why a timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an RFC 3339 timestamp: {0:?}")]
pub struct TimeError(pub String);

impl Millis {
    /// Parses RFC 3339. The canonical form `YYYY-MM-DDTHH:MM:SS.mmmZ` takes a fast path
    /// (it is what every record carries); other offsets and precisions go through chrono.
    pub fn parse(s: &str) -> Result<Millis, TimeError> {
        if let Some(m) = parse_canonical(s.as_bytes()) {
            return Ok(m);
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|dt| Millis(dt.timestamp_millis()))
            .map_err(|_| TimeError(s.chars().take(40).collect()))
    }

    /// Parses only the canonical form (`2026-03-02T10:15:30.250Z`), without allocating;
    /// `None` for anything else (which [`Millis::parse`] may still accept).
    pub fn parse_canonical(b: &[u8]) -> Option<Millis> {
        parse_canonical(b)
    }

    /// The start of the hour holding this instant (the "generalise" treatment of time).
    pub fn floor_hour(self) -> Millis {
        Millis(self.0.div_euclid(HOUR_MS) * HOUR_MS)
    }

    /// The start of the UTC day holding this instant.
    pub fn floor_day(self) -> Millis {
        Millis(self.0.div_euclid(DAY_MS) * DAY_MS)
    }

    /// Adds whole calendar months, clamping the day (31 Jan + 1 month = 28/29 Feb), as a
    /// retention rule "N months after X" is read.
    pub fn add_months(self, months: u32) -> Millis {
        // The retention schedule computes a deadline for every copy, so years 1-9999 take
        // plain civil-date arithmetic instead of chrono's general date handling; the rest
        // keep chrono's behaviour, saturation at its range included.
        let days = self.0.div_euclid(DAY_MS);
        let (y, m, d) = civil_from_days(days);
        let total = y * 12 + (m - 1) as i64 + months as i64;
        let (ny, nm) = (total.div_euclid(12), (total.rem_euclid(12) + 1) as u32);
        if (1..=9999).contains(&y) && (1..=9999).contains(&ny) {
            let nd = d.min(days_in_month(ny as u32, nm));
            return Millis(days_from_civil(ny, nm, nd) * DAY_MS + self.0.rem_euclid(DAY_MS));
        }
        self.add_months_chrono(months)
    }

    fn add_months_chrono(self, months: u32) -> Millis {
        use chrono::{DateTime, Months};
        match DateTime::from_timestamp_millis(self.0)
            .and_then(|dt| dt.checked_add_months(Months::new(months)))
        {
            Some(dt) => Millis(dt.timestamp_millis()),
            None => Millis(i64::MAX),
        }
    }

    /// Writes the canonical form into a fixed buffer: no allocation on the hot path.
    pub fn to_buf(self) -> TimeBuf {
        let secs = self.0.div_euclid(1000);
        let ms = self.0.rem_euclid(1000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        let y = y.clamp(0, 9999) as u32;
        let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
        let [y0, y1] = pair(y / 100);
        let [y2, y3] = pair(y % 100);
        let [m0, m1] = pair(m);
        let [d0, d1] = pair(d);
        let [h0, h1] = pair(hh);
        let [n0, n1] = pair(mm);
        let [s0, s1] = pair(ss);
        let [f1, f2] = pair(ms % 100);
        let f0 = b'0' + (ms / 100) as u8;
        let b = [
            y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1, b'T', h0, h1, b':', n0, n1, b':', s0, s1,
            b'.', f0, f1, f2, b'Z',
        ];
        TimeBuf(b)
    }
}

/// A formatted timestamp held inline.
#[derive(Clone, Copy)]
pub struct TimeBuf([u8; 24]);

impl TimeBuf {
    /// The text as bytes, for encoders (no UTF-8 check needed).
    pub fn as_bytes(&self) -> &[u8; 24] {
        &self.0
    }

    /// The text, always ASCII.
    pub fn as_str(&self) -> &str {
        // The buffer only ever holds ASCII digits and separators written above.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_buf().as_str())
    }
}

impl serde::Serialize for Millis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.to_buf().as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 UTC timestamp")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Millis, E> {
                Millis::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// The two digits of `v` (below 100): one table look-up instead of two divisions, as
/// every copy's time is formatted.
fn pair(v: u32) -> [u8; 2] {
    const PAIRS: [[u8; 2]; 100] = {
        let mut t = [[0u8; 2]; 100];
        let mut i = 0;
        while i < 100 {
            t[i] = [b'0' + (i / 10) as u8, b'0' + (i % 10) as u8];
            i += 1;
        }
        t
    };
    PAIRS[v as usize % 100]
}

fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
    }
    Some(v)
}

fn parse_canonical(b: &[u8]) -> Option<Millis> {
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let (y, mo, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (h, mi, s, ms) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
        digits(&b[20..23])?,
    );
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) || h > 23 || mi > 59 || s > 59
    {
        return None;
    }
    let days = days_from_civil(y as i64, mo, d);
    Some(Millis(
        ((days * 86_400) + (h * 3600 + mi * 60 + s) as i64) * 1000 + ms as i64,
    ))
}

fn days_in_month(y: u32, m: u32) -> u32 {
    match m {
        2 if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Proleptic Gregorian day counts, shifted so the year starts in March (leap day last).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Shifted by whole 400-year eras so that every day a `Millis` can name (about 1.1e11
    // either side of 1970) is a positive count: unsigned division by a constant is a
    // multiply and a shift, signed division needs fix-ups (copies are stamped with their
    // time, so this runs several times per record).
    const ERAS: u64 = 1_000_000;
    let z = (z + 719_468).wrapping_add_unsigned(ERAS * 146_097) as u64;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = (yoe + era * 400) as i64 - (ERAS * 400) as i64 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_round_trip_matches_chrono() {
        for s in [
            "1970-01-01T00:00:00.000Z",
            "2024-02-29T23:59:59.999Z",
            "2026-11-23T10:56:01.123Z",
            "2100-03-01T00:00:00.000Z",
        ] {
            let m = Millis::parse(s).unwrap();
            let c = chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .timestamp_millis();
            assert_eq!(m.0, c, "{s}");
            assert_eq!(m.to_string(), s);
        }
    }

    #[test]
    fn printing_matches_chrono_from_year_1_to_9999() {
        let (first, last) = (-62_135_596_800_000i64, 253_402_300_799_999i64);
        let mut t = first;
        while t <= last {
            let want = chrono::DateTime::from_timestamp_millis(t)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            assert_eq!(Millis(t).to_string(), want);
            assert_eq!(Millis::parse(&want), Ok(Millis(t)));
            t += 3 * DAY_MS + 7_654_321;
        }
    }

    #[test]
    fn offsets_go_through_chrono_and_bad_dates_are_refused() {
        let m = Millis::parse("2026-01-01T01:00:00+01:00").unwrap();
        assert_eq!(m.to_string(), "2026-01-01T00:00:00.000Z");
        assert!(Millis::parse("2026-02-30T00:00:00.000Z").is_err());
        assert!(Millis::parse("yesterday").is_err());
    }

    #[test]
    fn month_arithmetic_matches_chrono() {
        let mut t = Millis::parse("1999-12-31T23:59:59.999Z").unwrap().0;
        // Every day over about 30 years, at a different time of day each, plus the edges.
        let mut instants = vec![i64::MIN, -1, 0, 253_402_300_799_999, i64::MAX - 1];
        for _ in 0..11_000 {
            instants.push(t);
            t += DAY_MS + 3_601_001;
        }
        for t in instants {
            for months in [0, 1, 2, 6, 11, 12, 13, 24, 59, 1200, 100_000, u32::MAX] {
                let later = Millis(t).add_months(months);
                assert_eq!(later, Millis(t).add_months_chrono(months), "{t} + {months}");
                // `Period::shortest_ms` relies on a month never being shorter than 28 days.
                assert!(
                    later == Millis(i64::MAX) || later.0 - t >= months as i64 * 28 * DAY_MS,
                    "{t} + {months}"
                );
            }
        }
    }

    #[test]
    fn month_arithmetic_clamps_the_day() {
        let jan31 = Millis::parse("2026-01-31T12:00:00.000Z").unwrap();
        assert_eq!(jan31.add_months(1).to_string(), "2026-02-28T12:00:00.000Z");
        assert_eq!(jan31.floor_hour().to_string(), "2026-01-31T12:00:00.000Z");
        assert_eq!(jan31.floor_day().to_string(), "2026-01-31T00:00:00.000Z");
    }
}
