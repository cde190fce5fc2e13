//! Builds the kernel programs (`ebpf/programs`) with aya-build and leaves the object in `OUT_DIR`,
//! where `src/datapath.rs` embeds it in the agent.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The package, and binary, that holds the kernel programs.
const EBPF_PACKAGE: &str = "probe-bypass-ebpf";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR is not set")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", manifest_dir.display()))?;
    let programs = workspace.join("ebpf").join("programs");
    let programs = programs
        .to_str()
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", programs.display()))?;

    // aya-build watches the programs' own directory; the shared types change the object too.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("ebpf").join("common").display()
    );

    // With AYA_BUILD_SKIP=1 aya-build builds nothing, yet `include_bytes!` needs a file. An empty
    // one makes the agent compile (for clippy and check without the eBPF toolchain) and lets the
    // loader say at run time that the object is missing. A real build copies over it.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let object = out_dir.join(EBPF_PACKAGE);
    fs::write(&object, []).with_context(|| format!("failed to create {}", object.display()))?;

    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: programs,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("failed to build the eBPF programs (is the toolchain there? run `cargo xtask setup`)")
}
