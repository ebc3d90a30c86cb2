//! The emissary binary; everything lives in the library, this only wires.
//!
//! `no_main`: Rust's runtime would set SIGPIPE to ignored before our code runs, and the command
//! would inherit that. Starting from C's `main` keeps the caller's signal dispositions exactly
//! as they were, which is what a transparent wrapper must do.
#![no_main]

use std::ffi::{c_char, c_int};
use std::io::Write;

#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char, envp: *const *mut c_char) -> c_int {
    // SAFETY: `envp` is the environment C's start-up passed us, and no thread runs yet.
    unsafe { emissary::transfer::agent::take_token(envp) };
    emissary::stdio::ensure_open();
    let code = emissary::cli::main(std::env::args_os());
    // Without Rust's runtime nobody else flushes stdout at exit.
    let _ = std::io::stdout().flush();
    code
}
