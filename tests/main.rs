//! Black-box scenarios: every test spawns the real binaries.
//!
//! `make test` runs them against the static release emissary (`EMISSARY_BIN`); a plain
//! `cargo test` uses the debug builds in `target/debug`.

mod util;

use emissary_tests::{controller, s3};

mod agent_api;
mod agent_e2e;
mod agent_outbox;
mod agent_s3;
mod agent_security;
mod agent_util;
mod cgroup;
mod corpus;
mod deploy;
mod disk_full;
mod inject;
mod k8s;
mod k8s_argo;
mod k8s_argo_bench;
mod k8s_argo_contract;
mod k8s_deploy;
mod k8s_kubelet;
mod k8s_pods;
mod openapi;
mod run_capture;
mod run_cli;
mod run_exit;
mod run_reaping;
mod run_signals;
mod run_timeouts;
mod schemathesis;
mod tarball;
mod task_artifacts;
mod task_pod;
mod task_security;
mod task_spec;
mod task_stop;
