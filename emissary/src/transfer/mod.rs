//! Bytes in and out: archives packed and unpacked in one streaming pass ([`archive`], with
//! [`tar_guard`] bounding what the tar reader buffers), the store they go to ([`store`]: a
//! local directory, or the node agent), and the node agent's API ([`agent`], over the small
//! blocking HTTP/1.1 client of [`http`], which finds it with the one-query resolver of
//! [`dns`]). It knows nothing of templates; of processes, only that a stop ([`cancel`]) cuts a
//! transfer short.

pub mod agent;
pub mod archive;
pub mod cancel;
pub mod dns;
pub mod http;
pub mod store;
pub mod tar_guard;

/// The unit bulk bytes move in (archive stages, upload chunks, plain reads): one syscall per
/// 256 KiB costs next to nothing, and a chunk still fits in L2.
pub const CHUNK: usize = 256 * 1024;
