//! Postgres timestamps (microseconds since 2000-01-01 UTC) as RFC 3339.

use super::json;

/// Seconds from 1970-01-01 to 2000-01-01.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

/// Converts a Postgres timestamp to microseconds since the Unix epoch.
pub fn pg_to_unix_micros(pg: i64) -> i64 {
    pg.saturating_add(PG_EPOCH_UNIX_SECS * 1_000_000)
}

/// Appends `YYYY-MM-DDTHH:MM:SS.ffffffZ` for a Postgres timestamp.
pub fn write_rfc3339_utc(out: &mut Vec<u8>, pg: i64) {
    let unix_micros = pg_to_unix_micros(pg);
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        // Out of RFC 3339's range; Postgres' own limits stop short of it anyway.
        let text = format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
            sod / 3600,
            sod % 3600 / 60,
            sod % 60
        );
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let fields: [(u64, usize, u8); 7] = [
        (y as u64, 4, b'-'),
        (u64::from(m), 2, b'-'),
        (u64::from(d), 2, b'T'),
        ((sod / 3600) as u64, 2, b':'),
        ((sod % 3600 / 60) as u64, 2, b':'),
        ((sod % 60) as u64, 2, b'.'),
        (micros as u64, 6, b'Z'),
    ];
    for (value, width, separator) in fields {
        json::write_decimal(out, value, width);
        out.push(separator);
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rfc(pg: i64) -> String {
        let mut out = Vec::new();
        write_rfc3339_utc(&mut out, pg);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc(0), "2000-01-01T00:00:00.000000Z");
        assert_eq!(rfc(-1), "1999-12-31T23:59:59.999999Z");
        assert_eq!(rfc(848_871_822_123_456), "2026-11-24T21:43:42.123456Z");
        assert_eq!(rfc(762_523_200_000_000), "2024-02-29T12:00:00.000000Z");
        assert_eq!(rfc(-3_150_575_999_999_999), "1900-03-01T00:00:00.000001Z");
    }
}
