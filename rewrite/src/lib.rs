//! probe-bypass-rewrite: everything kernel-free that the probe rewriter and the admission webhook
//! need, and the contract between the rewriter and the agent ([`contract`]).
//!
//! It depends on no kernel or runtime crate (no aya, nix, tokio), so that it builds, tests and
//! fuzzes without the eBPF toolchain and without the agent.

pub mod contract;
