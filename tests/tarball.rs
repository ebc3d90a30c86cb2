//! Hand-made tar archives, including the malicious ones a safe unpacker must refuse: the
//! `tar` crate (rightly) will not write `..` or absolute names, so headers are built here.

/// One raw entry.
pub struct Entry<'a> {
    pub name: &'a str,
    /// b'0' file, b'1' hard link, b'2' symlink, b'3' char device, b'5' directory, b'6' FIFO.
    pub kind: u8,
    pub link: &'a str,
    pub data: &'a [u8],
}

pub fn file<'a>(name: &'a str, data: &'a [u8]) -> Entry<'a> {
    Entry {
        name,
        kind: b'0',
        link: "",
        data,
    }
}

pub fn dir(name: &str) -> Entry<'_> {
    Entry {
        name,
        kind: b'5',
        link: "",
        data: b"",
    }
}

pub fn symlink<'a>(name: &'a str, target: &'a str) -> Entry<'a> {
    Entry {
        name,
        kind: b'2',
        link: target,
        data: b"",
    }
}

pub fn hardlink<'a>(name: &'a str, target: &'a str) -> Entry<'a> {
    Entry {
        name,
        kind: b'1',
        link: target,
        data: b"",
    }
}

pub fn device(name: &str) -> Entry<'_> {
    Entry {
        name,
        kind: b'3',
        link: "",
        data: b"",
    }
}

/// A ustar archive of `entries`, with the two zero blocks at the end.
pub fn build(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        put(&mut h[0..100], e.name.as_bytes());
        put(
            &mut h[100..108],
            format!("{:07o}", if e.kind == b'5' { 0o755 } else { 0o644 }).as_bytes(),
        );
        put(&mut h[108..116], b"0000000");
        put(&mut h[116..124], b"0000000");
        put(
            &mut h[124..136],
            format!("{:011o}", e.data.len()).as_bytes(),
        );
        put(&mut h[136..148], b"00000000000");
        h[156] = e.kind;
        put(&mut h[157..257], e.link.as_bytes());
        put(&mut h[257..263], b"ustar\0");
        put(&mut h[263..265], b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        put(&mut h[148..156], format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn put(field: &mut [u8], value: &[u8]) {
    field[..value.len()].copy_from_slice(value);
}

/// Sets the first entry's mtime to 2^64 - 1 seconds (GNU base-256), past any clock.
pub fn far_future_mtime(archive: &mut [u8]) {
    let h = &mut archive[..512];
    h[136] = 0x80;
    h[137..140].fill(0);
    h[140..148].fill(0xff);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h[148..156], format!("{sum:06o}\0 ").as_bytes());
}

/// Sets the size field of the header at `offset` (which `build` computed from the data).
pub fn set_size(archive: &mut [u8], offset: usize, size: u64) {
    let h = &mut archive[offset..offset + 512];
    put(&mut h[124..136], format!("{size:011o}\0").as_bytes());
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h[148..156], format!("{sum:06o}\0 ").as_bytes());
}

/// One raw header with its size field and magic as given (`build` writes well-formed ones).
pub fn raw_header(name: &str, kind: u8, size_field: &[u8; 12], magic: &[u8; 8]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    put(&mut h[0..100], name.as_bytes());
    put(&mut h[100..108], b"0000644\0");
    put(&mut h[108..116], b"0000000\0");
    put(&mut h[116..124], b"0000000\0");
    h[124..136].copy_from_slice(size_field);
    put(&mut h[136..148], b"00000000000\0");
    h[156] = kind;
    h[257..265].copy_from_slice(magic);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h[148..156], format!("{sum:06o}\0 ").as_bytes());
    h
}

/// `data` padded to whole 512-byte blocks.
pub fn padded(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.resize(data.len().div_ceil(512) * 512, 0);
    out
}
