//! `pb-runc-systemd`: runc as a node with the systemd cgroup driver runs it, on a machine without
//! systemd (the tests' containerd's `BinaryName`).
//!
//! Given a pod cgroup parent that is a slice (`kubepods-besteffort-pod<uid_>.slice`), containerd's
//! CRI plugin writes the container's `cgroupsPath` in runc's systemd form,
//! `<slice>:cri-containerd:<id>`, whatever its own driver setting, and runc's systemd driver asks
//! systemd for the unit. systemd makes the slice's parents from its dashes and the scope from the
//! prefix and name: `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/
//! cri-containerd-<id>.scope`. Where systemd cannot run, this does that expansion in the bundle's
//! `config.json`, below `PB_CGROUP_ROOT` (the test's subtree, which stands for the root slice),
//! and hands every call on to runc (`PB_RUNC`, default `/usr/sbin/runc`) with its cgroupfs driver.
//! A path that is not in the systemd form is left as it is.

use std::{env, fs, os::unix::process::CommandExt as _, path::Path, process::Command};

use serde_json::Value;

fn main() {
    let args: Vec<String> = env::args().skip(1).collect();
    let runc = env::var("PB_RUNC").unwrap_or_else(|_| "/usr/sbin/runc".to_owned());
    if args.iter().any(|arg| arg == "create" || arg == "run")
        && let Some(bundle) = value_of(&args, "--bundle").or_else(|| value_of(&args, "-b"))
        && let Err(error) = expand(Path::new(bundle))
    {
        eprintln!("pb-runc-systemd: {error}");
        std::process::exit(1);
    }
    let error = Command::new(&runc).args(&args).exec();
    eprintln!("pb-runc-systemd: cannot run {runc}: {error}");
    std::process::exit(1);
}

fn value_of<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let at = args.iter().position(|arg| arg == flag)?;
    args.get(at + 1).map(String::as_str)
}

/// Rewrites the bundle's systemd-form `cgroupsPath` as the path systemd would make.
fn expand(bundle: &Path) -> Result<(), String> {
    let path = bundle.join("config.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut config: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(cgroups_path) = config["linux"]["cgroupsPath"].as_str() else {
        return Ok(());
    };
    let Some(expanded) = systemd_path(cgroups_path) else {
        return Ok(());
    };
    let root = env::var("PB_CGROUP_ROOT").unwrap_or_default();
    config["linux"]["cgroupsPath"] =
        Value::from(format!("{}/{expanded}", root.trim_end_matches('/')));
    let text = serde_json::to_string(&config).map_err(|e| e.to_string())?;
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `a-b-c.slice:prefix:name` as systemd lays it out: `a.slice/a-b.slice/a-b-c.slice/prefix-name.scope`.
fn systemd_path(cgroups_path: &str) -> Option<String> {
    let mut parts = cgroups_path.split(':');
    let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let units = slice.strip_suffix(".slice")?;
    let mut path = String::new();
    let mut parent = String::new();
    for unit in units.split('-') {
        if !parent.is_empty() {
            parent.push('-');
        }
        parent.push_str(unit);
        path.push_str(&parent);
        path.push_str(".slice/");
    }
    path.push_str(&format!("{prefix}-{name}.scope"));
    Some(path)
}
