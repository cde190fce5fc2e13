//! `cargo xtask build-ebpf`: builds the kernel programs on their own, as the agent's build script
//! does through aya-build, and lists the programs and maps in the object.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};
use aya_obj::{Object, generated::bpf_map_type};

use crate::{run as run_command, setup, workspace_root};

/// The package, and binary, that holds the kernel programs.
const PACKAGE: &str = "probe-bypass-ebpf";
const TARGET: &str = "bpfel-unknown-none";

pub fn run() -> Result<()> {
    setup::ebpf_toolchain()?;
    let object = build()?;
    describe(&object)
}

/// Builds the object with the command aya-build 0.2.0 runs and returns where it is.
fn build() -> Result<PathBuf> {
    let root = workspace_root();
    // Where cargo puts everything else: CARGO_TARGET_DIR (relative to where we were started), else target/.
    let target_dir = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => env::current_dir()
            .context("failed to read the current directory")?
            .join(dir),
        None => root.join("target"),
    };
    let mut command = Command::new("rustup");
    command
        .args([
            "run",
            setup::NIGHTLY,
            "cargo",
            "build",
            "--package",
            PACKAGE,
        ])
        .args([
            "--bins",
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags())
        // As aya-build does: a RUSTC inherited from the stable cargo that runs xtask would
        // replace the nightly compiler.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    run_command(&mut command)?;
    Ok(target_dir.join(TARGET).join("release").join(PACKAGE))
}

/// The flags aya-build passes: the architecture whose kernel structures aya-ebpf's bindings
/// describe (this machine's; `std` already spells all riscv64 variants "riscv64", as aya-build
/// wants), full debug info, and BTF generation by bpf-linker.
fn rustflags() -> String {
    let arch = env::consts::ARCH;
    [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    // CARGO_ENCODED_RUSTFLAGS separates flags with 0x1f, so a flag may hold spaces or quotes.
    .join("\x1f")
}

/// Prints the object's path and size, then its programs and maps as the loader will see them.
fn describe(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    let object =
        Object::parse(&bytes).with_context(|| format!("failed to parse {}", path.display()))?;

    println!("{}", path.display());
    println!("  size: {} bytes", bytes.len());
    println!("  license: {}", object.license.to_string_lossy());

    println!("  programs:");
    let mut programs: Vec<_> = object.programs.iter().collect();
    programs.sort_by_key(|&(name, _)| name);
    for (name, program) in programs {
        let instructions = object
            .functions
            .get(&program.function_key())
            .map_or(0, |function| function.instructions.len());
        println!(
            "    {name:<16} {:?}, {instructions} instructions",
            program.section
        );
    }

    println!("  maps:");
    let mut maps: Vec<_> = object.maps.iter().collect();
    maps.sort_by_key(|&(name, _)| name);
    for (name, map) in maps {
        println!(
            "    {name:<16} {:<14} key {:>2} B, value {:>2} B, max entries {}",
            map_type_name(map.map_type()),
            map.key_size(),
            map.value_size(),
            map.max_entries()
        );
    }
    Ok(())
}

/// A map type as bpftool names it (`percpu_array`), or its number when aya-obj does not know it.
fn map_type_name(map_type: u32) -> String {
    match bpf_map_type::try_from(map_type) {
        Ok(known) => format!("{known:?}")
            .trim_start_matches("BPF_MAP_TYPE_")
            .to_lowercase(),
        Err(_) => format!("type {map_type}"),
    }
}
