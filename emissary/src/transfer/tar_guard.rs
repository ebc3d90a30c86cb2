//! A bound on what the `tar` crate reads into memory whole: GNU long names and long links
//! (`L`, `K`) and pax records (`x`). The crate buffers each before it yields the entry they
//! describe, so a 915 KB gzip of a 200 MB "name" cost 1.2 GB of memory however small the
//! input limits were. [`MetadataGuard`] reads the stream alongside the crate, header by header,
//! and fails the read that would start such a record when it is over [`METADATA_LIMIT`].
//!
//! It must see the stream exactly as tar 0.4 does (`Archive::entries`, not raw, zeros not
//! ignored), or a crafted archive could make it lose its place and let a record through: the
//! same number parsing, the same notion of a recognised (ustar or GNU) header, a pax record's
//! `size=` applied to the next header that is not itself an extension, pending pax records
//! dropped with the entry they are yielded with, GNU sparse extension blocks. Whatever it cannot
//! parse, the crate cannot either: that is an error here too.

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
    /// The `size=` of a pax record waiting for its entry (`Some(None)`: a record without one).
    pax: Option<Option<u64>>,
    /// The data size of a sparse entry whose extension blocks are being read.
    sparse_size: u64,
}

enum State {
    Header,
    SparseExtension,
    /// Data and padding to pass; a pax record's data (`record` bytes of it) is kept to read.
    Data {
        left: u64,
        record: Option<(Vec<u8>, u64)>,
    },
    /// The end of the archive: the crate reads no further.
    Done,
}

impl<R: Read> MetadataGuard<R> {
    pub fn new(inner: R) -> Self {
        MetadataGuard {
            inner,
            state: State::Header,
            block: Box::new([0; BLOCK]),
            filled: 0,
            pax: None,
            sparse_size: 0,
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Data { left, record } => {
                    let n = bytes
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    if let Some((kept, len)) = record {
                        let want = (*len as usize).saturating_sub(kept.len()).min(n);
                        kept.extend_from_slice(&bytes[..want]);
                    }
                    *left -= n as u64;
                    bytes = &bytes[n..];
                    if *left == 0 {
                        if let Some((kept, _)) = record.take() {
                            self.pax = Some(pax_size(&kept));
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
                        self.after_block()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A whole block has been read: what follows it.
    fn after_block(&mut self) -> io::Result<()> {
        let block = &self.block;
        if matches!(self.state, State::SparseExtension) {
            if block[504] != 1 {
                self.state = data(self.sparse_size, None);
            }
            return Ok(());
        }
        if block.iter().all(|&b| b == 0) {
            self.state = State::Done;
            return Ok(());
        }
        let kind = block[156];
        let gnu = &block[257..265] == b"ustar  \0";
        let recognised = gnu || &block[257..265] == b"ustar\x0000";
        let extension = matches!(kind, b'L' | b'K' | b'x' | b'g');
        let mut size = numeric(&block[124..136]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a tar header with a malformed size",
            )
        })?;
        if !extension && let Some(Some(pax)) = self.pax {
            size = pax;
        }
        let metadata = recognised && matches!(kind, b'L' | b'K' | b'x');
        if metadata && size > METADATA_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a long name or pax record of {size} bytes (the limit is {} KiB)",
                    METADATA_LIMIT / 1024
                ),
            ));
        }
        if !metadata {
            self.pax = None; // yielded with this entry
        }
        if kind == b'S' && gnu && block[482] == 1 {
            self.sparse_size = size;
            self.state = State::SparseExtension;
            return Ok(());
        }
        let record = (recognised && kind == b'x').then(|| (Vec::new(), size));
        self.state = data(size, record);
        Ok(())
    }
}

fn data(size: u64, record: Option<(Vec<u8>, u64)>) -> State {
    let left = size.div_ceil(BLOCK as u64).saturating_mul(BLOCK as u64);
    if left == 0 {
        if record.is_some() {
            // An empty pax record: pending, with no size.
            return State::Data { left: 0, record };
        }
        State::Header
    } else {
        State::Data { left, record }
    }
}

impl<R: Read> Read for MetadataGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

/// A tar numeric field as tar 0.4 reads it: GNU base-256 when the high bit is set (the last 8
/// bytes count), else octal text cut at the first NUL and trimmed.
fn numeric(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let skip = field.len().saturating_sub(8).max(1);
        return Some(
            field[skip..]
                .iter()
                .fold(0u64, |n, &b| (n << 8) | u64::from(b)),
        );
    }
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// The `size=` of pax records as tar 0.4 reads it: lines split at `\n`, each `LEN key=value`
/// with LEN counting the line and its newline; an empty line ends them; the first malformed
/// line, or a size that is not a number, means none.
fn pax_size(records: &[u8]) -> Option<u64> {
    for line in records.split(|&b| b == b'\n') {
        if line.is_empty() {
            return None;
        }
        let space = line.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&line[..space]).ok()?.parse().ok()?;
        if line.len() + 1 != len {
            return None;
        }
        let pair = &line[space + 1..];
        let equals = pair.iter().position(|&b| b == b'=')?;
        if &pair[..equals] == b"size" {
            return std::str::from_utf8(&pair[equals + 1..]).ok()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbers_and_pax_sizes_as_the_tar_crate_does() {
        assert_eq!(numeric(b"00000001750\0"), Some(1000));
        assert_eq!(numeric(b"1\x000000000000"), Some(1), "cut at the first NUL");
        assert_eq!(numeric(b"\t0000000001\0"), Some(1), "trimmed");
        assert_eq!(
            numeric(b"\0\0\0\0\0\0\0\0\0\0\0\0"),
            None,
            "empty is not a number"
        );
        assert_eq!(numeric(b"0000000009\0\0"), None);
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 7;
        assert_eq!(numeric(&big), Some(7));
        assert_eq!(
            pax_size(b"18 path=some/file\n15 size=123456\n"),
            Some(123456)
        );
        assert_eq!(pax_size(b"18 path=some/file\n"), None);
        // A value with a newline makes the record malformed to the crate: no size after it.
        assert_eq!(pax_size(b"12 path=a\nb\n11 size=0\n"), None);
    }
}
