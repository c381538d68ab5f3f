//! Column values in `data`/`dataOld`: Postgres' text output of a type,
//! mapped to JSON as DESIGN.md section 5 says. A column's [`ValueKind`] is
//! resolved once per relation (built-in types here, user-defined ones from
//! the catalog through [`TypeCatalog`]), then applied to every value.

use std::collections::HashMap;

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

/// How a column's text output becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    Bool,
    /// int2/4/8, oid: Postgres' output is a valid JSON number.
    Integer,
    /// float4/8: a number, or "NaN"/"Infinity"/"-Infinity" as strings.
    Float,
    /// json/jsonb: nested as they are (json is checked on input, jsonb printed by Postgres).
    Json,
    Timestamptz,
    Bytea,
    /// An array whose elements are of `element` kind, split at `delimiter`.
    Array {
        element: Box<ValueKind>,
        delimiter: u8,
    },
    /// Everything else, numeric included (a string loses no digits): the text output.
    Text,
}

impl ValueKind {
    /// The kind of a built-in scalar type whose JSON form is not text;
    /// `None` for every other type, arrays included: the catalog tells
    /// those (an array's element type and delimiter are in `pg_type`).
    pub fn builtin(type_oid: u32) -> Option<ValueKind> {
        Some(match type_oid {
            oid::BOOL => ValueKind::Bool,
            oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => ValueKind::Integer,
            oid::FLOAT4 | oid::FLOAT8 => ValueKind::Float,
            oid::JSON | oid::JSONB => ValueKind::Json,
            oid::TIMESTAMPTZ => ValueKind::Timestamptz,
            oid::BYTEA => ValueKind::Bytea,
            _ => return None,
        })
    }
}

/// One `pg_type` row, as the catalog lookup returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeRow {
    pub oid: u32,
    /// `typtype`: b base, c composite, d domain, e enum, p pseudo, r range, m multirange.
    pub typtype: u8,
    /// `typelem` when the type is an array, else 0.
    pub array_element: u32,
    /// The delimiter between elements in its text output: the element
    /// type's `typdelim` for an array (`;` for box, `,` for the rest).
    pub typdelim: u8,
    /// `typbasetype` of a domain, else 0.
    pub domain_base: u32,
}

/// Kinds of the types that are not built-in scalars, learnt from the catalog.
#[derive(Debug, Default)]
pub struct TypeCatalog {
    learnt: HashMap<u32, ValueKind>,
}

impl TypeCatalog {
    pub fn kind(&self, type_oid: u32) -> ValueKind {
        ValueKind::builtin(type_oid)
            .or_else(|| self.learnt.get(&type_oid).cloned())
            .unwrap_or(ValueKind::Text)
    }

    /// Types among `oids` that need a catalog lookup (once per session).
    pub fn unknown(&self, oids: impl Iterator<Item = u32>) -> Vec<u32> {
        let mut unknown: Vec<u32> =
            oids.filter(|o| ValueKind::builtin(*o).is_none() && !self.learnt.contains_key(o)).collect();
        unknown.sort_unstable();
        unknown.dedup();
        unknown
    }

    /// Learns the kinds of `rows`, which hold every type they refer to
    /// (domain bases, array elements).
    pub fn learn(&mut self, rows: &[TypeRow]) {
        let by_oid: HashMap<u32, &TypeRow> = rows.iter().map(|r| (r.oid, r)).collect();
        for row in rows {
            let kind = resolve(row.oid, &by_oid, 0);
            self.learnt.insert(row.oid, kind);
        }
    }
}

/// A domain maps like its base type, an array like its elements; enums,
/// composites, ranges and every other type are text. Depth-limited against cycles.
fn resolve(type_oid: u32, rows: &HashMap<u32, &TypeRow>, depth: u32) -> ValueKind {
    if let Some(kind) = ValueKind::builtin(type_oid) {
        return kind;
    }
    match rows.get(&type_oid) {
        Some(row) if depth < 16 => {
            if row.typtype == b'd' && row.domain_base != 0 {
                resolve(row.domain_base, rows, depth + 1)
            } else if row.array_element != 0 {
                ValueKind::Array {
                    element: Box::new(resolve(row.array_element, rows, depth + 1)),
                    delimiter: row.typdelim,
                }
            } else {
                ValueKind::Text
            }
        }
        _ => ValueKind::Text,
    }
}

/// Appends the JSON form of one non-null value, given its kind and text output.
pub fn write_value(out: &mut Vec<u8>, kind: &ValueKind, text: &str) {
    match kind {
        ValueKind::Bool => out.extend_from_slice(if text == "t" { b"true" } else { b"false" }),
        ValueKind::Integer | ValueKind::Json => out.extend_from_slice(text.as_bytes()),
        ValueKind::Float => match text {
            "NaN" | "Infinity" | "-Infinity" => json::write_str(out, text),
            _ => out.extend_from_slice(text.as_bytes()),
        },
        ValueKind::Timestamptz => write_timestamptz(out, text),
        ValueKind::Bytea => write_bytea(out, text),
        ValueKind::Array { element, delimiter } => match arrays::parse(text, *delimiter) {
            Some(elements) => write_elements(out, element, &elements),
            // Not an array after all: keep the text rather than guess.
            None => json::write_str(out, text),
        },
        ValueKind::Text => json::write_str(out, text),
    }
}

fn write_elements(out: &mut Vec<u8>, kind: &ValueKind, elements: &[Element<'_>]) {
    out.push(b'[');
    for (i, element) in elements.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match element {
            Element::Null => out.extend_from_slice(b"null"),
            Element::Text(text) => write_value(out, kind, text),
            Element::Array(inner) => write_elements(out, kind, inner),
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
    use proptest::prelude::*;

    proptest! {
        /// Any text of any type: no panic, and every kind but the ones
        /// passed through (numbers, json) gives valid JSON.
        #[test]
        fn any_value_is_encoded_without_panic(type_oid in prop::sample::select(vec![16u32, 17, 25, 1000, 1007, 1009, 1184, 1185, 3807, 1700, 20, 701]), text in ".*") {
            let kind = catalog().kind(type_oid);
            let mut out = Vec::new();
            write_value(&mut out, &kind, &text);
            let passed_through = matches!(kind, ValueKind::Integer | ValueKind::Float | ValueKind::Json)
                || matches!(&kind, ValueKind::Array { element, .. }
                    if matches!(**element, ValueKind::Integer | ValueKind::Float | ValueKind::Json));
            if !passed_through {
                prop_assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok(), "{}", String::from_utf8_lossy(&out));
            }
        }
    }

    /// A catalog that learnt some built-in array types, as the lookup
    /// returns them (`pg_type`: array oid, element oid, element delimiter).
    fn catalog() -> TypeCatalog {
        let arrays: [(u32, u32, u8); 12] = [
            (1000, 16, b','),
            (1001, 17, b','),
            (1007, 23, b','),
            (1009, 25, b','),
            (1016, 20, b','),
            (1020, 603, b';'),
            (1022, 701, b','),
            (1185, 1184, b','),
            (1231, 1700, b','),
            (3807, 3802, b','),
            (2210, 2205, b','), // regclass[]
            (3221, 3220, b','), // pg_lsn[]
        ];
        let mut rows: Vec<TypeRow> = arrays
            .iter()
            .map(|&(oid, element, typdelim)| TypeRow {
                oid,
                typtype: b'b',
                array_element: element,
                typdelim,
                domain_base: 0,
            })
            .collect();
        rows.extend([25, 603, 1700, 2205, 3220].map(|oid| TypeRow {
            oid,
            typtype: b'b',
            array_element: 0,
            typdelim: if oid == 603 { b';' } else { b',' },
            domain_base: 0,
        }));
        let mut catalog = TypeCatalog::default();
        catalog.learn(&rows);
        catalog
    }

    fn value(type_oid: u32, text: &str) -> String {
        let mut out = Vec::new();
        write_value(&mut out, &catalog().kind(type_oid), text);
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
    fn user_types_map_through_the_catalog() {
        let row = |oid, typtype, array_element, domain_base| TypeRow {
            oid,
            typtype,
            array_element,
            typdelim: b',',
            domain_base,
        };
        let mut catalog = TypeCatalog::default();
        assert_eq!(catalog.unknown([23, 25, 16400, 16401, 16400].into_iter()), vec![25, 16400, 16401]);
        catalog.learn(&[
            row(16400, b'd', 0, 23),    // domain over int4
            row(16401, b'b', 16400, 0), // its array
            row(16402, b'e', 0, 0),     // enum
            row(16403, b'b', 16402, 0), // enum[]
            row(16404, b'd', 0, 16401), // domain over the domain array
            row(16405, b'd', 0, 16405), // a cycle must not hang
        ]);
        let json = |oid, text| {
            let mut out = Vec::new();
            write_value(&mut out, &catalog.kind(oid), text);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(json(16400, "5"), "5");
        assert_eq!(json(16401, "{1,NULL}"), "[1,null]");
        assert_eq!(json(16402, "happy"), r#""happy""#);
        assert_eq!(json(16403, "{happy,\"so sad\"}"), r#"["happy","so sad"]"#);
        assert_eq!(json(16404, "{7}"), "[7]");
        assert_eq!(json(16405, "x"), r#""x""#);
        assert_eq!(json(99999, "unknown"), r#""unknown""#);
        assert!(catalog.unknown([16400, 16405].into_iter()).is_empty());
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
        // Arrays of types outside any hand-written list: elements from the catalog.
        assert_eq!(value(2210, "{pg_class,public.t}"), r#"["pg_class","public.t"]"#);
        assert_eq!(value(3221, "{0/16B3748,NULL}"), r#"["0/16B3748",null]"#);
        assert_eq!(TypeCatalog::default().kind(1007), ValueKind::Text, "unknown until the catalog tells");
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
