//! `cargo xtask image`: the agent's container image, written as an OCI image-layout archive
//! written by `probe-bypass-oci`. `skopeo copy` pushes it to a registry and `kind load
//! image-archive` loads it into a cluster's nodes, with no container daemon.
//!
//! The image has no base: one layer holds the agent, linked statically against musl so that it
//! needs no C library, and nothing else. The same binary always gives the same digest.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use object::{
    Endianness,
    elf::PT_INTERP,
    read::elf::{ElfFile64, ProgramHeader as _},
};
use probe_bypass_oci::{Config, File, Image, Names};

use crate::{cargo, setup, target_dir};

/// The agent's package and binary, and the image's name.
const AGENT: &str = "probe-bypass";
/// xtask takes these from `[workspace.package]`, as the agent does.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const LICENSE: &str = env!("CARGO_PKG_LICENSE");
const SOURCE: &str = env!("CARGO_PKG_REPOSITORY");

pub fn run(output: Option<PathBuf>) -> Result<()> {
    setup::image_toolchain()?;
    let target_dir = target_dir()?;
    let binary = build(&target_dir)?;
    let image = image(&binary)?;
    let archive = image
        .archive()
        .context("failed to write the image archive")?;
    let output = output.unwrap_or_else(|| {
        target_dir
            .join("image")
            .join(format!("{AGENT}-{VERSION}.oci.tar"))
    });
    if let Some(parent) = output.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    fs::write(&output, &archive)
        .with_context(|| format!("failed to write {}", output.display()))?;

    println!("image: {}", output.display());
    println!("tag: {VERSION} (kind loads it as {})", containerd_name());
    println!("digest: {}", image.digest());
    println!(
        "size: {} bytes (layer {} bytes compressed; agent binary {} bytes)",
        archive.len(),
        image.layer_size(),
        binary.len()
    );
    Ok(())
}

/// Builds the static programs of the images the tests run under containerd (`tests/images`), for
/// `tests/support/images.rs` to write into images.
pub fn test_programs() -> Result<()> {
    setup::image_toolchain()?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "probe-bypass-test-images",
        "--target",
        setup::STATIC_TARGET,
    ])
}

/// The image of the agent's static binary: `/probe-bypass run`, labelled with the workspace's
/// version, licence and source.
fn image(binary: &[u8]) -> Result<Image> {
    let files = [File {
        path: AGENT,
        mode: 0o755,
        data: binary,
    }];
    let config = Config {
        entrypoint: vec![format!("/{AGENT}")],
        cmd: vec!["run".to_owned()],
        labels: [
            ("org.opencontainers.image.title", AGENT),
            ("org.opencontainers.image.version", VERSION),
            ("org.opencontainers.image.source", SOURCE),
            ("org.opencontainers.image.licenses", LICENSE),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .to_vec(),
        created_by: "cargo xtask image".to_owned(),
    };
    let names = Names {
        tag: VERSION.to_owned(),
        containerd: containerd_name(),
    };
    Image::new(&files, &config, &names).context("failed to make the image")
}

/// The name containerd stores the image under when kind loads it. It is what Kubernetes makes of
/// `image: probe-bypass:<version>`, so a pod spec naming that finds the loaded image.
fn containerd_name() -> String {
    format!("docker.io/library/{AGENT}:{VERSION}")
}

/// Builds the agent for the static target in release and returns the binary, once it is known
/// to need no program interpreter.
fn build(target_dir: &Path) -> Result<Vec<u8>> {
    let target_dir_arg = target_dir
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", target_dir.display()))?;
    // The agent's build script builds the kernel programs for the BPF target whatever this
    // target is: aya-build looks only at the target's endianness and architecture.
    cargo(&[
        "build",
        "--release",
        "--package",
        AGENT,
        "--bin",
        AGENT,
        "--target",
        setup::STATIC_TARGET,
        "--target-dir",
        target_dir_arg,
    ])?;
    let path = target_dir
        .join(setup::STATIC_TARGET)
        .join("release")
        .join(AGENT);
    let binary = fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
    let elf = ElfFile64::<Endianness>::parse(binary.as_slice())
        .with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
    let endian = elf.endian();
    if elf
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == PT_INTERP)
    {
        bail!(
            "{} asks for a dynamic loader, which an image with no base lacks: it must be static",
            path.display()
        );
    }
    Ok(binary)
}
