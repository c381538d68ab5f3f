//! The few JSON writing primitives the event encoder needs. Events are
//! written straight into a byte buffer: no intermediate JSON tree.

/// Appends `s` as a JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // Long texts are mostly plain: skip eight bytes at a time.
        if let Some(word) = bytes.get(i..i + 8) {
            if !needs_escape(u64::from_le_bytes(word.try_into().unwrap_or_default())) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..i]);
                write_control(out, b);
                i += 1;
                start = i;
                continue;
            }
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Whether any of the eight bytes is a control character, `"` or `\\`
/// (exact: the "has less than" and "has zero" bit tricks for bytes).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = u64::MAX / 255;
    const HIGH: u64 = ONES * 0x80;
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    (below_space | has_zero(word ^ (ONES * u64::from(b'"'))) | has_zero(word ^ (ONES * u64::from(b'\\'))))
        != 0
}

fn write_control(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.extend_from_slice(b"\\u00");
    out.push(HEX[usize::from(b >> 4)]);
    out.push(HEX[usize::from(b & 0xf)]);
}

/// Appends `n` in decimal, zero-padded to at least `width` digits, without
/// the allocation of `to_string`/`format!` (several per event otherwise).
pub fn write_decimal(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    while n > 0 || digits.len() - start < width.max(1) {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&digits[start..]);
}

/// Appends `n` in upper-case hex, as Postgres prints LSN halves.
pub fn write_upper_hex(out: &mut Vec<u8>, mut n: u32) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut digits = [0u8; 8];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = HEX[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Appends `"key":`.
pub fn write_key(out: &mut Vec<u8>, key: &str) {
    write_str(out, key);
    out.push(b':');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(s: &str) -> String {
        let mut out = Vec::new();
        write_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    proptest::proptest! {
        #[test]
        fn any_string_round_trips(s in "(?s).{0,40}", plain in "[a-z]{0,20}") {
            // Around a long plain run, so that both the word and the byte paths run.
            let text = format!("{plain}{s}{plain}{s}");
            let json = quoted(&text);
            proptest::prop_assert_eq!(serde_json::from_str::<String>(&json).unwrap(), text);
        }
    }

    #[test]
    fn needs_escape_finds_every_special_byte_in_any_position() {
        for special in (0u8..0x20).chain([b'"', b'\\']) {
            for position in 0..8 {
                let mut word = *b"abcdefgh";
                word[position] = special;
                assert!(needs_escape(u64::from_le_bytes(word)), "{special:#x} at {position}");
            }
        }
        for plain in (0x20u8..=0xff).filter(|b| *b != b'"' && *b != b'\\') {
            assert!(!needs_escape(u64::from_le_bytes([plain; 8])), "{plain:#x}");
        }
    }

    #[test]
    fn numbers_match_the_formatting_macros() {
        for (n, width) in [(0u64, 0), (0, 2), (7, 2), (42, 2), (123456, 6), (5, 6), (u64::MAX, 0), (2026, 4)]
        {
            let mut out = Vec::new();
            write_decimal(&mut out, n, width);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{n:0width$}"));
        }
        for n in [0u32, 0xA8, 0x1_0000, u32::MAX] {
            let mut out = Vec::new();
            write_upper_hex(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{n:X}"));
        }
    }

    #[test]
    fn escapes_quotes_backslashes_and_controls() {
        assert_eq!(quoted("plain"), r#""plain""#);
        assert_eq!(quoted("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quoted("l1\nl2\tx\r"), r#""l1\nl2\tx\r""#);
        assert_eq!(quoted("\u{1}\u{1f}"), r#""\u0001\u001f""#);
        assert_eq!(quoted("ünï €"), "\"ünï €\"");
        assert_eq!(quoted(""), r#""""#);
    }
}
