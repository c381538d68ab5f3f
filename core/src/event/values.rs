//! Column values in `data`/`dataOld`: Postgres' text output of a type,
//! mapped to JSON as DESIGN.md section 5 says.

use base64::Engine;

use super::arrays::{self, Element};
use super::json;

/// Type OIDs from `pg_type.dat`; stable across Postgres versions.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
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
        oid::BYTEA => write_bytea(out, text),
        _ if array_element(type_oid).is_some() => write_array(out, type_oid, text),
        // numeric stays a string so no consumer loses digits; the rest is text output.
        _ => json::write_str(out, text),
    }
}

/// Element type and delimiter of the built-in array types (`pg_type.dat`:
/// array oid, `typelem`, `typdelim`).
fn array_element(array_oid: u32) -> Option<(u32, u8)> {
    Some(match array_oid {
        1000 => (16, b','),   // bool
        1001 => (17, b','),   // bytea
        1002 => (18, b','),   // char
        1003 => (19, b','),   // name
        1016 => (20, b','),   // int8
        1005 => (21, b','),   // int2
        1007 => (23, b','),   // int4
        1009 => (25, b','),   // text
        1028 => (26, b','),   // oid
        199 => (114, b','),   // json
        143 => (142, b','),   // xml
        1017 => (600, b','),  // point
        1018 => (601, b','),  // lseg
        1019 => (602, b','),  // path
        1020 => (603, b';'),  // box
        1027 => (604, b','),  // polygon
        629 => (628, b','),   // line
        651 => (650, b','),   // cidr
        1021 => (700, b','),  // float4
        1022 => (701, b','),  // float8
        719 => (718, b','),   // circle
        791 => (790, b','),   // money
        1040 => (829, b','),  // macaddr
        775 => (774, b','),   // macaddr8
        1041 => (869, b','),  // inet
        1014 => (1042, b','), // bpchar
        1015 => (1043, b','), // varchar
        1182 => (1082, b','), // date
        1183 => (1083, b','), // time
        1115 => (1114, b','), // timestamp
        1185 => (1184, b','), // timestamptz
        1187 => (1186, b','), // interval
        1270 => (1266, b','), // timetz
        1561 => (1560, b','), // bit
        1563 => (1562, b','), // varbit
        1231 => (1700, b','), // numeric
        2951 => (2950, b','), // uuid
        3643 => (3614, b','), // tsvector
        3645 => (3615, b','), // tsquery
        3807 => (3802, b','), // jsonb
        4073 => (4072, b','), // jsonpath
        3905 => (3904, b','), // int4range
        3907 => (3906, b','), // numrange
        3909 => (3908, b','), // tsrange
        3911 => (3910, b','), // tstzrange
        3913 => (3912, b','), // daterange
        3927 => (3926, b','), // int8range
        _ => return None,
    })
}

/// An array becomes a JSON array of its elements, each mapped by the
/// element type; text that does not parse as an array stays a string.
fn write_array(out: &mut Vec<u8>, array_oid: u32, text: &str) {
    let Some((element_oid, delimiter)) = array_element(array_oid) else {
        return json::write_str(out, text);
    };
    match arrays::parse(text, delimiter) {
        Some(elements) => write_elements(out, element_oid, &elements),
        None => json::write_str(out, text),
    }
}

fn write_elements(out: &mut Vec<u8>, element_oid: u32, elements: &[Element<'_>]) {
    out.push(b'[');
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match element {
            Element::Null => out.extend_from_slice(b"null"),
            Element::Text(text) => write_text_value(out, element_oid, text),
            Element::Array(inner) => write_elements(out, element_oid, inner),
        }
    }
    out.push(b']');
}

/// bytea's hex output (`\x0aff`) becomes base64.
fn write_bytea(out: &mut Vec<u8>, text: &str) {
    let decoded = text.strip_prefix("\\x").and_then(|hex| {
        (hex.len() % 2 == 0)
            .then(|| {
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                    .collect::<Option<Vec<u8>>>()
            })
            .flatten()
    });
    match decoded {
        Some(bytes) => {
            out.push(b'"');
            out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(bytes).as_bytes());
            out.push(b'"');
        }
        None => json::write_str(out, text),
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
    fn bytea_becomes_base64() {
        assert_eq!(value(oid::BYTEA, "\\x48656c6c6f"), r#""SGVsbG8=""#);
        assert_eq!(value(oid::BYTEA, "\\x"), r#""""#);
        assert_eq!(value(oid::BYTEA, "\\x4"), r#""\\x4""#);
    }

    #[test]
    fn arrays_become_json_arrays_of_mapped_elements() {
        assert_eq!(value(1007, "{1,NULL,3}"), "[1,null,3]");
        assert_eq!(value(1007, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(value(1009, r#"{"a b","q\"",""}"#), r#"["a b","q\"",""]"#);
        assert_eq!(value(1000, "{t,f}"), "[true,false]");
        assert_eq!(value(1022, "{NaN,1.5}"), r#"["NaN",1.5]"#);
        assert_eq!(value(1231, "{1.10}"), r#"["1.10"]"#);
        assert_eq!(value(3807, r#"{"{\"a\": [1]}",NULL}"#), r#"[{"a": [1]},null]"#);
        assert_eq!(value(1001, r#"{"\\x00ff"}"#), r#"["AP8="]"#);
        assert_eq!(value(1007, "{}"), "[]");
        assert_eq!(value(1007, "[0:1]={5,6}"), "[5,6]");
        assert_eq!(value(1020, "{(1,1),(0,0);(2,2),(1,1)}"), r#"["(1,1),(0,0)","(2,2),(1,1)"]"#);
        assert_eq!(value(1007, "not an array"), r#""not an array""#);
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
