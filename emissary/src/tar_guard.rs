//! A bound on what the `tar` crate reads into memory whole: GNU long names and long links
//! (`L`, `K`) and pax records (`x`). The crate buffers each before it yields the entry they
//! describe, so a 915 KB gzip of a 200 MB "name" cost 1.2 GB of memory however small the
//! input limits were. [`MetadataGuard`] reads the stream alongside the crate, header by header,
//! and fails the read that would start such a record when it is over [`METADATA_LIMIT`].
//!
//! It follows the stream as the crate does: 512-byte headers, data padded to 512 bytes, the
//! size of a pax record's `size=` for the entry after it, and GNU sparse extension blocks.

use std::io::{self, Read};

/// The largest long name, long link or pax record accepted (PATH_MAX is 4096).
pub const METADATA_LIMIT: u64 = 64 * 1024;

const BLOCK: usize = 512;

pub struct MetadataGuard<R> {
    inner: R,
    state: State,
    /// A block being gathered (a header or a sparse extension).
    block: Box<[u8; BLOCK]>,
    filled: usize,
    /// The `size=` of the last pax record, for the next entry that is not itself metadata.
    pax_size: Option<u64>,
    /// The data size of a sparse entry whose extension blocks are being read.
    sparse_size: u64,
}

enum State {
    Header,
    SparseExtension,
    /// Data and padding to pass; a pax record's first `len` bytes are kept to read its size.
    Data {
        left: u64,
        pax: Option<(Vec<u8>, u64)>,
    },
    /// The end of the archive (or a header the crate will refuse): nothing more to check.
    Done,
}

impl<R: Read> MetadataGuard<R> {
    pub fn new(inner: R) -> Self {
        MetadataGuard {
            inner,
            state: State::Header,
            block: Box::new([0; BLOCK]),
            filled: 0,
            pax_size: None,
            sparse_size: 0,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Data { left, pax } => {
                    let n = bytes
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    if let Some((kept, len)) = pax {
                        let want = (*len as usize).saturating_sub(kept.len()).min(n);
                        kept.extend_from_slice(&bytes[..want]);
                    }
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        if let Some((kept, _)) = pax.take() {
                            self.pax_size = pax_value(&kept, "size");
                        }
                        self.state = State::Header;
                    }
                }
                State::Header | State::SparseExtension => {
                    let n = (BLOCK - self.filled).min(bytes.len());
                    self.block[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                    self.filled += n;
                    bytes = &bytes[n..];
                    if self.filled == BLOCK {
                        self.filled = 0;
                        self.next_state()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A whole block has been read: what follows it.
    fn next_state(&mut self) -> io::Result<()> {
        let block = &self.block;
        if matches!(self.state, State::SparseExtension) {
            if block[504] == 0 {
                self.state = data(self.sparse_size, None);
            }
            return Ok(());
        }
        if block.iter().all(|&b| b == 0) {
            self.state = State::Done;
            return Ok(());
        }
        let kind = block[156];
        let metadata = matches!(kind, b'L' | b'K' | b'x' | b'g');
        let Some(mut size) = numeric(&block[124..136]) else {
            self.state = State::Done; // the crate refuses it
            return Ok(());
        };
        if !metadata && let Some(pax) = self.pax_size.take() {
            size = pax;
        }
        if matches!(kind, b'L' | b'K' | b'x') && size > METADATA_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a long name or pax record of {size} bytes (the limit is {} KiB)",
                    METADATA_LIMIT / 1024
                ),
            ));
        }
        if kind == b'S' && block[482] != 0 {
            self.sparse_size = size;
            self.state = State::SparseExtension;
            return Ok(());
        }
        let pax = (kind == b'x').then(|| (Vec::new(), size));
        self.state = data(size, pax);
        Ok(())
    }
}

fn data(size: u64, pax: Option<(Vec<u8>, u64)>) -> State {
    let left = size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
    if left == 0 {
        State::Header
    } else {
        State::Data { left, pax }
    }
}

impl<R: Read> Read for MetadataGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

/// A tar numeric field: octal text, or GNU base-256 (high bit set; the last 8 bytes count).
fn numeric(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let skip = field.len().saturating_sub(8).max(1);
        return Some(
            field[skip..]
                .iter()
                .fold(0u64, |n, &b| (n << 8) | u64::from(b)),
        );
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// The value of `key` in pax records (`LEN key=value\n`...).
fn pax_value(records: &[u8], key: &str) -> Option<u64> {
    let mut rest = records;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        let record = rest.get(space + 1..len)?;
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(format!("{key}=").as_bytes()) {
            return std::str::from_utf8(value).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numeric_fields_and_pax_sizes() {
        assert_eq!(numeric(b"00000001750\0"), Some(1000));
        assert_eq!(numeric(b"\0\0\0\0\0\0\0\0\0\0\0\0"), Some(0));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 7;
        assert_eq!(numeric(&big), Some(7));
        assert_eq!(
            pax_value(b"18 path=some/file\n15 size=123456\n", "size"),
            Some(123456)
        );
        assert_eq!(pax_value(b"18 path=some/file\n", "size"), None);
    }
}
