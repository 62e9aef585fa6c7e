//! Wire primitives shared by the worker and serve protocols, over byte slices.
//!
//! Every integer is a little-endian `u64`; a string is a `u64` length, the bytes and zero
//! padding to a multiple of 8; a string list is a count and that many strings. The reader
//! works on whatever part of a message has arrived so far and answers [`Short::Incomplete`]
//! when it needs more, so the callers re-run a message's parse once more bytes came in.

/// Why a read stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Short {
    /// The buffer ends before the value does: wait for more bytes.
    Incomplete,
    /// The bytes can never be valid (what was wrong, for the log).
    Malformed(&'static str),
}

/// The longest string the gate parses (64 MiB). Longer strings inside an operation that
/// the gate must parse make it stop parsing and pass the session through: a derivation's
/// environment or a store path is never near this, and the bound keeps a hostile stream
/// from making the gate buffer without limit.
pub const MAX_STR_LEN: u64 = 64 << 20;

/// The most entries in a string list or map the gate accepts (1 Mi), for the same reason.
pub const MAX_LIST_LEN: u64 = 1 << 20;

/// A cursor over the bytes of one message.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// How many bytes were read.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], Short> {
        let n = usize::try_from(n).map_err(|_| Short::Malformed("length beyond memory"))?;
        let end = self
            .pos
            .checked_add(n)
            .ok_or(Short::Malformed("length overflow"))?;
        let s = self.buf.get(self.pos..end).ok_or(Short::Incomplete)?;
        self.pos = end;
        Ok(s)
    }

    /// One `u64`.
    pub fn u64(&mut self) -> Result<u64, Short> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// One string's bytes, padding checked and skipped.
    pub fn bytes(&mut self) -> Result<&'a [u8], Short> {
        let len = self.u64()?;
        if len > MAX_STR_LEN {
            return Err(Short::Malformed("string longer than the gate parses"));
        }
        let s = self.take(len)?;
        let pad = padding(len);
        if self.take(pad)?.iter().any(|&b| b != 0) {
            return Err(Short::Malformed("non-zero string padding"));
        }
        Ok(s)
    }

    /// One string, lossily decoded (store paths and derivation fields are ASCII in practice).
    pub fn string(&mut self) -> Result<String, Short> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// A count of list entries, bounded by [`MAX_LIST_LEN`].
    pub fn count(&mut self) -> Result<u64, Short> {
        let n = self.u64()?;
        if n > MAX_LIST_LEN {
            return Err(Short::Malformed("list longer than the gate parses"));
        }
        Ok(n)
    }

    /// A string list.
    pub fn strings(&mut self) -> Result<Vec<String>, Short> {
        let n = self.count()?;
        // No capacity from the wire: a short stream must not allocate for a huge count.
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.string()?);
        }
        Ok(v)
    }

    /// Skips `n` strings.
    pub fn skip_strings(&mut self, n: u64) -> Result<(), Short> {
        for _ in 0..n {
            self.bytes()?;
        }
        Ok(())
    }

    /// Skips a string list.
    pub fn skip_string_list(&mut self) -> Result<(), Short> {
        let n = self.count()?;
        self.skip_strings(n)
    }

    /// Skips `n` `u64`s.
    pub fn skip_u64s(&mut self, n: u64) -> Result<(), Short> {
        self.take(
            n.checked_mul(8)
                .ok_or(Short::Malformed("length overflow"))?,
        )
        .map(|_| ())
    }
}

/// Zero bytes after a string of `len` bytes.
pub fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}

/// Appends a `u64`.
pub fn put_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&n.to_le_bytes());
}

/// Appends a string with its padding.
pub fn put_bytes(out: &mut Vec<u8>, s: &[u8]) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s);
    out.resize(out.len() + padding(s.len() as u64) as usize, 0);
}

/// Appends a string list.
pub fn put_strings<S: AsRef<str>>(out: &mut Vec<u8>, list: &[S]) {
    put_u64(out, list.len() as u64);
    for s in list {
        put_bytes(out, s.as_ref().as_bytes());
    }
}

/// A length-delimited region the gate forwards without looking inside: the tail of an
/// upload. It is followed through its own headers only, never buffered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bulk {
    /// Exactly this many raw bytes (serve `AddToStoreNar`'s NAR).
    Raw(u64),
    /// Framed data: chunks of `u64 len` + `len` bytes (no padding), ended by `len = 0`.
    Framed {
        /// Bytes left in the current chunk.
        in_chunk: u64,
        /// The bytes of a chunk header seen so far.
        header: Vec<u8>,
    },
}

impl Bulk {
    /// A framed region, before its first chunk header.
    pub fn framed() -> Self {
        Bulk::Framed {
            in_chunk: 0,
            header: Vec::new(),
        }
    }

    /// Consumes the region's bytes at the start of `data`: how many, and whether the region
    /// is over.
    pub fn advance(&mut self, data: &[u8]) -> (usize, bool) {
        match self {
            Bulk::Raw(left) => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
                *left -= n as u64;
                (n, *left == 0)
            }
            Bulk::Framed { in_chunk, header } => {
                let mut used = 0;
                while used < data.len() {
                    if *in_chunk > 0 {
                        let n = usize::try_from(*in_chunk)
                            .unwrap_or(usize::MAX)
                            .min(data.len() - used);
                        *in_chunk -= n as u64;
                        used += n;
                        continue;
                    }
                    let want = 8 - header.len();
                    let n = want.min(data.len() - used);
                    header.extend_from_slice(&data[used..used + n]);
                    used += n;
                    if header.len() == 8 {
                        let len = u64::from_le_bytes(header[..].try_into().expect("8 bytes"));
                        header.clear();
                        if len == 0 {
                            return (used, true);
                        }
                        *in_chunk = len;
                    }
                }
                (used, false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Strings round-trip with their padding; a short buffer is incomplete, not malformed.
    #[test]
    fn strings_round_trip_and_short_reads_are_incomplete() {
        let mut b = Vec::new();
        put_strings(&mut b, &["a", "12345678", ""]);
        let mut r = Reader::new(&b);
        assert_eq!(r.strings().unwrap(), vec!["a", "12345678", ""]);
        assert_eq!(r.position(), b.len());
        for cut in 0..b.len() {
            assert_eq!(Reader::new(&b[..cut]).strings(), Err(Short::Incomplete));
        }
    }

    /// Non-zero padding and absurd lengths are malformed at once, without allocating.
    #[test]
    fn bad_padding_and_huge_lengths_are_malformed() {
        let mut b = Vec::new();
        put_bytes(&mut b, b"abc");
        b[8 + 3] = 1;
        assert!(matches!(Reader::new(&b).bytes(), Err(Short::Malformed(_))));
        let mut b = Vec::new();
        put_u64(&mut b, u64::MAX);
        assert!(matches!(Reader::new(&b).bytes(), Err(Short::Malformed(_))));
        assert!(matches!(
            Reader::new(&b).strings(),
            Err(Short::Malformed(_))
        ));
    }

    /// A framed region is followed across any split of its chunk headers.
    #[test]
    fn framed_region_ends_at_the_zero_chunk_whatever_the_split() {
        let mut b = Vec::new();
        put_u64(&mut b, 3);
        b.extend_from_slice(b"xyz");
        put_u64(&mut b, 1);
        b.push(9);
        put_u64(&mut b, 0);
        b.extend_from_slice(b"after");
        for split in 1..b.len() {
            let mut f = Bulk::framed();
            let mut used = 0;
            let mut done = false;
            for part in b.chunks(split) {
                if done {
                    break;
                }
                let (n, end) = f.advance(part);
                used += n;
                done = end;
            }
            assert!(done);
            assert_eq!(&b[used..], b"after", "split {split}");
        }
    }
}
