//! Column values in `data`/`dataOld`: Postgres' text output of a type,
//! mapped to JSON as DESIGN.md section 5 says.

use super::json;

/// Type OIDs from `pg_type.dat`; stable across Postgres versions.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
}

/// Appends the JSON form of one non-null value, given its type and text output.
pub fn write_text_value(out: &mut Vec<u8>, type_oid: u32, text: &str) {
    match type_oid {
        oid::BOOL => out.extend_from_slice(if text == "t" { b"true" } else { b"false" }),
        // Postgres' integer output is always a valid JSON number.
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => out.extend_from_slice(text.as_bytes()),
        oid::FLOAT4 | oid::FLOAT8 => match text {
            "NaN" | "Infinity" | "-Infinity" => json::write_str(out, text),
            _ => out.extend_from_slice(text.as_bytes()),
        },
        // Both are valid JSON: json is checked on input, jsonb printed by Postgres.
        oid::JSON | oid::JSONB => out.extend_from_slice(text.as_bytes()),
        oid::TIMESTAMPTZ => write_timestamptz(out, text),
        // numeric stays a string so no consumer loses digits; the rest is text output.
        _ => json::write_str(out, text),
    }
}

/// `2026-11-24 21:43:42.123456+00` (ISO DateStyle, TimeZone UTC) becomes
/// `2026-11-24T21:43:42.123456Z`; `infinity` and BC dates keep their text.
fn write_timestamptz(out: &mut Vec<u8>, text: &str) {
    match text.strip_suffix("+00") {
        Some(local) if local.len() >= 19 && local.as_bytes()[10] == b' ' => {
            out.push(b'"');
            out.extend_from_slice(&local.as_bytes()[..10]);
            out.push(b'T');
            out.extend_from_slice(&local.as_bytes()[11..]);
            out.extend_from_slice(b"Z\"");
        }
        _ => json::write_str(out, text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(type_oid: u32, text: &str) -> String {
        let mut out = Vec::new();
        write_text_value(&mut out, type_oid, text);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn scalars() {
        assert_eq!(value(oid::BOOL, "t"), "true");
        assert_eq!(value(oid::BOOL, "f"), "false");
        assert_eq!(value(oid::INT8, "-9223372036854775808"), "-9223372036854775808");
        assert_eq!(value(oid::FLOAT8, "1.5e-07"), "1.5e-07");
        assert_eq!(value(oid::FLOAT4, "NaN"), r#""NaN""#);
        assert_eq!(value(oid::FLOAT8, "-Infinity"), r#""-Infinity""#);
        assert_eq!(value(oid::NUMERIC, "123.4500"), r#""123.4500""#);
        assert_eq!(value(25, "he said \"hi\""), r#""he said \"hi\"""#);
    }

    #[test]
    fn json_is_nested() {
        assert_eq!(value(oid::JSONB, r#"{"a": [1, null]}"#), r#"{"a": [1, null]}"#);
        assert_eq!(value(oid::JSON, "\"s\""), "\"s\"");
    }

    #[test]
    fn timestamptz_becomes_rfc3339_utc() {
        assert_eq!(
            value(oid::TIMESTAMPTZ, "2026-11-24 21:43:42.123456+00"),
            r#""2026-11-24T21:43:42.123456Z""#
        );
        assert_eq!(value(oid::TIMESTAMPTZ, "2026-11-24 21:43:42+00"), r#""2026-11-24T21:43:42Z""#);
        assert_eq!(value(oid::TIMESTAMPTZ, "infinity"), r#""infinity""#);
        assert_eq!(value(oid::TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC"), r#""0044-03-15 12:00:00+00 BC""#);
    }
}
