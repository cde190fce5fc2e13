//! `cargo xtask image`: the archive is an image that skopeo reads, whose only file is the agent,
//! which runs from an otherwise empty root, and the same build gives the same bytes.
//!
//! The tests share one build of the archive: the agent's release build for the static target
//! takes minutes when cargo has nothing cached. It goes to the workspace's target directory (or
//! CARGO_TARGET_DIR), so later runs reuse it.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use serde_json::{Value, json};

const VERSION: &str = env!("CARGO_PKG_VERSION");

struct Built {
    archive: PathBuf,
    /// The digest `cargo xtask image` printed.
    digest: String,
}

/// The archive, built once for all the tests of this file.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| build("image"))
}

/// Runs `cargo xtask image --output <test dir>/<name>.oci.tar`.
fn build(name: &str) -> Built {
    let dir = test_dir();
    let archive = dir.join(format!("{name}.oci.tar"));
    let output = succeed(
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["image", "--output"])
            .arg(&archive),
    );
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(
        stdout.contains(&format!("image: {}", archive.display())),
        "the path is printed: {stdout}"
    );
    let digest = stdout
        .lines()
        .find_map(|line| line.strip_prefix("digest: "))
        .unwrap_or_else(|| panic!("no digest printed: {stdout}"))
        .to_owned();
    Built { archive, digest }
}

/// A directory for this file's tests in cargo's own temporary directory for tests.
fn test_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("xtask-image");
    fs::create_dir_all(&dir).expect("create the test directory");
    dir
}

fn succeed(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("failed to start {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Returns false, saying why, when `missing` names something this test needs; panics instead
/// when `CI` is set, as CI must run every test.
fn can_run(missing: Option<&str>) -> bool {
    let Some(reason) = missing else {
        return true;
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run ({reason}) and CI is set");
    }
    eprintln!("SKIPPED {test}: {reason}");
    false
}

fn missing_skopeo() -> Option<&'static str> {
    let found = Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    (!found).then_some("skopeo is not installed (run `cargo xtask setup`)")
}

/// `skopeo inspect <args> oci-archive:<archive>:<version>`, parsed. Naming the version checks
/// that the index carries it as the image's reference name.
fn skopeo_inspect(args: &[&str]) -> Value {
    let reference = format!("oci-archive:{}:{VERSION}", built().archive.display());
    let output = succeed(
        Command::new("skopeo")
            .arg("inspect")
            .args(args)
            .arg(reference),
    );
    serde_json::from_slice(&output.stdout).expect("skopeo prints JSON")
}

#[test]
fn skopeo_sees_a_linux_amd64_image_of_the_agent_with_its_labels() {
    if !can_run(missing_skopeo()) {
        return;
    }
    let image = skopeo_inspect(&[]);
    assert_eq!(image["Os"], "linux");
    assert_eq!(image["Architecture"], "amd64");
    assert_eq!(image["Digest"], built().digest.as_str());
    assert_eq!(image["Layers"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        image["Labels"],
        json!({
            "org.opencontainers.image.title": "probe-bypass",
            "org.opencontainers.image.version": VERSION,
            "org.opencontainers.image.source": env!("CARGO_PKG_REPOSITORY"),
            "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
        })
    );
}

#[test]
fn image_config_starts_the_agent_with_run() {
    if !can_run(missing_skopeo()) {
        return;
    }
    let config = skopeo_inspect(&["--config"]);
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Entrypoint"], json!(["/probe-bypass"]));
    assert_eq!(config["config"]["Cmd"], json!(["run"]));
    assert_eq!(config["rootfs"]["type"], "layers");
    assert_eq!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn image_layer_holds_only_the_agent_which_runs_in_an_empty_root() {
    let root = nix::unistd::geteuid().is_root();
    if !can_run(missing_skopeo().or((!root).then_some("not running as root, needed for chroot"))) {
        return;
    }
    let dir = test_dir().join("unpacked");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create the unpacking directory");
    // skopeo copies the blobs out one file each, checking them against their digests.
    let blobs = dir.join("blobs");
    succeed(Command::new("skopeo").arg("copy").args([
        format!("oci-archive:{}", built().archive.display()),
        format!("dir:{}", blobs.display()),
    ]));
    let manifest: Value =
        serde_json::from_slice(&fs::read(blobs.join("manifest.json")).expect("manifest.json"))
            .expect("manifest JSON");
    let layer_digest = manifest["layers"][0]["digest"]
        .as_str()
        .expect("the layer's digest");
    let layer = blobs.join(layer_digest.trim_start_matches("sha256:"));

    let listing = succeed(
        Command::new("tar")
            .args([
                "--list",
                "--verbose",
                "--numeric-owner",
                "--full-time",
                "--gzip",
            ])
            .arg("--file")
            .arg(&layer)
            .env("TZ", "UTC"),
    );
    let listing = String::from_utf8(listing.stdout).expect("UTF-8 listing");
    let entries: Vec<Vec<&str>> = listing
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    // Permissions, owner, size, date, time, name: the size is the agent's own.
    let [entry] = entries.as_slice() else {
        panic!("the layer holds one file, not: {listing}");
    };
    assert_eq!(
        [entry[0], entry[1], entry[3], entry[4], entry[5]],
        [
            "-rwxr-xr-x",
            "0/0",
            "1970-01-01",
            "00:00:00",
            "probe-bypass"
        ],
        "{listing}"
    );

    let rootfs = dir.join("rootfs");
    fs::create_dir_all(&rootfs).expect("create the root");
    succeed(
        Command::new("tar")
            .args(["--extract", "--gzip", "--file"])
            .arg(&layer)
            .arg("--directory")
            .arg(&rootfs),
    );
    // In a root that holds nothing but the agent, it runs only if it is static.
    let version = succeed(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/probe-bypass", "--version"]),
    );
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("probe-bypass {VERSION}")
    );
}

#[test]
fn the_same_build_gives_the_same_archive() {
    let again = build("image-again");
    assert_eq!(again.digest, built().digest);
    assert!(
        fs::read(&again.archive).expect("second archive")
            == fs::read(&built().archive).expect("first archive"),
        "the archives differ"
    );
}
