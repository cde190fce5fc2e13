//! `cargo xtask build-ebpf`: builds the kernel programs on their own, as the agent's build script
//! does through aya-build, and lists the programs and maps in the object.
//!
//! `--no-log` builds them without their decision log (the `log` feature off, every log call
//! compiled out), the object a benchmark loads with the agent's hidden `--ebpf-object` to compare
//! against the embedded one with its log off: [`build_without_log`].

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

pub fn run(no_log: bool, out: Option<PathBuf>) -> Result<()> {
    if no_log {
        return describe(&build_without_log(out)?);
    }
    setup::ebpf_toolchain()?;
    let built = build(true)?;
    let object = match out {
        Some(out) => copy(&built, out)?,
        None => built,
    };
    describe(&object)
}

/// Where [`build_without_log`] writes the object unless told otherwise.
pub fn no_log_object() -> Result<PathBuf> {
    Ok(crate::target_dir()?.join("ebpf-no-log").join(PACKAGE))
}

/// Builds the kernel programs without the `log` feature (no aya-log, no log call, no ring buffer)
/// and copies the object to `out`, by default [`no_log_object`]; returns where it is. For
/// `probe-bypass run --ebpf-object <it>`.
pub fn build_without_log(out: Option<PathBuf>) -> Result<PathBuf> {
    setup::ebpf_toolchain()?;
    let built = build(false)?;
    let out = match out {
        Some(out) => out,
        None => no_log_object()?,
    };
    copy(&built, out)
}

/// Copies the object cargo left to `out` (the next build overwrites cargo's).
fn copy(built: &Path, out: PathBuf) -> Result<PathBuf> {
    if let Some(dir) = out.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    fs::copy(built, &out)
        .with_context(|| format!("failed to copy {} to {}", built.display(), out.display()))?;
    Ok(out)
}

/// Builds the object with the command aya-build 0.2.0 runs (with the package's default features,
/// the decision log among them, when `log`) and returns where cargo put it.
fn build(log: bool) -> Result<PathBuf> {
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
        .args(if log { &[][..] } else { &["--no-default-features"][..] })
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
