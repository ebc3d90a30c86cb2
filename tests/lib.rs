//! Test support shared by the black-box scenarios (`main.rs`) and the benchmarks (`bench/`):
//! real servers a test or a benchmark starts on 127.0.0.1 and stops when dropped.

pub mod cluster;
#[path = "support/controller.rs"]
pub mod controller;
#[path = "support/s3.rs"]
pub mod s3;
#[path = "support/tmpfs.rs"]
pub mod tmpfs;
