//! `cargo xtask setup`: installs what a fresh Debian 12 machine lacks to build and test the project,
//! each piece only when it is missing, and says for each what it did.
//!
//! Other commands call [`ensure`] (or [`ebpf_toolchain`]) first, so that a newcomer's first command
//! works on a machine with nothing installed by hand.

use std::{fs, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{run, upstream};

/// The LLVM major version of the nightly toolchain, which bpf-linker must be built against:
/// it reads the bitcode rustc writes, and an older LLVM cannot read a newer one's.
const LLVM_MAJOR: &str = "22";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The linker of the eBPF build. Newer releases need a newer rustc than this project builds with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Its LLVM feature; the default one (llvm-23) does not match the nightly's LLVM.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";

/// The toolchain aya-build compiles the kernel programs with (`Toolchain::default()`).
pub const NIGHTLY: &str = "nightly";

/// The target of the agent's container image: musl links statically, so the image needs no base
/// image with a C library (`cargo xtask image`).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// The Debian package of that LLVM, and why the project needs it.
const LLVM_PACKAGE: (&str, &str) = ("llvm-22-dev", "the LLVM bpf-linker is built against");

/// The C compiler for [`STATIC_TARGET`], and why the image build needs it.
const MUSL_PACKAGE: (&str, &str) = (
    "musl-tools",
    "compiles the C code of dependencies (ring) for the static target",
);

/// The other Debian packages the project uses, and why. Not `golang`: Debian 12's is Go 1.19, too
/// old to build upstream Kubernetes and etcd (see [`upstream`]), which use the Go in /usr/local/go.
const TOOL_PACKAGES: [(&str, &str); 13] = [
    (
        "bpftool",
        "inspects loaded eBPF programs; the datapath tests use it",
    ),
    ("iptables", "the mesh's own rules, for parity tests"),
    ("haproxy", "the sidecar proxy stand-in"),
    ("wrk", "the load generator of `cargo xtask bench mesh`"),
    ("iproute2", "network namespaces and veths for test pods"),
    ("curl", "kubelet-like probes in the demo"),
    (
        "openssl",
        "certificates for the parity test's sidecars and the webhook's tests",
    ),
    (
        "skopeo",
        "copies and inspects container images without a daemon",
    ),
    (
        "containerd",
        "the container runtime of the tests' own node (issue 17), with its CRI plugin",
    ),
    (
        "runc",
        "the OCI runtime containerd starts the tests' containers with",
    ),
    (
        "containernetworking-plugins",
        "the CNI bridge and host-local plugins of the tests' containerd",
    ),
    (
        "protobuf-compiler",
        "protoc, which the CRI API client of the tests' node is generated with",
    ),
    (
        "docker-registry",
        "the container registry the tests push the agent's image to and pull it from",
    ),
];

/// Packages whose install starts a service the tests never use (they run their own, on
/// loopback): Debian's registry would listen on every address, port 5000, without auth. Setup
/// stops and disables it where systemd runs, right after installing it.
const UNWANTED_SERVICES: [&str; 1] = ["docker-registry"];

/// Everything the project needs: apt packages, the nightly toolchain with rust-src, bpf-linker,
/// the static target, and upstream Kubernetes and etcd built from source. Those come last: their
/// first build takes longest, and a failure in it leaves everything else in place.
pub fn ensure() -> Result<()> {
    let packages: Vec<_> = [LLVM_PACKAGE, MUSL_PACKAGE]
        .into_iter()
        .chain(TOOL_PACKAGES)
        .collect();
    apt_packages(&packages)?;
    nightly_with_rust_src()?;
    bpf_linker()?;
    static_target()?;
    upstream::ensure()
}

/// Only what building the kernel programs needs.
pub fn ebpf_toolchain() -> Result<()> {
    apt_packages(&[LLVM_PACKAGE])?;
    nightly_with_rust_src()?;
    bpf_linker()
}

/// What building the agent's container image needs: the kernel programs' toolchain, which the
/// agent's build script uses, and the static target with its C compiler.
pub fn image_toolchain() -> Result<()> {
    apt_packages(&[LLVM_PACKAGE, MUSL_PACKAGE])?;
    nightly_with_rust_src()?;
    bpf_linker()?;
    static_target()
}

fn apt_packages(packages: &[(&str, &str)]) -> Result<()> {
    let mut missing = Vec::new();
    for &(package, why) in packages {
        if is_installed(package)? {
            println!("setup: {package} ({why}): already present");
        } else {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root()? {
        bail!(
            "missing Debian packages: {list}. Run `cargo xtask setup` as root, or `apt-get install {list}`"
        );
    }
    println!("setup: installing {list}");
    run(apt_get().arg("update"))?;
    run(apt_get()
        .args(["install", "--yes", "--no-install-recommends"])
        .args(&missing))?;
    for package in missing {
        println!("setup: {package}: installed");
        if UNWANTED_SERVICES.contains(&package) {
            stop_service(package)?;
        }
    }
    Ok(())
}

/// Stops and disables the service `unit` that a package's install started: with systemctl where
/// systemd runs, else through its init script (which a container's `policy-rc.d` may have kept
/// from starting at all: then there is nothing to stop, and its refusal is no error).
fn stop_service(unit: &str) -> Result<()> {
    if std::path::Path::new("/run/systemd/system").exists() {
        run(Command::new("systemctl").args(["disable", "--now", unit]))?;
    } else {
        let _ = Command::new("invoke-rc.d").args([unit, "stop"]).status();
        let _ = Command::new("update-rc.d").args([unit, "disable"]).status();
    }
    println!("setup: {unit}: the service its package would run is stopped and disabled");
    Ok(())
}

fn apt_get() -> Command {
    let mut command = Command::new("apt-get");
    // No prompts: setup must run unattended, in CI too.
    command.env("DEBIAN_FRONTEND", "noninteractive");
    command
}

fn is_installed(package: &str) -> Result<bool> {
    let output = Command::new("dpkg-query")
        .args(["--show", "--showformat=${Status}", package])
        .output()
        .context(
            "failed to run dpkg-query: setup installs with apt and needs a Debian-based system",
        )?;
    // dpkg-query fails for a package it has never heard of; that is "missing" too, as is any
    // state but this one (removed with its config left, half-installed, ...).
    Ok(output.status.success() && output.stdout == b"install ok installed")
}

fn is_root() -> Result<bool> {
    // /proc/self/status has "Uid: real effective saved filesystem"; the effective one decides.
    let status =
        fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1));
    Ok(effective == Some("0"))
}

fn nightly_with_rust_src() -> Result<()> {
    let version = Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--verbose", "--version"])
        .output()
        .context(
            "failed to run rustup, which the eBPF build needs: install it from https://rustup.rs",
        )?;
    if !version.status.success() {
        println!("setup: installing the {NIGHTLY} toolchain with rust-src");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        println!("setup: {NIGHTLY} with rust-src: installed");
    } else {
        let installed = command_stdout(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            NIGHTLY,
        ]))?;
        if installed
            .lines()
            .any(|component| component.trim() == "rust-src")
        {
            println!("setup: {NIGHTLY} with rust-src: already present");
        } else {
            println!("setup: adding rust-src to {NIGHTLY}");
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                NIGHTLY,
            ]))?;
            println!("setup: rust-src: installed");
        }
    }
    check_nightly_llvm()
}

/// The standard library for [`STATIC_TARGET`], added to the toolchain that runs xtask (rustup's
/// cargo passes it on in `RUSTUP_TOOLCHAIN`), which is the one that builds the agent.
fn static_target() -> Result<()> {
    let installed = command_stdout(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed
        .lines()
        .any(|target| target.trim() == STATIC_TARGET)
    {
        println!("setup: {STATIC_TARGET} target: already present");
        return Ok(());
    }
    println!("setup: adding the {STATIC_TARGET} target");
    run(Command::new("rustup").args(["target", "add", STATIC_TARGET]))?;
    println!("setup: {STATIC_TARGET} target: installed");
    Ok(())
}

/// Fails clearly when the nightly has moved to an LLVM that bpf-linker was not built for; the
/// eBPF build would otherwise fail with an obscure bitcode error.
fn check_nightly_llvm() -> Result<()> {
    let version = command_stdout(Command::new("rustup").args([
        "run",
        NIGHTLY,
        "rustc",
        "--verbose",
        "--version",
    ]))?;
    let llvm = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "the {NIGHTLY} toolchain uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR}; \
             install a nightly whose LLVM is {LLVM_MAJOR} (`rustc +{NIGHTLY} -vV` shows it)"
        );
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    let present = installed_bpf_linker();
    if present.as_deref() == Some(wanted.as_str()) {
        println!("setup: {wanted}: already present");
        return Ok(());
    }
    match present {
        Some(other) => println!(
            "setup: found {other}; building {wanted} against LLVM {LLVM_MAJOR} (a few minutes)"
        ),
        None => println!("setup: building {wanted} against LLVM {LLVM_MAJOR} (a few minutes)"),
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        // Without it the link fails with "unable to find library -lLLVM".
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args([
            "install",
            "bpf-linker",
            // The versions it was released with, not the newest on the day: those may need a
            // newer rustc than this machine's.
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            BPF_LINKER_LLVM_FEATURE,
        ]))?;
    match installed_bpf_linker() {
        Some(version) if version == wanted => {
            println!("setup: {wanted}: installed");
            Ok(())
        }
        Some(other) => bail!(
            "installed {wanted}, but `bpf-linker` on PATH is {other}: put ~/.cargo/bin first on PATH"
        ),
        None => {
            bail!("installed {wanted}, but `bpf-linker` is not on PATH: add ~/.cargo/bin to PATH")
        }
    }
}

/// The first line of `bpf-linker --version`, if it runs.
fn installed_bpf_linker() -> Option<String> {
    let output = Command::new("bpf-linker").arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().next().map(|line| line.trim().to_owned())
}

fn command_stdout(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("{command:?} printed invalid UTF-8"))
}
