//! The emissary's own stdin/stdout/stderr.

/// Makes sure fds 0, 1 and 2 are open (on /dev/null if the caller closed them), so that no
/// file we open later lands on them and receives the command's output by accident.
pub fn ensure_open() {
    for fd in 0..3 {
        // SAFETY: fcntl(F_GETFD) and open(2) have no memory-safety preconditions.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) == -1 {
                let flags = if fd == 0 {
                    libc::O_RDONLY
                } else {
                    libc::O_WRONLY
                };
                libc::open(c"/dev/null".as_ptr(), flags);
            }
        }
    }
}

/// `eprintln!` that cannot panic: our stderr may be a pipe whose reader is gone (a log
/// collector that died, `2>&1 | head`), and a message must never abort the supervisor before
/// it has reaped, reported and written its files.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
