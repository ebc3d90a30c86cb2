//! Test support shared by the black-box scenarios (`main.rs`), the benchmarks (`bench/`) and
//! the soak (`soak/`): the agent, and real servers a test or a benchmark starts on 127.0.0.1
//! and stops when dropped.

#[path = "support/agent.rs"]
pub mod agent;
pub mod cluster;
#[path = "support/controller.rs"]
pub mod controller;
#[path = "support/process.rs"]
pub mod process;
#[path = "support/s3.rs"]
pub mod s3;
#[path = "support/tmpfs.rs"]
pub mod tmpfs;
