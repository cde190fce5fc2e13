//! `cargo xtask image`: the agent's container image, written as an OCI image-layout archive
//! (`oci-layout`, `index.json` and `blobs/sha256/…` in one tar). `skopeo copy` pushes it to a
//! registry and `kind load image-archive` loads it into a cluster's nodes, with no container daemon.
//!
//! The image has no base: one layer holds the agent, linked statically against musl so that it
//! needs no C library, and nothing else. Every timestamp is the epoch and every owner root, so the
//! same binary always gives the same digest.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use flate2::{Compression, write::GzEncoder};
use object::{
    Endianness,
    elf::PT_INTERP,
    read::elf::{ElfFile64, ProgramHeader as _},
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tar::EntryType;

use crate::{cargo, setup, target_dir};

/// The agent's package and binary, and the image's name.
const AGENT: &str = "probe-bypass";
/// xtask takes these from `[workspace.package]`, as the agent does.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const LICENSE: &str = env!("CARGO_PKG_LICENSE");
const SOURCE: &str = env!("CARGO_PKG_REPOSITORY");

/// The image's creation time: a fixed one, so that it does not change the digest.
const EPOCH: &str = "1970-01-01T00:00:00Z";

const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn run(output: Option<PathBuf>) -> Result<()> {
    setup::image_toolchain()?;
    let target_dir = target_dir()?;
    let binary = build(&target_dir)?;
    let image = Image::new(&binary)?;
    let archive = image.archive()?;
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
    println!("digest: {}", image.manifest.digest);
    println!(
        "size: {} bytes (layer {} bytes compressed; agent binary {} bytes)",
        archive.len(),
        image.layer.bytes.len(),
        binary.len()
    );
    Ok(())
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

/// Bytes that the image names by their digest.
struct Blob {
    bytes: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        let digest = sha256(&bytes);
        Self { bytes, digest }
    }

    /// How a manifest or index points at the blob.
    fn descriptor(&self, media_type: &str) -> Value {
        json!({
            "mediaType": media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// The blobs of the image and the index that names its manifest.
struct Image {
    layer: Blob,
    config: Blob,
    manifest: Blob,
    index: Vec<u8>,
}

impl Image {
    fn new(binary: &[u8]) -> Result<Self> {
        let mut layer = tar::Builder::new(Vec::new());
        append(&mut layer, AGENT, EntryType::Regular, 0o755, binary)?;
        let layer = layer.into_inner().context("failed to finish the layer")?;
        // The config names the layer by the digest of its uncompressed tar, the manifest by that
        // of the gzip.
        let diff_id = sha256(&layer);
        let layer = Blob::new(gzip(&layer)?);

        let config = Blob::new(serde_json::to_vec(&json!({
            "created": EPOCH,
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": [format!("/{AGENT}")],
                "Cmd": ["run"],
                "Labels": {
                    "org.opencontainers.image.title": AGENT,
                    "org.opencontainers.image.version": VERSION,
                    "org.opencontainers.image.source": SOURCE,
                    "org.opencontainers.image.licenses": LICENSE,
                },
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created": EPOCH, "created_by": "cargo xtask image" }],
        }))?);

        let manifest = Blob::new(serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(CONFIG_MEDIA_TYPE),
            "layers": [layer.descriptor(LAYER_MEDIA_TYPE)],
        }))?);

        let mut entry = manifest.descriptor(MANIFEST_MEDIA_TYPE);
        entry["platform"] = json!({ "architecture": "amd64", "os": "linux" });
        // skopeo selects an image in the archive by the OCI name (`oci-archive:FILE:TAG`);
        // containerd, under `kind load`, names it by its own annotation and ignores a bare tag.
        entry["annotations"] = json!({
            "org.opencontainers.image.ref.name": VERSION,
            "io.containerd.image.name": containerd_name(),
        });
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": [entry],
        }))?;

        Ok(Self {
            layer,
            config,
            manifest,
            index,
        })
    }

    /// The image layout, tarred.
    fn archive(&self) -> Result<Vec<u8>> {
        let Self {
            layer,
            config,
            manifest,
            index,
        } = self;
        let mut archive = tar::Builder::new(Vec::new());
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        append(
            &mut archive,
            "oci-layout",
            EntryType::Regular,
            0o644,
            layout,
        )?;
        append(&mut archive, "index.json", EntryType::Regular, 0o644, index)?;
        append(&mut archive, "blobs/", EntryType::Directory, 0o755, &[])?;
        append(
            &mut archive,
            "blobs/sha256/",
            EntryType::Directory,
            0o755,
            &[],
        )?;
        for blob in [config, manifest, layer] {
            let hex = blob.digest.trim_start_matches("sha256:");
            let path = format!("blobs/sha256/{hex}");
            append(&mut archive, &path, EntryType::Regular, 0o644, &blob.bytes)?;
        }
        archive.into_inner().context("failed to finish the archive")
    }
}

/// Adds an entry owned by root and dated at the epoch.
fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: EntryType,
    mode: u32,
    data: &[u8],
) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(data.len().try_into()?);
    tar.append_data(&mut header, path, data)
        .with_context(|| format!("failed to add {path} to a tar"))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    // flate2 writes no name and a zero time in the gzip header, so the output depends on the
    // input alone.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data).context("failed to compress")?;
    encoder.finish().context("failed to compress")
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("sha256:{hex}")
}
