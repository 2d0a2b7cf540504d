//! Timestamps as IoT Hub writes them (`2021-04-21T11:30:16.1234567Z`) and tracking ids.

use std::time::SystemTime;

use time::OffsetDateTime;

/// ISO 8601 UTC with seven fractional digits, as IoT Hub (and .NET) format times.
pub fn iso(t: OffsetDateTime) -> String {
    ferrohub_iothub::telemetry::format_utc_timestamp(t)
}

/// What IoT Hub shows for a time that was never set (.NET's `DateTime.MinValue`), rather
/// than null: SDK models and tools parse these fields as dates.
pub const NEVER: &str = "0001-01-01T00:00:00Z";

pub fn iso_system(t: SystemTime) -> String {
    iso(OffsetDateTime::from(t))
}

pub fn now_iso() -> String {
    iso(OffsetDateTime::now_utc())
}

/// A random id for error bodies, so a caller can quote one in a report.
pub fn tracking_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seven_fraction_digits_utc() {
        let t = time::macros::datetime!(2021-04-21 11:30:16.123456789 UTC);
        assert_eq!(iso(t), "2021-04-21T11:30:16.1234567Z");
    }
}
