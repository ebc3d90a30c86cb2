//! Files under the shared directory, which every container of the pod, at any uid, may write
//! too: what other processes read (summary, exitcode, outputs) is written whole or not at all,
//! under temporary names nobody can guess and plant a symlink at; a container's own directory
//! is checked to be its own.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Writes `bytes` to a temporary name beside `path`, then renames it into place, so a reader
/// sees either the old file or the complete new one (Argo #11490: a half-written exitcode file
/// broke a containerSet).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(path, bytes, None)
}

/// [`write_atomic`] with the file's mode set before it appears under its name.
pub fn write_atomic_mode(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    let tmp = temp_name(path);
    let result = create_new(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            match mode {
                Some(mode) => f.set_permissions(fs::Permissions::from_mode(mode)),
                None => Ok(()),
            }
        })
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Opens `path` (following symlinks) for reading only if it is a regular file, and not one of
/// /proc. The open itself does not block: a FIFO left where an output was expected would
/// otherwise hold the emissary in open(2) forever, waiting for a writer that is gone.
pub fn open_regular(path: &Path) -> io::Result<fs::File> {
    open_regular_in(nix::fcntl::AT_FDCWD, path, &mut NotProc::default()).map(|(file, _)| file)
}

/// The file system last found not to be /proc, by device: opening many files, one `fstatfs`
/// per file system rather than per file (a device number is one superblock, one type).
#[derive(Default)]
pub struct NotProc(Option<u64>);

/// [`open_regular`] of `path` in the directory `dir` (relative paths), with the metadata of
/// what was opened.
pub fn open_regular_in(
    dir: std::os::fd::BorrowedFd<'_>,
    path: &Path,
    checked: &mut NotProc,
) -> io::Result<(fs::File, fs::Metadata)> {
    use nix::fcntl::{OFlag, openat};
    // openat, not open: musl's open follows an O_CLOEXEC open with an fcntl(F_SETFD) for
    // kernels before 2.6.23, a syscall more for every file of an archived tree.
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let file = loop {
        match openat(dir, path, flags, nix::sys::stat::Mode::empty()) {
            Err(nix::errno::Errno::EINTR) => continue,
            opened => break fs::File::from(opened?),
        }
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if checked.0 != Some(meta.dev()) {
        refuse_procfs(&file)?;
        checked.0 = Some(meta.dev());
    }
    // O_NONBLOCK means nothing for a regular file's reads.
    Ok((file, meta))
}

/// Fails for a file on procfs, judged on the open file: a symlink to /proc/self/environ would
/// have the emissary (root may read its own even when non-dumpable) hand its environment,
/// the task token with it, to the command or the controller.
pub fn refuse_procfs(file: &fs::File) -> io::Result<()> {
    use nix::sys::statfs::{PROC_SUPER_MAGIC, fstatfs};
    if fstatfs(file)?.filesystem_type() == PROC_SUPER_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a file on /proc, which the emissary never reads for a task",
        ));
    }
    Ok(())
}

/// Creates `path` for writing; fails if anything is there, a symlink included (O_EXCL does
/// not follow it), so a planted link cannot redirect the write.
pub fn create_new(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// `dir/.name.tmp.RANDOM`: hidden, in the same directory so rename is atomic, and not to be
/// guessed (a PID is 1 in every container), so nobody can have planted anything there.
pub fn temp_name(path: &Path) -> PathBuf {
    use std::hash::{BuildHasher, RandomState};
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // SipHash under the process's random keys (getrandom), fresh ones each call.
    let random = RandomState::new().hash_one(path);
    path.with_file_name(format!(".{name}.tmp.{random:016x}"))
}

/// Makes `dir` (under the shared root) this process's own: created here, mode 0755, or, if it
/// exists, a directory of this uid (of any uid, for root). Never a symlink, never another
/// uid's: either would let another container plant files where this one writes.
pub fn own_dir(dir: &Path) -> Result<(), String> {
    let refuse = |why: &dyn std::fmt::Display| format!("{}: {why}", dir.display());
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    match fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(refuse(&e)),
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| refuse(&e))?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.file_type().is_symlink() {
        Err(refuse(&"a symbolic link, refused (writes would follow it)"))
    } else if !meta.is_dir() {
        Err(refuse(&"not a directory"))
    } else if uid != 0 && meta.uid() != uid {
        Err(refuse(&format!(
            "owned by uid {}, not by this container's uid {uid}: another container made it \
             and could plant files in it; refused",
            meta.uid()
        )))
    } else {
        Ok(())
    }
}

/// The last `N/M` progress the user process wrote to its progress file.
pub fn last_progress(file: &Path) -> Option<String> {
    // The last line is what counts, and a file appended to for hours may be large: read its tail.
    let mut file = open_regular(file).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(4096))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    protocol::api::valid_progress(line).then(|| line.to_owned())
}
