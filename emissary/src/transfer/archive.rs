//! Archives: outputs packed in one streaming pass (directory → tar → gzip/zstd → sink, size and
//! sha256 counted on the way, constant memory), inputs unpacked without ever writing outside
//! their target.
//!
//! Layout, as Argo's: a packed path is stored under its base name (`/tmp/out` → `out/...`), and
//! an archive holding exactly one top-level entry unpacks to the target path itself, so a file
//! or directory round-trips to the path the consumer asked for.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Cursor, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use protocol::api::ArchiveFormat;
use protocol::spec::Packing;
use sha2::{Digest as _, Sha256};

use super::CHUNK;
use crate::fsutil;

/// Size and SHA-256 of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub size: u64,
    pub sha256: String,
}

/// A writer that counts and hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    pub fn finish(self) -> (W, Digest) {
        (
            self.inner,
            Digest {
                size: self.size,
                sha256: hex(&self.hasher.finalize()),
            },
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that counts and hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// The digest of everything read so far.
    pub fn digest(&self) -> Digest {
        Digest {
            size: self.size,
            sha256: hex(&self.hasher.clone().finalize()),
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

// ---- packing -------------------------------------------------------------------------------

/// Packs the file or directory at `source` into `sink`; returns what was written. (`dyn`
/// throughout: one copy of this code whatever the sink, for the size budget.)
pub fn pack(source: &Path, packing: Packing, sink: &mut dyn Write) -> io::Result<Digest> {
    let mut out = HashingWriter::new(sink);
    pack_unhashed(source, packing, &mut out)?;
    Ok(out.finish().1)
}

/// [`pack`] without the digest, for a receiver that takes its own (the agent): a SHA-256 of
/// a gigabyte is half a second of a core.
pub fn pack_unhashed(source: &Path, packing: Packing, out: &mut dyn Write) -> io::Result<()> {
    match packing.format {
        ArchiveFormat::None => {
            let mut file = open_unarchived(source)?;
            // Large reads, passed on whole (io::copy reads 8 KiB at a time).
            let mut buf = vec![0; CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.write_all(&buf[..n])?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        ArchiveFormat::Zstd => pack_zstd(source, packing.level, out)?,
        ArchiveFormat::Tar => pack_gzip(source, packing.level as u32, out)?,
    }
    out.flush()
}

/// The file that `archive: {none: {}}` sends as it is. A symlink to a file is that file's
/// content, as in Argo.
pub fn open_unarchived(source: &Path) -> io::Result<File> {
    fsutil::open_regular(source).map_err(|e| {
        io::Error::other(format!(
            "archive none takes a single file; {}: {e} (use tar or zstd)",
            source.display()
        ))
    })
}

/// zstd's own worker threads compress while this thread reads the files and writes what they
/// packed: the overlap of `tar | zstd > file` (one thread doing everything ran at 0.6× of that
/// pipeline), and with two cores two workers compress side by side (BENCHMARKS.md).
fn pack_zstd(source: &Path, level: i32, out: &mut dyn Write) -> io::Result<()> {
    use zstd::stream::raw::CParameter;
    let mut enc = zstd::stream::write::Encoder::new(out, level)?;
    enc.multithread(zstd_workers())?;
    enc.set_parameter(CParameter::JobSize(ZSTD_JOB_SIZE))?;
    tar_tree(source, &mut enc)?;
    enc.finish()?;
    Ok(())
}

/// The input of one zstd job. Memory is about seven jobs (zstd's input ring and the compressed
/// jobs waiting to be written): 640 KiB keeps a 1 GiB pack under 8 MB of RSS with two workers,
/// where 1 MiB jobs took 10 MB and zstd's default for level 1 (2 MiB) more. Below ~550 KiB the
/// workers wait on each other: 512 KiB jobs packed 25 % slower.
const ZSTD_JOB_SIZE: u32 = 640 * 1024;

/// One worker per CPU the emissary may use (its cgroup's quota counts), at most four: each
/// costs ~1.5 MB, and four compress about as fast as the one thread reading the files feeds them.
fn zstd_workers() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u32)
}

/// tar → gzip → hash and write, each stage on its own thread with bounded chunks in between.
fn pack_gzip(source: &Path, level: u32, out: &mut dyn Write) -> io::Result<()> {
    let (mut tar_sink, tar_chunks) = hand_off();
    let (mut packed_sink, packed_chunks) = hand_off();
    std::thread::scope(|scope| {
        let producer =
            scope.spawn(move || tar_tree(source, &mut tar_sink).and_then(|()| tar_sink.flush()));
        let compressor = scope.spawn(move || -> io::Result<()> {
            let mut enc =
                flate2::write::GzEncoder::new(&mut packed_sink, flate2::Compression::new(level));
            tar_chunks.for_each(|chunk| enc.write_all(chunk))?;
            enc.finish()?.flush()
        });
        let consumed = packed_chunks.for_each(|chunk| out.write_all(chunk));
        let produced = producer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("archiver thread panicked")));
        let compressed = compressor
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("compressor thread panicked")));
        // A stage that fails stops the ones before it ("stopped"): the failure furthest
        // downstream is the cause.
        consumed.and(compressed).and(produced)
    })
}

/// Depth of each hand-off: at most 4 chunks in flight per stage.
const PIPE_DEPTH: usize = 4;

/// A bounded hand-off of chunks from one pipeline stage to the next. Emptied chunks travel back
/// to be filled again: a fresh 256 KiB buffer per chunk is an mmap, 64 page faults and a
/// munmap with musl's allocator (25 % of the packing throughput).
fn hand_off() -> (ChunkWriter, Chunks) {
    use std::sync::mpsc::sync_channel;
    let (full_tx, full_rx) = sync_channel(PIPE_DEPTH);
    let (empty_tx, empty_rx) = sync_channel(PIPE_DEPTH + 2);
    let writer = ChunkWriter {
        full: full_tx,
        empty: empty_rx,
        buf: Vec::with_capacity(CHUNK),
    };
    let chunks = Chunks {
        full: full_rx,
        empty: empty_tx,
    };
    (writer, chunks)
}

/// Collects small writes into [`CHUNK`]-sized chunks for the next stage.
struct ChunkWriter {
    full: std::sync::mpsc::SyncSender<Vec<u8>>,
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // Never past CHUNK: a buffer that grew would travel back to be filled again, larger.
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self
            .empty
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        self.full
            .send(std::mem::replace(&mut self.buf, next))
            .map_err(|_| io::Error::other("the next stage of packing stopped"))
    }
}

/// The receiving end of [`hand_off`].
struct Chunks {
    full: std::sync::mpsc::Receiver<Vec<u8>>,
    empty: std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl Chunks {
    /// Takes every chunk until the writer is gone, or until `take` fails: then the writer's
    /// next send fails too, and the stages before stop.
    fn for_each(self, mut take: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
        for mut chunk in self.full.iter() {
            take(&chunk)?;
            chunk.clear();
            let _ = self.empty.try_send(chunk);
        }
        Ok(())
    }
}

/// Writes `source` as a tar stream into `sink` under its base name.
fn tar_tree(source: &Path, sink: &mut dyn Write) -> io::Result<()> {
    let name = source
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("root"));
    let mut tar = tar::Builder::new(sink);
    tar.follow_symlinks(false);
    // Files as they are, holes as zeros (as GNU tar without --sparse): no SEEK_DATA/SEEK_HOLE
    // probing of every file, and an archive any reader takes.
    tar.sparse(false);
    let mut walk = Walk {
        path: source.to_owned(),
        name,
        buf: vec![0; CHUNK + 1],
        not_proc: fsutil::NotProc::default(),
    };
    let kind = Kind::of(fs::symlink_metadata(source)?.file_type());
    append(&mut tar, &mut walk, nix::fcntl::AT_FDCWD, source, kind)?;
    tar.finish()
}

/// Where a walk of the tree stands: the entry at hand's path on disk and in the archive
/// (pushed and popped, not built anew for every file), and what its files share.
struct Walk {
    path: PathBuf,
    name: PathBuf,
    buf: Vec<u8>,
    not_proc: fsutil::NotProc,
}

/// What an entry of a tree is, as its directory's listing says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    fn of(kind: fs::FileType) -> Kind {
        if kind.is_dir() {
            Kind::Dir
        } else if kind.is_file() {
            Kind::File
        } else if kind.is_symlink() {
            Kind::Symlink
        } else {
            Kind::Other
        }
    }

    /// From the listing's d_type; an lstat of `path` (the entry's) only where the file system
    /// gives none.
    fn listed(entry: &nix::dir::Entry, path: &Path) -> io::Result<Kind> {
        use nix::dir::Type;
        Ok(match entry.file_type() {
            Some(Type::Directory) => Kind::Dir,
            Some(Type::File) => Kind::File,
            Some(Type::Symlink) => Kind::Symlink,
            Some(_) => Kind::Other,
            None => Kind::of(fs::symlink_metadata(path)?.file_type()),
        })
    }
}

/// Appends the entry at `walk.path` (`leaf` in the directory `at`, which is open), of type
/// `kind`; directories in sorted order (stable archives). A directory's entries are opened
/// relative to it: no lookup of the whole path for every file, nor a path built for it.
fn append(
    tar: &mut tar::Builder<&mut dyn Write>,
    walk: &mut Walk,
    at: BorrowedFd<'_>,
    leaf: &Path,
    kind: Kind,
) -> io::Result<()> {
    let located =
        |path: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match kind {
        Kind::Dir => {
            tar.append_dir(&walk.name, &walk.path)?;
            // Not through a symlink that took the directory's place since it was listed.
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            let mut dir = nix::dir::Dir::openat(at, leaf, flags, nix::sys::stat::Mode::empty())
                .map_err(|e| located(&walk.path, e.into()))?;
            let mut children: Vec<nix::dir::Entry> = dir
                .iter()
                .filter(|e| !matches!(e, Ok(e) if matches!(e.file_name().to_bytes(), b"." | b"..")))
                .collect::<Result<_, _>>()
                .map_err(|e| located(&walk.path, e.into()))?;
            children.sort_by(|a, b| a.file_name().cmp(b.file_name()));
            for child in &children {
                let leaf = Path::new(OsStr::from_bytes(child.file_name().to_bytes()));
                walk.path.push(leaf);
                walk.name.push(leaf);
                let appended = Kind::listed(child, &walk.path)
                    .map_err(|e| located(&walk.path, e))
                    .and_then(|kind| append(tar, walk, dir.as_fd(), leaf, kind));
                walk.path.pop();
                walk.name.pop();
                appended?;
            }
            Ok(())
        }
        Kind::File => {
            // Opened as an output is (/proc refused), and described by what was opened.
            let (file, meta) = fsutil::open_regular_in(at, leaf, &mut walk.not_proc)
                .map_err(|e| located(&walk.path, e))?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let mut content = Content {
                file,
                buf: &mut walk.buf,
                left: meta.len(),
                shrank: false,
                grew: false,
            };
            // The header alone (with a long name's extra entry): tar would copy the content
            // 8 KiB at a time through a buffer of its own; it goes to the sink as read instead.
            tar.append_data(&mut header, &walk.name, io::empty())?;
            content.send(tar.get_mut())?;
            if content.shrank {
                crate::note!(
                    "emissary: {} shrank while it was archived; its end is zeros",
                    walk.path.display()
                );
            } else if content.grew {
                crate::note!(
                    "emissary: {} grew while it was archived; its first {} bytes are archived",
                    walk.path.display(),
                    meta.len()
                );
            }
            Ok(())
        }
        Kind::Symlink => tar.append_path_with_name(&walk.path, &walk.name),
        Kind::Other => {
            // Sockets, FIFOs and devices have no content to carry; reading a FIFO could block.
            crate::note!(
                "emissary: not archiving {} (not a file, directory or symlink)",
                walk.path.display()
            );
            Ok(())
        }
    }
}

/// A file's content as its tar header describes it: exactly the size it had when opened, as
/// GNU tar does. Bytes written since are left out and a file cut short is padded with zeros:
/// any other length would shift every entry after it. Read up to `buf.len() - 1` bytes at a
/// time; the last read asks for one byte more than is owed, which only a file that grew fills
/// (so no read is spent on finding the end).
struct Content<'a> {
    file: File,
    buf: &'a mut [u8],
    /// Bytes still owed to the archive.
    left: u64,
    shrank: bool,
    grew: bool,
}

impl Content<'_> {
    /// Writes the content to `sink` as it is read, then the zeros that end its last block.
    fn send(&mut self, sink: &mut dyn Write) -> io::Result<()> {
        let len = self.left;
        while self.left > 0 {
            let owed = usize::try_from(self.left).unwrap_or(usize::MAX);
            let chunk = self.buf.len() - 1;
            let want = if owed <= chunk { owed + 1 } else { chunk };
            let got = loop {
                match self.file.read(&mut self.buf[..want]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    read => break read?,
                }
            };
            self.grew |= got > owed;
            let n = if got == 0 {
                self.shrank = true;
                let n = chunk.min(owed);
                self.buf[..n].fill(0);
                n
            } else {
                got.min(owed)
            };
            // In pieces: handed 256 KiB at a time, zstd's multithreaded stream held more of
            // it at once (packing 1 GiB peaked at 7.5-8.6 MB of RSS; 7.1-7.6 MB in 64 KiB
            // pieces, as in tar's 8 KiB ones).
            for piece in self.buf[..n].chunks(64 * 1024) {
                sink.write_all(piece)?;
            }
            self.left -= n as u64;
        }
        let block = 512;
        let padding = (block - len % block) % block;
        sink.write_all(&[0; 512][..padding as usize])
    }
}

// ---- unpacking -----------------------------------------------------------------------------

/// Bounds on what one input may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 1_000_000,
        }
    }
}

/// How an input arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpack {
    /// Detect by magic bytes: tar, tar+gzip and tar+zstd are unpacked, anything else copied.
    Auto,
    /// `archive: {none: {}}`: copy the bytes as they are.
    Never,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// Enough to see a tar header (magic at 257) even behind a compressor's framing: a zstd block
/// decodes only once whole, and a block holds up to 128 KiB.
const SNIFF: usize = 256 * 1024;

/// Stages the bytes of `input` at `dest`: unpacked when they are a tar archive, else as one
/// file. Writes into a temporary sibling first and renames into place, so on any error nothing
/// is left at `dest` and nothing is ever written outside it. Returns the digest of the bytes
/// read (as stored, before unpacking); when they do not have the `expected` SHA-256 (hex),
/// nothing is placed.
pub fn stage(
    input: &mut dyn Read,
    dest: &Path,
    unpack: Unpack,
    limits: Limits,
    expected: Option<&str>,
) -> Result<Digest, String> {
    let mut input = HashingReader::new(input);
    let mut prefix = Vec::with_capacity(SNIFF);
    (&mut input)
        .take(SNIFF as u64)
        .read_to_end(&mut prefix)
        .map_err(|e| format!("reading: {e}"))?;
    let codec = if unpack == Unpack::Never {
        None
    } else {
        sniff(&prefix)
    };
    let created = create_parents(dest)?;
    let tmp = fsutil::temp_name(dest);
    let mut stream = Cursor::new(prefix).chain(&mut input);
    let result = match codec {
        None => write_file(&mut stream, &tmp, limits),
        Some(Codec::Tar) => unpack_tar(&mut stream, &tmp, limits),
        Some(Codec::Gzip) => unpack_tar(
            &mut flate2::read::MultiGzDecoder::new(&mut stream),
            &tmp,
            limits,
        ),
        Some(Codec::Zstd) => zstd::stream::read::Decoder::new(&mut stream)
            .map_err(|e| format!("zstd: {e}"))
            .and_then(|mut d| unpack_tar(&mut d, &tmp, limits)),
    }
    .and_then(|()| {
        // Drain what a decoder left unread (tar padding), so the digest covers every byte.
        io::copy(&mut stream, &mut io::sink()).map_err(|e| format!("reading: {e}"))?;
        let actual = stream.get_ref().1.digest().sha256;
        match expected {
            Some(expected) if !actual.eq_ignore_ascii_case(expected) => Err(format!(
                "its content has SHA-256 {actual}, not the {expected} its producer reported \
                 (changed since it was produced?); refused"
            )),
            _ => place(&tmp, dest, codec.is_some()),
        }
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
        let _ = fs::remove_file(&tmp);
        for dir in created.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
    result.map(|()| input.digest())
}

/// Creates the missing ancestors of `path`; returns them, outermost first, so a failed stage
/// can take them back.
fn create_parents(path: &Path) -> Result<Vec<PathBuf>, String> {
    let mut missing = Vec::new();
    let mut dir = path.parent();
    while let Some(d) =
        dir.filter(|d| !d.as_os_str().is_empty() && fs::symlink_metadata(d).is_err())
    {
        missing.push(d.to_owned());
        dir = d.parent();
    }
    missing.reverse();
    for d in &missing {
        fs::create_dir(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    Ok(missing)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Codec {
    Tar,
    Gzip,
    Zstd,
}

/// Which tar container `prefix` starts, if any.
fn sniff(prefix: &[u8]) -> Option<Codec> {
    let is_tar = |b: &[u8]| b.len() >= 262 && &b[257..262] == b"ustar";
    let decoded = |mut r: Box<dyn Read + '_>| {
        let mut head = Vec::new();
        let _ = r.by_ref().take(512).read_to_end(&mut head);
        head
    };
    if prefix.starts_with(GZIP_MAGIC) {
        is_tar(&decoded(Box::new(flate2::read::GzDecoder::new(prefix)))).then_some(Codec::Gzip)
    } else if prefix.starts_with(ZSTD_MAGIC) {
        let decoder = zstd::stream::read::Decoder::new(prefix).ok()?;
        is_tar(&decoded(Box::new(decoder))).then_some(Codec::Zstd)
    } else {
        is_tar(prefix).then_some(Codec::Tar)
    }
}

fn write_file(input: &mut dyn Read, tmp: &Path, limits: Limits) -> Result<(), String> {
    let mut file =
        fsutil::create_new(tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let n = io::copy(&mut input.take(limits.max_bytes + 1), &mut file)
        .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    if n > limits.max_bytes {
        return Err(format!(
            "larger than the limit of {} bytes",
            limits.max_bytes
        ));
    }
    Ok(())
}

/// Moves the staged `tmp` to `dest`, replacing what was there. An archive with a single
/// top-level entry becomes `dest` itself.
fn place(tmp: &Path, dest: &Path, unpacked: bool) -> Result<(), String> {
    let mut source = tmp.to_owned();
    if unpacked {
        let entries: Vec<_> = fs::read_dir(tmp)
            .map_err(|e| e.to_string())?
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if entries.len() == 1 {
            source = entries[0].path();
        }
        // Links are judged where they will live: under `dest`, one level up if the single
        // entry is lifted, and through the links they pass on the way.
        let kind = fs::symlink_metadata(&source).map_err(|e| e.to_string())?;
        if kind.is_symlink() {
            return Err(
                "the archive is a lone symlink, which would point outside the target".into(),
            );
        }
        if kind.is_dir() {
            check_links(&source, Path::new(""))?;
        }
    }
    match fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(dest),
        Ok(_) => fs::remove_file(dest),
        Err(_) => Ok(()),
    }
    .map_err(|e| format!("replacing {}: {e}", dest.display()))?;
    fs::rename(&source, dest).map_err(|e| format!("moving into {}: {e}", dest.display()))?;
    if source != tmp {
        let _ = fs::remove_dir(tmp);
    }
    Ok(())
}

/// Fails if a symlink under `root/dir` resolves outside `root`.
fn check_links(root: &Path, dir: &Path) -> Result<(), String> {
    for entry in fs::read_dir(root.join(dir)).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let relative = dir.join(entry.file_name());
        let kind = entry.file_type().map_err(|e| e.to_string())?;
        if kind.is_dir() {
            check_links(root, &relative)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(root.join(&relative)).map_err(|e| e.to_string())?;
            let at = dir.components().map(|c| c.as_os_str().to_owned()).collect();
            if resolve_within(root, at, &link, &mut 0).is_none() {
                return Err(format!(
                    "symlink {:?} -> {:?} points outside the target",
                    relative.display(),
                    link.display()
                ));
            }
        }
    }
    Ok(())
}

/// Where `target`, read from directory `at` (components under `root`), leads, following the
/// symlinks it passes; `None` if it leaves `root`, is absolute, or loops.
fn resolve_within(
    root: &Path,
    mut at: Vec<std::ffi::OsString>,
    target: &Path,
    hops: &mut u32,
) -> Option<Vec<std::ffi::OsString>> {
    for component in target.components() {
        match component {
            Component::Normal(part) => {
                at.push(part.to_owned());
                let here: PathBuf = at.iter().collect();
                if let Ok(next) = fs::read_link(root.join(here)) {
                    *hops += 1;
                    if *hops > 40 {
                        return None;
                    }
                    at.pop();
                    at = resolve_within(root, at, &next, hops)?;
                }
            }
            Component::CurDir => {}
            Component::ParentDir => {
                at.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(at)
}

/// Unpacks a tar stream into the new directory `root`, refusing anything that could write
/// outside it: absolute paths, `..`, paths through symlinks, symlinks or hard links pointing
/// out, device files; and more entries or bytes than `limits` allow.
fn unpack_tar(input: &mut dyn Read, root: &Path, limits: Limits) -> Result<(), String> {
    fs::create_dir(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let mut archive = tar::Archive::new(crate::transfer::tar_guard::MetadataGuard::new(input));
    let mut entries_seen = 0u64;
    let mut bytes = 0u64;
    for entry in archive
        .entries()
        .map_err(|e| format!("not a tar archive: {e}"))?
    {
        let mut entry = entry.map_err(|e| format!("corrupt tar archive: {e}"))?;
        entries_seen += 1;
        if entries_seen > limits.max_entries {
            return Err(format!("more than {} entries", limits.max_entries));
        }
        let raw_path = entry
            .path()
            .map_err(|e| format!("bad entry name: {e}"))?
            .into_owned();
        let shown = raw_path.display().to_string();
        let Some(relative) = contained(&raw_path) else {
            return Err(format!("entry {shown:?} points outside the target"));
        };
        if relative.as_os_str().is_empty() {
            continue; // "./"
        }
        let target = root.join(&relative);
        ensure_parents(root, &relative).map_err(|e| format!("entry {shown:?}: {e}"))?;
        let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    fs::create_dir(&target).map_err(|e| format!("entry {shown:?}: {e}"))?;
                }
                fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(|e| format!("entry {shown:?}: {e}"))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                bytes += entry.size();
                if bytes > limits.max_bytes {
                    return Err(format!(
                        "unpacks to more than the limit of {} bytes",
                        limits.max_bytes
                    ));
                }
                remove_existing(&target);
                let mut file =
                    File::create(&target).map_err(|e| format!("entry {shown:?}: {e}"))?;
                io::copy(&mut entry, &mut file).map_err(|e| format!("entry {shown:?}: {e}"))?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("entry {shown:?}: {e}"))?;
                // A time past what the clock can hold (base-256 mtimes reach 2^64) is skipped.
                if let Some(mtime) = entry.header().mtime().ok().and_then(|secs| {
                    std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(secs))
                }) {
                    let _ = file.set_modified(mtime);
                }
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .ok_or_else(|| format!("symlink {shown:?} has no target"))?;
                let parent = relative.parent().unwrap_or(Path::new(""));
                if link.is_absolute() || contained(&parent.join(&link)).is_none() {
                    return Err(format!(
                        "symlink {shown:?} -> {:?} points outside the target",
                        link.display()
                    ));
                }
                remove_existing(&target);
                symlink(&link, &target).map_err(|e| format!("entry {shown:?}: {e}"))?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .ok()
                    .flatten()
                    .ok_or_else(|| format!("hard link {shown:?} has no target"))?;
                let Some(linked) = contained(&link) else {
                    return Err(format!(
                        "hard link {shown:?} -> {:?} points outside the target",
                        link.display()
                    ));
                };
                let source = root.join(&linked);
                ensure_parents(root, &linked).map_err(|e| format!("hard link {shown:?}: {e}"))?;
                if !fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                    return Err(format!(
                        "hard link {shown:?} -> {:?}: no such file in the archive",
                        link.display()
                    ));
                }
                remove_existing(&target);
                fs::hard_link(&source, &target).map_err(|e| format!("entry {shown:?}: {e}"))?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(format!(
                    "entry {shown:?}: {other:?} entries (devices, FIFOs) are not allowed"
                ));
            }
        }
    }
    Ok(())
}

/// `path` made relative and free of `..` without leaving its root, or `None` if it is
/// absolute or climbs out.
fn contained(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Creates the parent directories of `root/relative`; fails if any existing one is a symlink
/// (a planted link would redirect the write outside `root`).
fn ensure_parents(root: &Path, relative: &Path) -> io::Result<()> {
    let mut dir = root.to_owned();
    let Some(parent) = relative.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        dir.push(part);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::other("path goes through a symlink"));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(io::Error::other("a parent is not a directory")),
            Err(_) => fs::create_dir(&dir)?,
        }
    }
    Ok(())
}

/// Removes a file or link at `path` (never following it), so a later entry of the same name
/// replaces it instead of writing through it.
fn remove_existing(path: &Path) {
    if fs::symlink_metadata(path).is_ok_and(|m| !m.is_dir()) {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contained_paths_never_climb_out() {
        assert_eq!(
            contained(Path::new("a/./b/../c")),
            Some(PathBuf::from("a/c"))
        );
        assert_eq!(contained(Path::new("./")), Some(PathBuf::new()));
        assert_eq!(contained(Path::new("../x")), None);
        assert_eq!(contained(Path::new("a/../../x")), None);
        assert_eq!(contained(Path::new("/etc/passwd")), None);
    }

    #[test]
    fn a_files_content_is_the_size_it_had_when_opened() {
        let path = std::env::temp_dir().join(format!("emissary-content-{}", std::process::id()));
        fs::write(&path, b"0123456789").unwrap();
        let read = |left| {
            let mut buf = vec![0; 4];
            let mut content = Content {
                file: File::open(&path).unwrap(),
                buf: &mut buf,
                left,
                shrank: false,
                grew: false,
            };
            let mut out = Vec::new();
            content.send(&mut out).unwrap();
            // Then zeros to the end of the tar block.
            assert_eq!(out.len(), 512);
            let padding = out.split_off(left as usize);
            assert!(padding.iter().all(|&b| b == 0));
            (out, content.shrank, content.grew)
        };
        // Grown since its header was written: the rest is left out, and seen.
        assert_eq!(read(6), (b"012345".to_vec(), false, true));
        assert_eq!(read(3), (b"012".to_vec(), false, true));
        assert_eq!(read(9), (b"012345678".to_vec(), false, true));
        assert_eq!(read(10), (b"0123456789".to_vec(), false, false));
        // Cut short: zeros to the size the header says.
        assert_eq!(read(13), (b"0123456789\0\0\0".to_vec(), true, false));
        assert_eq!(
            read(17),
            (b"0123456789\0\0\0\0\0\0\0".to_vec(), true, false)
        );
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_zstd_archive_of_many_jobs_holds_every_byte() {
        // 3 MiB over three files: several of zstd's jobs, run on its worker threads.
        let dir = std::env::temp_dir().join(format!("emissary-zstd-jobs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut state = 1u32;
        let mut next = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            b"abcdefgh \n"[(state >> 16) as usize % 10]
        };
        let files: Vec<Vec<u8>> = (0..3)
            .map(|_| (0..1 << 20).map(|_| next()).collect())
            .collect();
        for (i, content) in files.iter().enumerate() {
            fs::write(dir.join(format!("f{i}")), content).unwrap();
        }
        let packing = Packing {
            format: ArchiveFormat::Zstd,
            level: 1,
        };
        let mut packed = Vec::new();
        pack(&dir, packing, &mut packed).unwrap();
        let decoder = zstd::stream::read::Decoder::new(packed.as_slice()).unwrap();
        let mut archive = tar::Archive::new(decoder);
        let mut found = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.header().entry_type().is_file() {
                let mut content = Vec::new();
                entry.read_to_end(&mut content).unwrap();
                found.push(content);
            }
        }
        assert!(
            found == files,
            "the unpacked files differ from the packed ones"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sniffs_tar_behind_compressors() {
        let dir = std::env::temp_dir().join(format!("emissary-sniff-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("f"), b"hello").unwrap();
        for (format, codec) in [
            (ArchiveFormat::Tar, Codec::Gzip),
            (ArchiveFormat::Zstd, Codec::Zstd),
        ] {
            let mut bytes = Vec::new();
            let digest = pack(&dir.join("f"), Packing { format, level: 1 }, &mut bytes).unwrap();
            assert_eq!(sniff(&bytes), Some(codec));
            assert_eq!(digest.size, bytes.len() as u64);
            assert_eq!(digest.sha256, sha256(&bytes));
        }
        assert_eq!(sniff(b"\x1f\x8bnot really gzip"), None);
        assert_eq!(sniff(b"plain text"), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
