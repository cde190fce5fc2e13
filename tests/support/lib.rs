//! Support code shared by the agent's integration tests in `tests/` and its benchmarks in
//! `agent/benches/`: one crate, compiled once, that every test binary and benchmark links.
//!
//! Every resource a test creates (network namespaces, veths, cgroups, processes) is owned by a guard
//! that removes it on drop, so a failing or panicking test cleans up too.
#![expect(
    clippy::expect_used,
    reason = "test setup that cannot proceed panics, naming what failed"
)]
#![expect(
    clippy::new_without_default,
    reason = "a guard's `new` makes something on the machine (a namespace, a cgroup, a mount): \
              no `Default` should do that behind a `..Default::default()`"
)]

pub mod agent;
pub mod bench;
pub mod bpffs;
pub mod cgroup;
pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod ebpf_agent;
pub mod images;
pub mod in_process;
pub mod injected;
pub mod kube_api;
pub mod kubelet;
pub mod kubepods;
pub mod mesh;
pub mod mesh_rules;
pub mod pod;
pub mod privilege;
pub mod probe_apps;
pub mod registry;
pub mod review_api;
pub mod rewrite_cli;
pub mod sidecar;
pub mod validation;

pub use agent::agent_bin;
