//! The container images the tests' containerd runs (issue 17), made in the test from static
//! binaries with the project's own image writer (`probe-bypass-oci`), and the agent's image as
//! `cargo xtask image` wrote it.
//!
//! `cargo xtask test` builds what they are made of before it runs the tests: the test images'
//! programs (`tests/images`: `pb-pause`, `pb-app`) for the musl target, and the agent's image. A
//! plain `cargo test` finds them where those builds left them, or says how to build them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use probe_bypass_oci::{Config, File, Image, Names};

/// The static target the programs are built for.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";
/// The sandbox image, as the containerd's `sandbox_image` names it.
pub const PAUSE: &str = "probe-bypass.test/pause:1";
/// The test app's image: `/pb-app NAME PORT...` answers HTTP on each port.
pub const APP: &str = "probe-bypass.test/app:1";
/// The sidecar's image: the host's HAProxy (Debian's, which `cargo xtask setup` installs) with the
/// shared libraries it loads, at their paths: `/usr/sbin/haproxy -db -f CONFIG`.
pub const SIDECAR: &str = "probe-bypass.test/haproxy:1";
/// The host's HAProxy, copied into [`SIDECAR`].
const HAPROXY: &str = "/usr/sbin/haproxy";
/// The mesh's init image, as far as its script needs: `/bin/sh -c 'iptables-restore …'` with
/// the host's shell, iptables and its extensions (Debian's, which `cargo xtask setup` installs).
pub const MESH_INIT: &str = "probe-bypass.test/mesh-init:1";
/// Where Debian's iptables looks for its extensions (`libxt_REDIRECT.so`…).
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";
/// The agent's image (`/probe-bypass`), as `cargo xtask image` names it for containerd.
pub const AGENT: &str = concat!("docker.io/library/probe-bypass:", env!("CARGO_PKG_VERSION"));

/// An image archive to import, and the name containerd stores it under.
pub struct Archive {
    pub name: &'static str,
    pub path: PathBuf,
}

/// The workspace's target directory: the one the running test, benchmark or support binary was
/// built in (`<target>/<profile>/deps/<name>-<hash>`, or `<target>/<profile>/<name>`).
pub fn target_dir() -> PathBuf {
    profile_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| {
            panic!(
                "{} is not under a cargo target dir",
                profile_dir().display()
            )
        })
}

/// The profile's directory of the target directory the running program was built in
/// (`<target>/debug`), where cargo puts the workspace's binaries.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|error| panic!("the path of the running program: {error}"));
    let dir = exe
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent", exe.display()));
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// `tests/images`' program `name`, as built for the static target.
pub fn program(name: &str) -> PathBuf {
    target_dir().join(STATIC_TARGET).join("release").join(name)
}

/// The agent's image as `cargo xtask image` writes it: an OCI image-layout archive.
pub fn agent_archive() -> PathBuf {
    target_dir().join("image").join(format!(
        "probe-bypass-{}.oci.tar",
        env!("CARGO_PKG_VERSION")
    ))
}

/// What is missing to make the images, if anything, and how to build it.
pub fn missing() -> Option<String> {
    let programs = ["pb-pause", "pb-app", "pb-runc-systemd"].map(program);
    if let Some(path) = programs.iter().find(|path| !path.is_file()) {
        return Some(format!(
            "{} is not built: `cargo xtask test` builds it, or `cargo build --release --package \
             probe-bypass-test-images --target {STATIC_TARGET}`",
            path.display()
        ));
    }
    if !Path::new(HAPROXY).is_file() {
        return Some(format!(
            "{HAPROXY} is not installed: run `cargo xtask setup`"
        ));
    }
    let agent = agent_archive();
    (!agent.is_file()).then(|| {
        format!(
            "the agent's image {} is not built: `cargo xtask test` builds it, or `cargo xtask \
             image`",
            agent.display()
        )
    })
}

/// Writes the pause, app, sidecar and mesh init images into `dir` and returns them with the agent's image.
pub fn archives(dir: &Path) -> Vec<Archive> {
    // Each image, the name of its archive file, and what writes it.
    type Write = fn() -> Vec<u8>;
    let written: [(_, _, Write); 4] = [
        (PAUSE, "pb-pause", || {
            one_program_image(PAUSE, "pb-pause", vec!["/pb-pause".to_owned()])
        }),
        (APP, "pb-app", || {
            one_program_image(APP, "pb-app", vec!["/pb-app".to_owned()])
        }),
        (SIDECAR, "haproxy", haproxy_image),
        (MESH_INIT, "mesh-init", mesh_init_image),
    ];
    let mut archives: Vec<Archive> = written
        .into_iter()
        .map(|(name, file, image)| {
            let path = dir.join(format!("{file}.oci.tar"));
            fs::write(&path, image())
                .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
            Archive { name, path }
        })
        .collect();
    archives.push(Archive {
        name: AGENT,
        path: agent_archive(),
    });
    archives
}

/// An image whose one layer holds the static program `program_name`, at `/<program_name>`.
fn one_program_image(name: &str, program_name: &str, entrypoint: Vec<String>) -> Vec<u8> {
    let path = program(program_name);
    let data = fs::read(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    let files = [File {
        path: program_name,
        mode: 0o755,
        data: &data,
    }];
    let config = Config {
        entrypoint,
        cmd: Vec::new(),
        labels: vec![(
            "org.opencontainers.image.title".to_owned(),
            program_name.to_owned(),
        )],
        created_by: "probe-bypass-testing".to_owned(),
    };
    let names = Names {
        tag: name.rsplit(':').next().unwrap_or("1").to_owned(),
        containerd: name.to_owned(),
    };
    Image::new(&files, &config, &names)
        .and_then(|image| image.archive())
        .unwrap_or_else(|error| panic!("make the image {name}: {error}"))
}

/// [`SIDECAR`]: the host's HAProxy and the libraries it loads.
fn haproxy_image() -> Vec<u8> {
    host_files_image(
        SIDECAR,
        "haproxy",
        vec![(HAPROXY.to_owned(), PathBuf::from(HAPROXY))],
        vec![HAPROXY.to_owned()],
    )
}

/// [`MESH_INIT`]: what the mesh's init script runs, from the host: `/bin/sh` (its dash),
/// `iptables-restore` (the xtables multi-binary `iptables-restore` resolves to, which picks its
/// part by the name it is called by), the iptables extensions the rules load (the whole
/// directory, as the mesh's image has it), and the libraries they all load.
fn mesh_init_image() -> Vec<u8> {
    let resolve = |path: &Path| {
        fs::canonicalize(path).unwrap_or_else(|error| panic!("resolve {}: {error}", path.display()))
    };
    let mut files = vec![
        ("/bin/sh".to_owned(), resolve(Path::new("/bin/sh"))),
        (
            "/usr/sbin/iptables-restore".to_owned(),
            resolve(&which("iptables-restore")),
        ),
    ];
    let extensions = fs::read_dir(XTABLES_EXTENSIONS)
        .unwrap_or_else(|error| panic!("read {XTABLES_EXTENSIONS}: {error}"));
    for entry in extensions.flatten() {
        let path = entry.path();
        files.push((path.display().to_string(), resolve(&path)));
    }
    host_files_image(MESH_INIT, "mesh-init", files, vec!["/bin/sh".to_owned()])
}

/// The program `name` on the `PATH`.
pub fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{name} is not on the PATH"))
}

/// An image of host files, each `(path in the image, path on the host)`, with every library
/// `ldd` says they load (the dynamic loader included) at the path the loader looks for it at.
fn host_files_image(
    name: &str,
    title: &str,
    mut files: Vec<(String, PathBuf)>,
    entrypoint: Vec<String>,
) -> Vec<u8> {
    let mut libraries = std::collections::BTreeSet::new();
    for (_, host) in &files {
        libraries.extend(libraries_of(host));
    }
    for library in libraries {
        if files.iter().all(|(path, _)| *path != library) {
            files.push((library.clone(), PathBuf::from(library)));
        }
    }
    let contents: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .map(|(path, host)| {
            let data =
                fs::read(&host).unwrap_or_else(|error| panic!("read {}: {error}", host.display()));
            (path.trim_start_matches('/').to_owned(), data)
        })
        .collect();
    let files: Vec<File<'_>> = contents
        .iter()
        .map(|(path, data)| File {
            path,
            mode: 0o755,
            data,
        })
        .collect();
    let config = Config {
        entrypoint,
        cmd: Vec::new(),
        labels: vec![(
            "org.opencontainers.image.title".to_owned(),
            title.to_owned(),
        )],
        created_by: "probe-bypass-testing".to_owned(),
    };
    let names = Names {
        tag: name.rsplit(':').next().unwrap_or("1").to_owned(),
        containerd: name.to_owned(),
    };
    Image::new(&files, &config, &names)
        .and_then(|image| image.archive())
        .unwrap_or_else(|error| panic!("make the image {name}: {error}"))
}

/// The libraries the program or library at `path` loads, as `ldd` lists them (absolute paths).
fn libraries_of(path: &Path) -> Vec<String> {
    let output = std::process::Command::new("ldd")
        .arg(path)
        .output()
        .unwrap_or_else(|error| panic!("run ldd {}: {error}", path.display()));
    assert!(
        output.status.success(),
        "ldd {}: {output:?}",
        path.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let library = match line.split_once("=>") {
                Some((_, found)) => found.trim().split(' ').next()?,
                None => line.split(' ').next()?,
            };
            library.starts_with('/').then(|| library.to_owned())
        })
        .collect()
}
