//! Postgres array text output (`{1,2}`, `{{"a b",NULL},{c,d}}`,
//! `[0:1]={x,y}`) parsed into nested elements, so arrays become JSON arrays.

use std::borrow::Cow;

/// One element of a parsed array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Element<'a> {
    Null,
    /// The element's text output, unquoted and unescaped.
    Text(Cow<'a, str>),
    /// A sub-array (multi-dimensional arrays).
    Array(Vec<Element<'a>>),
}

/// Parses `text` as written by Postgres' `array_out` with the element
/// type's `delimiter` (`,` for every built-in type but `box`).
/// Returns `None` when `text` is not such an array.
pub fn parse(text: &str, delimiter: u8) -> Option<Vec<Element<'_>>> {
    let mut rest = text;
    if rest.starts_with('[') {
        // Dimension decoration, written when a lower bound is not 1.
        rest = &rest[rest.find('=')? + 1..];
    }
    let mut parser = Parser { text: rest, pos: 0, delimiter };
    let elements = parser.array()?;
    (parser.pos == rest.len()).then_some(elements)
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    delimiter: u8,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    /// `{` elements `}`
    fn array(&mut self) -> Option<Vec<Element<'a>>> {
        self.expect(b'{')?;
        let mut elements = Vec::new();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(elements);
        }
        loop {
            elements.push(self.element()?);
            match self.peek()? {
                b'}' => {
                    self.pos += 1;
                    return Some(elements);
                }
                b if b == self.delimiter => self.pos += 1,
                _ => return None,
            }
        }
    }

    fn element(&mut self) -> Option<Element<'a>> {
        match self.peek()? {
            b'{' => self.array().map(Element::Array),
            b'"' => self.quoted().map(Element::Text),
            _ => {
                let start = self.pos;
                while let Some(b) = self.peek() {
                    if b == self.delimiter || b == b'}' || b == b'{' || b == b'"' || b == b'\\' {
                        break;
                    }
                    self.pos += 1;
                }
                let token = &self.text[start..self.pos];
                match token {
                    "" => None,
                    "NULL" => Some(Element::Null),
                    _ => Some(Element::Text(Cow::Borrowed(token))),
                }
            }
        }
    }

    /// `"` text with `\"` and `\\` escapes `"`
    fn quoted(&mut self) -> Option<Cow<'a, str>> {
        self.expect(b'"')?;
        let start = self.pos;
        let mut unescaped: Option<String> = None;
        loop {
            let b = self.peek()?;
            match b {
                b'"' => {
                    let value = match unescaped {
                        Some(s) => Cow::Owned(s),
                        None => Cow::Borrowed(&self.text[start..self.pos]),
                    };
                    self.pos += 1;
                    return Some(value);
                }
                b'\\' => {
                    let owned = unescaped.get_or_insert_with(|| self.text[start..self.pos].to_owned());
                    self.pos += 1;
                    let c = self.text[self.pos..].chars().next()?;
                    owned.push(c);
                    self.pos += c.len_utf8();
                }
                _ => {
                    let c = self.text[self.pos..].chars().next()?;
                    if let Some(owned) = unescaped.as_mut() {
                        owned.push(c);
                    }
                    self.pos += c.len_utf8();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Element<'_> {
        Element::Text(Cow::Borrowed(s))
    }

    #[test]
    fn parses_what_array_out_writes() {
        assert_eq!(parse("{}", b','), Some(vec![]));
        assert_eq!(parse("{1,2,3}", b','), Some(vec![t("1"), t("2"), t("3")]));
        assert_eq!(parse("{a,NULL,\"NULL\"}", b','), Some(vec![t("a"), Element::Null, t("NULL")]));
        assert_eq!(
            parse(r#"{"a b","q\"uote","back\\slash","",ü}"#, b','),
            Some(vec![t("a b"), t("q\"uote"), t("back\\slash"), t(""), t("ü")])
        );
        assert_eq!(
            parse("{{1,2},{3,NULL}}", b','),
            Some(vec![Element::Array(vec![t("1"), t("2")]), Element::Array(vec![t("3"), Element::Null])])
        );
        assert_eq!(parse("[0:1]={x,y}", b','), Some(vec![t("x"), t("y")]));
        assert_eq!(parse("{(1,1),(0,0);(2,2),(1,1)}", b';'), Some(vec![t("(1,1),(0,0)"), t("(2,2),(1,1)")]));
        assert_eq!(parse(r#"{"{\"a\": 1}"}"#, b','), Some(vec![t(r#"{"a": 1}"#)]));
    }

    #[test]
    fn rejects_what_is_not_an_array() {
        for bad in ["", "{", "}", "1,2", "{1,2", "{1,,2}", "{1}x", "{\"a}", "[1:2]", "{a\"b}", "{,}"] {
            assert_eq!(parse(bad, b','), None, "{bad:?}");
        }
    }

    /// Writes elements the way array_out does, for the round-trip property.
    fn write(elements: &[Element<'_>], out: &mut String) {
        out.push('{');
        for (i, e) in elements.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match e {
                Element::Null => out.push_str("NULL"),
                Element::Text(s) => {
                    out.push('"');
                    for c in s.chars() {
                        if c == '"' || c == '\\' {
                            out.push('\\');
                        }
                        out.push(c);
                    }
                    out.push('"');
                }
                Element::Array(inner) => write(inner, out),
            }
        }
        out.push('}');
    }

    fn element() -> impl Strategy<Value = Element<'static>> {
        let leaf =
            prop_oneof![Just(Element::Null), any::<String>().prop_map(|s| Element::Text(Cow::Owned(s)))];
        leaf.prop_recursive(3, 32, 6, |inner| prop::collection::vec(inner, 0..6).prop_map(Element::Array))
    }

    proptest! {
        #[test]
        fn never_panics_on_any_input(text in ".*") {
            let _ = parse(&text, b',');
        }

        #[test]
        fn never_panics_on_array_like_input(text in r#"[{}",\\NULLab ]{0,40}"#) {
            let _ = parse(&text, b',');
        }

        #[test]
        fn round_trips_quoted_elements(elements in prop::collection::vec(element(), 0..6)) {
            let mut text = String::new();
            write(&elements, &mut text);
            prop_assert_eq!(parse(&text, b','), Some(elements));
        }
    }
}
