//! The emissary binary; everything lives in the library, this only wires.
//!
//! `no_main`: Rust's runtime would set SIGPIPE to ignored before our code runs, and the command
//! would inherit that. Starting from C's `main` keeps the caller's signal dispositions exactly
//! as they were, which is what a transparent wrapper must do.
#![no_main]

use std::ffi::{CStr, OsString, c_char, c_int};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;

#[unsafe(no_mangle)]
extern "C" fn main(argc: c_int, argv: *const *const c_char, envp: *const *mut c_char) -> c_int {
    // SAFETY: `envp` is the environment C's start-up passed us, and no thread runs yet.
    unsafe { emissary::transfer::agent::take_token(envp) };
    emissary::stdio::ensure_open();
    // From `argv` itself: `std::env::args_os()` is empty under `no_main` with musl, whose
    // start-up does not hand the arguments to Rust's initialiser as glibc's does.
    let args = (0..usize::try_from(argc).unwrap_or(0)).map(|i| {
        // SAFETY: C's start-up passes `argc` valid NUL-terminated strings in `argv`.
        let arg = unsafe { CStr::from_ptr(*argv.add(i)) };
        OsString::from(std::ffi::OsStr::from_bytes(arg.to_bytes()))
    });
    let code = emissary::cli::main(args);
    // Without Rust's runtime nobody else flushes stdout at exit.
    let _ = std::io::stdout().flush();
    code
}
