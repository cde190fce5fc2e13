//! `cargo xtask test`: every test of the workspace, privileged ones included, after setting the
//! machine up. This is what CI runs (`.ci/run`).

use anyhow::Result;

use crate::{cargo, setup};

pub fn run() -> Result<()> {
    setup::ensure()?;
    if !nix::unistd::geteuid().is_root() {
        println!(
            "note: not running as root: the privileged tests (network namespaces, eBPF) will be \
             skipped, and fail if CI is set"
        );
    }
    // Lints first: they fail fast and cost little once the build is cached.
    cargo(&["fmt", "--all", "--check"])?;
    crate::layers::run()?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
    test_node_parts()?;
    // The eBPF crate builds only for the BPF target (through the agent's build script), so the
    // workspace's default members are tested rather than --workspace.
    cargo(&["test", "--no-fail-fast"])
}

/// What the tests' containerd and cluster run, which a test binary cannot build for itself: the
/// test images' static programs and the agent's image as `cargo xtask image` writes it
/// (tests/support/images.rs), and the cluster's supervisor (tests/support/bin/cluster.rs), a
/// binary of another package.
pub fn test_node_parts() -> Result<()> {
    crate::image::test_programs()?;
    crate::image::run(None)?;
    cargo(&[
        "build",
        "--package",
        "probe-bypass-testing",
        "--bin",
        "probe-bypass-cluster",
    ])
}
