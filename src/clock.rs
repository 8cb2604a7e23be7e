//! Timestamps: microseconds since the Unix epoch, rendered as RFC 3339 UTC with a `Z` suffix.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A point in time with microsecond resolution, ordered and cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(d.as_micros() as i64)
    }

    /// Saturating addition; named like the operator but never panics on overflow.
    #[allow(clippy::should_implement_trait)]
    pub fn add(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_micros() as i64))
    }

    pub fn unix_seconds(self) -> i64 {
        self.0.div_euclid(1_000_000)
    }

    pub fn from_unix_seconds(s: i64) -> Self {
        Timestamp(s.saturating_mul(1_000_000))
    }

    fn to_offset(self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(self.0 as i128 * 1000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// RFC 3339 in UTC with a `Z` suffix; fractional seconds only when non-zero.
    pub fn rfc3339(self) -> String {
        self.to_offset()
            .format(&Rfc3339)
            .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
    }

    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        Some(Timestamp((t.unix_timestamp_nanos() / 1000) as i64))
    }

    /// IMF-fixdate (HTTP-date), truncated to the second.
    pub fn http_date(self) -> String {
        let secs = self.unix_seconds().max(0) as u64;
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs))
    }

    pub fn parse_http_date(s: &str) -> Option<Self> {
        let t = httpdate::parse_http_date(s.trim()).ok()?;
        let d = t.duration_since(UNIX_EPOCH).ok()?;
        Some(Timestamp::from_unix_seconds(d.as_secs() as i64))
    }

    /// `YYYYMMDD_HH:MM` in UTC: the Simple Streams version key.
    pub fn serial(self) -> String {
        let t = self.to_offset();
        format!(
            "{:04}{:02}{:02}_{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid RFC 3339 date-time {s:?}")))
    }
}

/// Parses durations such as `24h`, `30m`, `15s`, `500ms`, `2d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "" | "s" => return Some(Duration::from_secs(n)),
        "ms" => return Some(Duration::from_millis(n)),
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(secs)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp(1_778_000_000_123_456);
        let s = t.rfc3339();
        assert!(s.ends_with('Z'), "{s}");
        assert_eq!(Timestamp::parse_rfc3339(&s), Some(t));
        assert_eq!(
            Timestamp::from_unix_seconds(0).rfc3339(),
            "1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn serial_format() {
        // 2026-05-11T05:24:59Z
        let t = Timestamp::parse_rfc3339("2026-05-11T05:24:59Z").unwrap();
        assert_eq!(t.serial(), "20260511_05:24");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn http_dates() {
        let t = Timestamp::parse_rfc3339("2026-05-05T18:00:00.5Z").unwrap();
        assert_eq!(t.http_date(), "Tue, 05 May 2026 18:00:00 GMT");
        assert_eq!(
            Timestamp::parse_http_date("Tue, 05 May 2026 18:00:00 GMT"),
            Some(Timestamp::from_unix_seconds(t.unix_seconds()))
        );
    }
}
