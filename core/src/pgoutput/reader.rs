//! A bounds-checked cursor over one pgoutput message: every read either
//! succeeds or returns `DecodeError::Truncated`, never panics.

use super::DecodeError;

pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { needed: n, at: self.pos, len: self.buf.len() });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated string; Postgres sends names in the server encoding,
    /// which the loopback session pins to UTF-8.
    pub(crate) fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let rest = &self.buf[self.pos..];
        let nul =
            rest.iter().position(|&b| b == 0).ok_or(DecodeError::UnterminatedString { at: self.pos })?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::InvalidUtf8 { at: self.pos })?;
        self.pos += nul + 1;
        Ok(s)
    }

    /// A column count (Int16); it must not be negative.
    pub(crate) fn count(&mut self) -> Result<usize, DecodeError> {
        let at = self.pos;
        let count = self.i16()?;
        usize::try_from(count).map_err(|_| DecodeError::NegativeLength { at, len: i64::from(count) })
    }

    /// A length-prefixed value; the length must not be negative.
    pub(crate) fn sized_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let at = self.pos;
        let len = self.i32()?;
        let len =
            usize::try_from(len).map_err(|_| DecodeError::NegativeLength { at, len: i64::from(len) })?;
        self.bytes(len)
    }
}
