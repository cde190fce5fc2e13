//! A container registry of the test's own: Debian's `docker-registry` (the CNCF distribution
//! registry) on a loopback port, over HTTPS with a certificate from the test's CA, storing blobs
//! in a temporary directory. A test pushes an image archive to it with `skopeo copy`, as a user
//! pushes `cargo xtask image`'s archive, and a node pulls it over CRI.
//!
//! The guard stops the registry and removes its storage, panics included.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::free_loopback_port,
    sidecar::{Certificates, TempDir},
};

/// Debian's registry (package `docker-registry`, which `cargo xtask setup` installs).
pub const REGISTRY: &str = "/usr/bin/docker-registry";
/// What pushes an image archive to it.
const SKOPEO: &str = "/usr/bin/skopeo";
/// How long the registry may take to answer once started.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// What is missing to run a registry here, if anything.
pub fn missing() -> Option<String> {
    [REGISTRY, SKOPEO]
        .into_iter()
        .find(|path| !Path::new(path).is_file())
        .map(|path| format!("{path} is not installed: run `cargo xtask setup`"))
}

/// A running registry; stopped on drop.
pub struct Registry {
    child: Child,
    dir: TempDir,
    addr: SocketAddr,
    /// The CA that signed the registry's certificate, for its clients.
    ca: PathBuf,
}

impl Registry {
    /// Starts a registry on a free loopback port, its certificate issued by `certs` for
    /// `IP:127.0.0.1`, and returns once it answers `GET /v2/`.
    pub fn start(certs: &Certificates) -> Self {
        let dir = TempDir::new("registry");
        let addr = free_loopback_port();
        let (cert, key) = certs.issue_for("registry", &["IP:127.0.0.1"]);
        // skopeo takes a directory whose `*.crt` files are the CAs to trust.
        let ca_dir = dir.path.join("ca");
        fs::create_dir(&ca_dir).expect("the registry's CA dir");
        let ca = ca_dir.join("ca.crt");
        fs::copy(certs.ca(), &ca).expect("copy the CA");
        let config = dir.path.join("config.yml");
        let storage = dir.path.join("storage");
        fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: warn\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n  tls:\n    certificate: {cert}\n    key: {key}\n",
                storage.display()
            ),
        )
        .expect("write the registry's config");
        let log = fs::File::create(dir.path.join("registry.log")).expect("the registry's log");
        let child = Command::new(REGISTRY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("start {REGISTRY}: {error}"));
        let mut registry = Self {
            child,
            dir,
            addr,
            ca,
        };
        registry.wait_until_it_answers();
        registry
    }

    /// `host:port`, as image references and containerd's `hosts.toml` directories name it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The CA certificate the registry's clients must trust.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// What the registry logged.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path.join("registry.log")).unwrap_or_default()
    }

    /// Pushes the OCI image-layout archive at `archive` as `name:tag` with `skopeo copy`,
    /// verifying the registry's certificate, and returns the reference pushed to.
    pub fn push(&self, archive: &Path, name_tag: &str) -> String {
        let reference = format!("{}/{name_tag}", self.host());
        let ca_dir = self
            .ca
            .parent()
            .expect("the CA's dir")
            .display()
            .to_string();
        skopeo(
            &[
                "copy",
                "--dest-cert-dir",
                &ca_dir,
                &format!("oci-archive:{}", archive.display()),
                &format!("docker://{reference}"),
            ],
            || format!("the registry's log:\n{}", self.log()),
        );
        reference
    }

    fn wait_until_it_answers(&mut self) {
        let url = format!("https://{}/v2/", self.addr);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("the registry's status") {
                panic!(
                    "the registry exited ({status}) while starting:\n{}",
                    self.log()
                );
            }
            let answered = Command::new("curl")
                .args([
                    "--silent",
                    "--output",
                    "/dev/null",
                    "--write-out",
                    "%{http_code}",
                ])
                .arg("--cacert")
                .arg(&self.ca)
                .arg(&url)
                .output()
                .is_ok_and(|output| output.stdout == b"200");
            if answered {
                return;
            }
            assert!(
                started.elapsed() < ANSWER_WITHIN,
                "the registry did not answer {url} within {ANSWER_WITHIN:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The manifest digest of the OCI image-layout archive at `archive`, as `skopeo inspect` gives
/// it: what a registry that holds the image names it by.
pub fn archive_digest(archive: &Path) -> String {
    let digest = skopeo(
        &[
            "inspect",
            "--format",
            "{{.Digest}}",
            &format!("oci-archive:{}", archive.display()),
        ],
        String::new,
    );
    digest.trim().to_owned()
}

/// Runs `skopeo` with `args`, which must succeed (else a panic with its error and `context`),
/// and returns what it printed.
fn skopeo(args: &[&str], context: impl FnOnce() -> String) -> String {
    let output = Command::new(SKOPEO)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run {SKOPEO}: {error}"));
    assert!(
        output.status.success(),
        "skopeo {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr),
        context()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
