//! SQLite keeps timestamps as ISO-8601 text (readable in any SQLite shell and ordered as
//! text); Postgres keeps `timestamptz`. These helpers keep the SQLite side in one format.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

use super::StoreError;

/// The SQL expression for "now" in the stored format, millisecond precision.
pub(crate) const SQLITE_NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ','now')";

pub(crate) fn to_sqlite_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Reads what Herald writes, and what a producer's `CURRENT_TIMESTAMP` or an RFC 3339
/// string would write, so a hand-inserted `created_at` still reads.
pub(crate) fn from_sqlite_text(text: &str) -> Result<DateTime<Utc>, StoreError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.with_timezone(&Utc));
    }
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
        .ok_or_else(|| StoreError::Corrupt(format!("timestamp '{text}' is not ISO-8601")))
}

/// A `strftime` modifier that adds `duration`, e.g. `+1.500 seconds`.
pub(crate) fn sqlite_offset(duration: std::time::Duration) -> String {
    format!("+{:.3} seconds", duration.as_secs_f64())
}

/// A `strftime` modifier that subtracts `duration`, e.g. `-30.000 seconds`.
pub(crate) fn sqlite_offset_back(duration: std::time::Duration) -> String {
    format!("-{:.3} seconds", duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_herald_and_producer_formats() {
        for text in [
            "2026-11-24T21:28:59.123Z",
            "2026-11-24 21:28:59",
            "2026-11-24T21:28:59+00:00",
        ] {
            assert!(from_sqlite_text(text).is_ok(), "{text}");
        }
        assert!(from_sqlite_text("yesterday").is_err());
    }

    #[test]
    fn written_text_sorts_like_time() {
        let a = to_sqlite_text(Utc::now());
        let b = to_sqlite_text(Utc::now() + chrono::Duration::milliseconds(1500));
        assert!(a < b);
        assert_eq!(a.len(), "2026-11-24T21:28:59.123Z".len());
    }
}
