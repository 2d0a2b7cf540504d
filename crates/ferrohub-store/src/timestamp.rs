//! [`Timestamp`]: the one time type of the store traits, a UTC instant at millisecond precision
//! (what the stores keep), printed the way IoT Hub prints times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{OffsetDateTime, UtcOffset};

/// A UTC instant, as milliseconds since the Unix epoch. Ordered, cheap to copy, and stored as
/// the integer itself, so rows written before it existed read back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const UNIX_EPOCH: Timestamp = Timestamp(0);

    pub fn now() -> Self {
        // Before the epoch only with a badly wrong clock; the epoch is then the best guess.
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Timestamp(ms)
    }

    pub const fn from_unix_ms(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub const fn unix_ms(self) -> i64 {
        self.0
    }

    /// `self + d`, pinned at the end of the range rather than wrapping.
    pub fn saturating_add(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    pub fn to_offset_date_time(self) -> OffsetDateTime {
        // Out of `time`'s range (beyond year 9999) only for made-up values; the epoch then.
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }

    /// ISO 8601 UTC with seven fractional digits (`2021-04-21T11:30:16.1230000Z`), as IoT Hub
    /// (and .NET) print times.
    pub fn to_iso(self) -> String {
        let t = self.to_offset_date_time();
        let t = t.checked_to_offset(UtcOffset::UTC).unwrap_or(t);
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.nanosecond() / 100
        )
    }
}

impl From<OffsetDateTime> for Timestamp {
    fn from(t: OffsetDateTime) -> Self {
        let ms = t.unix_timestamp_nanos() / 1_000_000;
        Timestamp(i64::try_from(ms).unwrap_or(if ms < 0 { i64::MIN } else { i64::MAX }))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_iso())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_as_iot_hub_does_and_round_trips_unix_ms() {
        let t = Timestamp::from(time::macros::datetime!(2021-04-21 11:30:16.123456789 UTC));
        assert_eq!(t.unix_ms(), 1_619_004_616_123);
        assert_eq!(t.to_iso(), "2021-04-21T11:30:16.1230000Z");
        assert_eq!(
            Timestamp::UNIX_EPOCH.to_string(),
            "1970-01-01T00:00:00.0000000Z"
        );
        assert_eq!(
            Timestamp::from_unix_ms(5).saturating_add(Duration::from_secs(1)),
            Timestamp::from_unix_ms(1_005)
        );
        assert_eq!(
            Timestamp::from_unix_ms(i64::MAX).saturating_add(Duration::from_secs(1)),
            Timestamp::from_unix_ms(i64::MAX)
        );
        assert!(Timestamp::now() > Timestamp::from_unix_ms(1_600_000_000_000));
    }
}
