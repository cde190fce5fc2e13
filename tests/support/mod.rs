//! Support code shared by the privileged integration tests in `tests/`.
//!
//! Every resource a test creates (network namespaces, veths, cgroups, processes) is owned by a guard
//! that removes it on drop, so a failing or panicking test cleans up too.
#![allow(
    dead_code,
    reason = "each test binary uses its own part of the support code"
)]
#![allow(
    clippy::expect_used,
    reason = "test setup that cannot proceed panics, naming what failed"
)]

pub mod agent;
pub mod bpffs;
pub mod cgroup;
pub mod kube_api;
pub mod kubelet;
pub mod kubepods;
pub mod mesh;
pub mod pod;
pub mod privilege;
pub mod probe_apps;
pub mod rewrite_cli;
pub mod sidecar;
