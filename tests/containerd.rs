//! The tests' own containerd (issue 17's test node, first part): it boots with its CRI plugin on a
//! root, state dir, socket and configuration of its own, and leaves nothing behind.
//!
//! Needs root and Debian's containerd, runc and containernetworking-plugins (`cargo xtask
//! setup`); without them the tests say why and pass, unless `CI` is set.

use std::path::Path;

use probe_bypass_testing::{containerd::Containerd, privilege, require_privileges};

/// Whether the machine has what a containerd node needs; otherwise skips (fails under CI).
fn containerd_can_run() -> bool {
    match probe_bypass_testing::containerd::missing() {
        None => true,
        Some(reason) => {
            let thread = std::thread::current();
            privilege::skip(thread.name().unwrap_or("test"), &reason);
            false
        }
    }
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn containerd_boots_its_cri_plugin_on_paths_of_its_own_and_leaves_nothing() {
    require_privileges!();
    if !containerd_can_run() {
        return;
    }
    let machine_socket = Path::new("/run/containerd/containerd.sock").exists();
    let machine_root = Path::new("/var/lib/containerd").exists();

    let containerd = Containerd::start();
    let version = containerd.ctr(&["version"]);
    assert!(version.status.success(), "ctr version: {version:?}");
    assert!(stdout(&version).contains("Server:"), "{}", stdout(&version));

    // The CRI plugin is up, on the overlayfs snapshotter, with the runc runtime.
    let plugins = stdout(&containerd.ctr(&["plugins", "ls"]));
    for (kind, id) in [
        ("io.containerd.grpc.v1", "cri"),
        ("io.containerd.snapshotter.v1", "overlayfs"),
        ("io.containerd.runtime.v2", "task"),
    ] {
        let line = plugins
            .lines()
            .find(|line| line.starts_with(kind) && line.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("no {kind} {id} plugin in:\n{plugins}"));
        assert!(
            line.trim_end().ends_with("ok"),
            "{line}\n{}",
            containerd.log()
        );
    }
    let log = containerd.log();
    assert!(
        log.contains(&format!(
            "ContainerdRootDir:{}",
            containerd.path("root").display()
        )),
        "the CRI plugin uses the test's root:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "NetworkPluginConfDir:{}",
            containerd.path("net.d").display()
        )),
        "and the test's CNI configuration:\n{log}"
    );
    assert!(
        containerd
            .path("root")
            .read_dir()
            .expect("root")
            .next()
            .is_some()
    );
    // Nothing of the machine's own containerd was made.
    assert_eq!(
        Path::new("/run/containerd/containerd.sock").exists(),
        machine_socket
    );
    assert_eq!(Path::new("/var/lib/containerd").exists(), machine_root);

    let pid = containerd.pid();
    let dir = containerd.path("");
    drop(containerd);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "containerd {pid} stopped with its guard"
    );
    assert!(!dir.exists(), "{} removed with its guard", dir.display());
}
