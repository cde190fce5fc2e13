//! OCI image-layout archives: `oci-layout`, `index.json` and `blobs/sha256/…` in one tar, the form
//! that `skopeo copy oci-archive:`, `kind load image-archive` and `ctr images import` read.
//!
//! An image here has no base and one layer, made of files given in memory (static binaries, for
//! the agent and the tests' images). Every timestamp is the epoch and every owner root, so the same
//! files always give the same digest.

use std::{
    collections::BTreeSet,
    io::{self, Write as _},
};

use flate2::{Compression, write::GzEncoder};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tar::EntryType;

/// The image's creation time: a fixed one, so that it does not change the digest.
const EPOCH: &str = "1970-01-01T00:00:00Z";

const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A file of the image's one layer.
#[derive(Debug, Clone, Copy)]
pub struct File<'a> {
    /// Its path in the image, without a leading `/` (`pause`, `usr/lib/libc.so.6`).
    pub path: &'a str,
    /// Its permission bits (`0o755` for a program).
    pub mode: u32,
    pub data: &'a [u8],
}

/// What the image's config says about running it and about itself.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `org.opencontainers.image.*` labels and the like, in order.
    pub labels: Vec<(String, String)>,
    /// The history entry's `created_by`: what made the image.
    pub created_by: String,
}

/// The names the archive gives the image.
#[derive(Debug, Clone)]
pub struct Names {
    /// The OCI tag (`org.opencontainers.image.ref.name`), which skopeo selects an image by
    /// (`oci-archive:FILE:TAG`).
    pub tag: String,
    /// The full name containerd stores the image under (`io.containerd.image.name`), as
    /// Kubernetes spells a pod's `image:` (`docker.io/library/probe-bypass:0.1.0`). `kind load`
    /// and `ctr images import` ignore a bare tag.
    pub containerd: String,
}

/// Bytes that the image names by their digest.
#[derive(Debug)]
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

/// The blobs of an image and the index that names its manifest.
#[derive(Debug)]
pub struct Image {
    layer: Blob,
    config: Blob,
    manifest: Blob,
    index: Vec<u8>,
}

impl Image {
    /// An amd64 Linux image of `files` (their parent directories are added), run as `config` says.
    pub fn new(files: &[File<'_>], config: &Config, names: &Names) -> io::Result<Self> {
        let layer = layer(files)?;
        // The config names the layer by the digest of its uncompressed tar, the manifest by that
        // of the gzip.
        let diff_id = sha256(&layer);
        let layer = Blob::new(gzip(&layer)?);

        let labels: serde_json::Map<String, Value> = config
            .labels
            .iter()
            .map(|(key, value)| (key.clone(), Value::from(value.as_str())))
            .collect();
        let config = Blob::new(serde_json::to_vec(&json!({
            "created": EPOCH,
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": config.entrypoint,
                "Cmd": config.cmd,
                "Labels": labels,
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created": EPOCH, "created_by": config.created_by }],
        }))?);

        let manifest = Blob::new(serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": config.descriptor(CONFIG_MEDIA_TYPE),
            "layers": [layer.descriptor(LAYER_MEDIA_TYPE)],
        }))?);

        let mut entry = manifest.descriptor(MANIFEST_MEDIA_TYPE);
        entry["platform"] = json!({ "architecture": "amd64", "os": "linux" });
        entry["annotations"] = json!({
            "org.opencontainers.image.ref.name": names.tag,
            "io.containerd.image.name": names.containerd,
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

    /// The manifest's digest (`sha256:…`): the image's identity.
    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }

    /// The compressed layer's size in bytes.
    pub fn layer_size(&self) -> usize {
        self.layer.bytes.len()
    }

    /// The image layout, tarred.
    pub fn archive(&self) -> io::Result<Vec<u8>> {
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
        archive.into_inner()
    }
}

/// The layer's tar: each file's parent directories once, then the files in the order given.
fn layer(files: &[File<'_>]) -> io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut directories = BTreeSet::new();
    for file in files {
        if file.path.starts_with('/') || file.path.split('/').any(|part| part == "..") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: a layer's path is relative and stays inside it",
                    file.path
                ),
            ));
        }
        let mut parent = String::new();
        for part in file
            .path
            .split('/')
            .rev()
            .skip(1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            parent.push_str(part);
            parent.push('/');
            if directories.insert(parent.clone()) {
                append(&mut tar, &parent, EntryType::Directory, 0o755, &[])?;
            }
        }
        append(
            &mut tar,
            file.path,
            EntryType::Regular,
            file.mode,
            file.data,
        )?;
    }
    tar.into_inner()
}

/// Adds an entry owned by root and dated at the epoch.
fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: EntryType,
    mode: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(data.len() as u64);
    tar.append_data(&mut header, path, data)
        .map_err(|error| io::Error::new(error.kind(), format!("{path}: {error}")))
}

fn gzip(data: &[u8]) -> io::Result<Vec<u8>> {
    // flate2 writes no name and a zero time in the gzip header, so the output depends on the
    // input alone.
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(data)?;
    encoder.finish()
}

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn names() -> Names {
        Names {
            tag: "1".to_owned(),
            containerd: "probe-bypass.test/pause:1".to_owned(),
        }
    }

    fn config() -> Config {
        Config {
            entrypoint: vec!["/pause".to_owned()],
            created_by: "a test".to_owned(),
            ..Config::default()
        }
    }

    /// The entries of a tar, as (path, type, mode, data).
    fn entries(tar: &[u8]) -> Vec<(String, EntryType, u32, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .expect("a tar")
            .map(|entry| {
                let mut entry = entry.expect("an entry");
                let path = entry.path().expect("a path").to_string_lossy().into_owned();
                let kind = entry.header().entry_type();
                let mode = entry.header().mode().expect("a mode");
                let mut data = Vec::new();
                entry.read_to_end(&mut data).expect("its data");
                (path, kind, mode, data)
            })
            .collect()
    }

    fn blob(archive: &[(String, EntryType, u32, Vec<u8>)], digest: &str) -> Vec<u8> {
        let path = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        archive
            .iter()
            .find(|(name, ..)| *name == path)
            .unwrap_or_else(|| panic!("{path} is in the archive"))
            .3
            .clone()
    }

    #[test]
    fn the_index_manifest_config_and_layer_name_each_other_by_digest() {
        let files = [
            File {
                path: "pause",
                mode: 0o755,
                data: b"binary",
            },
            File {
                path: "usr/lib/libx.so",
                mode: 0o644,
                data: b"library",
            },
        ];
        let image = Image::new(&files, &config(), &names()).expect("an image");
        let archive = entries(&image.archive().expect("an archive"));
        let index: Value = serde_json::from_slice(&archive[1].3).expect("index.json");
        assert_eq!(archive[1].0, "index.json");
        let entry = &index["manifests"][0];
        assert_eq!(entry["digest"], image.digest());
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            "probe-bypass.test/pause:1"
        );

        let manifest_bytes = blob(&archive, image.digest());
        assert_eq!(sha256(&manifest_bytes), image.digest());
        let manifest: Value = serde_json::from_slice(&manifest_bytes).expect("a manifest");
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .expect("a config digest");
        let config: Value = serde_json::from_slice(&blob(&archive, config_digest)).expect("config");
        assert_eq!(config["config"]["Entrypoint"][0], "/pause");

        let layer_digest = manifest["layers"][0]["digest"]
            .as_str()
            .expect("a layer digest");
        let gzipped = blob(&archive, layer_digest);
        assert_eq!(manifest["layers"][0]["size"], gzipped.len());
        let mut layer = Vec::new();
        flate2::read::GzDecoder::new(gzipped.as_slice())
            .read_to_end(&mut layer)
            .expect("a gzip");
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&layer));
        let layer: Vec<_> = entries(&layer)
            .into_iter()
            .map(|(path, kind, mode, data)| (path, kind == EntryType::Directory, mode, data))
            .collect();
        assert_eq!(
            layer,
            [
                ("pause".to_owned(), false, 0o755, b"binary".to_vec()),
                ("usr/".to_owned(), true, 0o755, Vec::new()),
                ("usr/lib/".to_owned(), true, 0o755, Vec::new()),
                (
                    "usr/lib/libx.so".to_owned(),
                    false,
                    0o644,
                    b"library".to_vec()
                ),
            ]
        );
    }

    #[test]
    fn the_same_files_give_the_same_digest_and_others_another() {
        let one = [File {
            path: "app",
            mode: 0o755,
            data: b"one",
        }];
        let other = [File {
            path: "app",
            mode: 0o755,
            data: b"two",
        }];
        let first = Image::new(&one, &config(), &names()).expect("an image");
        let again = Image::new(&one, &config(), &names()).expect("an image");
        let changed = Image::new(&other, &config(), &names()).expect("an image");
        assert_eq!(first.digest(), again.digest());
        assert_eq!(
            first.archive().expect("archive"),
            again.archive().expect("archive")
        );
        assert_ne!(first.digest(), changed.digest());
    }

    #[test]
    fn a_path_outside_the_layer_is_refused() {
        for path in ["/etc/passwd", "bin/../../etc/passwd"] {
            let files = [File {
                path,
                mode: 0o644,
                data: b"",
            }];
            let error = Image::new(&files, &config(), &names()).expect_err("refused");
            assert!(
                error.to_string().contains("stays inside"),
                "{path}: {error}"
            );
        }
    }
}
