//! Upstream Kubernetes and etcd, built from source with Go: the real control plane, kubelet and
//! kubectl the tests need, at the versions the wrapper Go modules in upstream/ pin.
//!
//! Each wrapper's go.mod (with its go.sum) is the single source of truth for a version: bumping
//! the `require` there, with `go get -tool`, is all a new release takes. The binaries go to a cache
//! outside the checkout, one directory per version, so that a fresh clone or a `cargo clean` does
//! not cost another half-hour build, and a bump builds next to the old version instead of over it.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{run, workspace_root};

/// Where the binaries are cached, unless [`CACHE_ENV`] names another directory.
const DEFAULT_CACHE: &str = "/var/cache/probe-bypass";
const CACHE_ENV: &str = "PROBE_BYPASS_UPSTREAM_CACHE";

/// Where Go's own tarball installs it: the project's machines have it there, which is not on
/// every user's PATH.
const LOCAL_GO: &str = "/usr/local/go/bin/go";

/// The build date stamped into Kubernetes' binaries: a fixed one, so that two builds of a version
/// are the same binaries.
const BUILD_DATE: &str = "1970-01-01T00:00:00Z";

/// A program of an upstream project, and how it tells its version.
struct Binary {
    name: &'static str,
    /// Its main package.
    package: &'static str,
    /// The arguments that make it print its version.
    version_args: &'static [&'static str],
    /// A line it prints then when it is the version wanted, `{v}` standing for that version
    /// without its leading `v`.
    version_line: &'static str,
}

/// An upstream project, built from the wrapper Go module that pins it.
struct Upstream {
    name: &'static str,
    /// What the project needs it for, for setup's lines.
    why: &'static str,
    /// The wrapper module's directory, relative to the workspace root.
    wrapper: &'static str,
    /// The module whose `require` in the wrapper's go.mod is the version to build.
    module: &'static str,
    /// The build tags of upstream's own release build.
    tags: &'static str,
    /// Packages whose version variables the linker sets, as upstream's release build does
    /// (Kubernetes' hack/lib/version.sh): without them the binaries report v0.0.0.
    version_packages: &'static [&'static str],
    binaries: &'static [Binary],
    /// How long a first build takes (with an empty module cache), for the line that starts it.
    build_time: &'static str,
}

const KUBERNETES: Upstream = Upstream {
    name: "kubernetes",
    why: "the tests' API server, controllers, scheduler, kubelet, kube-proxy and kubectl",
    wrapper: "upstream/kubernetes",
    module: "k8s.io/kubernetes",
    tags: "selinux,notest",
    version_packages: &[
        "k8s.io/client-go/pkg/version",
        "k8s.io/component-base/version",
    ],
    binaries: &[
        kubernetes_component("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
        kubernetes_component(
            "kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
        ),
        kubernetes_component("kube-scheduler", "k8s.io/kubernetes/cmd/kube-scheduler"),
        kubernetes_component("kubelet", "k8s.io/kubernetes/cmd/kubelet"),
        kubernetes_component("kube-proxy", "k8s.io/kubernetes/cmd/kube-proxy"),
        Binary {
            name: "kubectl",
            package: "k8s.io/kubernetes/cmd/kubectl",
            // Without --client it would also ask a server, which there is none of.
            version_args: &["version", "--client"],
            version_line: "Client Version: v{v}",
        },
    ],
    build_time: "about 15–35 minutes on 2 cores",
};

const ETCD: Upstream = Upstream {
    name: "etcd",
    why: "the store of the tests' API server",
    wrapper: "upstream/etcd",
    module: "go.etcd.io/etcd/server/v3",
    tags: "",
    // etcd's version is a constant in its source, and needs no stamping.
    version_packages: &[],
    binaries: &[Binary {
        name: "etcd",
        // The server module's root is etcd's main package.
        package: "go.etcd.io/etcd/server/v3",
        version_args: &["--version"],
        version_line: "etcd Version: {v}",
    }],
    build_time: "a few minutes",
};

/// A Kubernetes component: they all print `Kubernetes <version>` for `--version`.
const fn kubernetes_component(name: &'static str, package: &'static str) -> Binary {
    Binary {
        name,
        package,
        version_args: &["--version"],
        version_line: "Kubernetes v{v}",
    }
}

/// Builds Kubernetes and etcd at the versions upstream/ pins, each unless its cache directory
/// already holds that build.
pub fn ensure() -> Result<()> {
    for upstream in [&KUBERNETES, &ETCD] {
        ensure_built(upstream)?;
    }
    Ok(())
}

/// Where [`ensure`] puts the Kubernetes binaries (kube-apiserver, kubelet, kubectl, ...) of the
/// version upstream/kubernetes pins. It does not check that they are there.
pub fn kubernetes_bin_dir() -> Result<PathBuf> {
    bin_dir(&KUBERNETES, &pinned_version(&KUBERNETES)?)
}

/// Builds `upstream` into its cache directory unless every binary there already reports the
/// pinned version. The build goes to a sibling directory first, renamed into place once it is
/// whole: an interrupted build never looks complete.
fn ensure_built(upstream: &Upstream) -> Result<()> {
    let Upstream { name, why, .. } = upstream;
    let version = pinned_version(upstream)?;
    let bin = bin_dir(upstream, &version)?;
    let incomplete = match check_built(upstream, &version, &bin) {
        Ok(()) => {
            println!(
                "setup: {name} {version} ({why}): already built in {}",
                bin.display()
            );
            return Ok(());
        }
        Err(incomplete) => incomplete,
    };
    if bin.exists() {
        println!(
            "setup: {name} {version}: {} holds no complete build ({incomplete:#}); building it again",
            bin.display()
        );
    }
    let wrapper = workspace_root().join(upstream.wrapper);
    let go = go(upstream, &wrapper)?;

    let partial = bin.with_file_name("bin.partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| {
            format!(
                "failed to remove {}, left by an earlier build",
                partial.display()
            )
        })?;
    }
    fs::create_dir_all(&partial).with_context(|| {
        format!(
            "failed to create {}: run `cargo xtask setup` as root, or set {CACHE_ENV} to a \
             directory you can write",
            partial.display()
        )
    })?;

    println!(
        "setup: building {name} {version} ({why}) from the Go module proxy ({} the first time)",
        upstream.build_time
    );
    let started = Instant::now();
    let mut build = Command::new(go);
    build
        .current_dir(&wrapper)
        // Build with the Go installed, never one go would download itself.
        .env("GOTOOLCHAIN", "local")
        // Static binaries, as upstream's release builds are.
        .env("CGO_ENABLED", "0")
        // The checked-in go.sum must be complete: a build never edits go.mod or go.sum.
        .env("GOFLAGS", "-mod=readonly")
        .args(["build", "-trimpath"]);
    if !upstream.tags.is_empty() {
        build.args(["-tags", upstream.tags]);
    }
    build
        .args(["-ldflags", &ldflags(&version, upstream.version_packages)?])
        .arg("-o")
        .arg(output(upstream, &partial))
        .args(upstream.binaries.iter().map(|binary| binary.package));
    run(&mut build).with_context(|| {
        format!(
            "failed to build {name} {version}; if go.sum lacks an entry, run `go mod tidy` in {}",
            wrapper.display()
        )
    })?;
    check_built(upstream, &version, &partial)
        .with_context(|| format!("built {name} {version}, but it is not what was asked for"))?;

    if bin.exists() {
        fs::remove_dir_all(&bin)
            .with_context(|| format!("failed to remove the incomplete {}", bin.display()))?;
    }
    fs::rename(&partial, &bin).with_context(|| {
        format!(
            "failed to rename {} to {}",
            partial.display(),
            bin.display()
        )
    })?;
    println!(
        "setup: {name} {version}: built in {}",
        minutes_seconds(started.elapsed())
    );
    Ok(())
}

/// The version of `upstream` its wrapper's go.mod requires.
fn pinned_version(upstream: &Upstream) -> Result<String> {
    let go_mod = workspace_root().join(upstream.wrapper).join("go.mod");
    let text = fs::read_to_string(&go_mod)
        .with_context(|| format!("failed to read {}", go_mod.display()))?;
    let Some(version) = required_version(&text, upstream.module) else {
        bail!(
            "{} requires no version of {}: pin one with `go get -tool <package>@<version>` in {}",
            go_mod.display(),
            upstream.module,
            upstream.wrapper
        );
    };
    Ok(version.to_owned())
}

/// The version `module` is required at in the go.mod `text`, in a one-line `require` or a
/// `require ( ... )` block, `// indirect` or not.
fn required_version<'a>(text: &'a str, module: &str) -> Option<&'a str> {
    let mut in_block = false;
    for line in text.lines() {
        let line = line.split_once("//").map_or(line, |(code, _)| code).trim();
        let requirement = if in_block {
            if line == ")" {
                in_block = false;
                continue;
            }
            line
        } else if let Some(rest) = directive(line, "require") {
            if rest == "(" {
                in_block = true;
                continue;
            }
            rest
        } else {
            continue;
        };
        let mut words = requirement.split_whitespace();
        if words.next() == Some(module) {
            return words.next();
        }
    }
    None
}

/// What follows the directive `name` on `line`, if the line is one.
fn directive<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(name)?;
    let trimmed = rest.trim_start();
    // `require(` is one too; `requirements` is not.
    (trimmed.len() < rest.len() || trimmed.starts_with('(')).then_some(trimmed)
}

/// The cache directory of `upstream`'s binaries at `version`.
fn bin_dir(upstream: &Upstream, version: &str) -> Result<PathBuf> {
    Ok(cache_dir()?.join(upstream.name).join(version).join("bin"))
}

/// [`CACHE_ENV`] (relative to where we were started) when set, else [`DEFAULT_CACHE`]: outside the
/// checkout, so that every clone on a machine shares one build.
fn cache_dir() -> Result<PathBuf> {
    match env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => Ok(env::current_dir()
            .context("failed to read the current directory")?
            .join(dir)),
        _ => Ok(PathBuf::from(DEFAULT_CACHE)),
    }
}

/// Fails, saying why, unless every binary of `upstream` in `dir` reports `version`.
fn check_built(upstream: &Upstream, version: &str, dir: &Path) -> Result<()> {
    let bare = version.strip_prefix('v').unwrap_or(version);
    for binary in upstream.binaries {
        let path = dir.join(binary.name);
        if !path.is_file() {
            bail!("no {}", binary.name);
        }
        let output = Command::new(&path)
            .args(binary.version_args)
            .output()
            .with_context(|| format!("failed to run {}", path.display()))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let wanted = binary.version_line.replace("{v}", bare);
        if !stdout.lines().any(|line| line.trim() == wanted) {
            bail!(
                "`{} {}` does not print `{wanted}` but `{}`",
                binary.name,
                binary.version_args.join(" "),
                stdout.lines().next().unwrap_or_default().trim()
            );
        }
    }
    Ok(())
}

/// The `-o` of the build: with several packages, a directory, where go names each binary after
/// its package's last element (Kubernetes' cmd/<name>); with one, the binary's path, since a main
/// package at a module root ends in a major version (etcd's server/v3).
fn output(upstream: &Upstream, dir: &Path) -> OsString {
    match upstream.binaries {
        [binary] => dir.join(binary.name).into_os_string(),
        _ => {
            let mut dir = dir.as_os_str().to_owned();
            dir.push("/");
            dir
        }
    }
}

/// The linker flags: no symbol tables or debug info (as upstream's release builds), and the
/// version stamped into each of `version_packages`.
fn ldflags(version: &str, version_packages: &[&str]) -> Result<String> {
    let mut flags = vec!["-s".to_owned(), "-w".to_owned()];
    if !version_packages.is_empty() {
        let (major, minor) = major_minor(version)?;
        for package in version_packages {
            for (variable, value) in [
                ("gitVersion", version),
                ("gitMajor", major),
                ("gitMinor", minor),
                ("gitTreeState", "clean"),
                ("buildDate", BUILD_DATE),
            ] {
                flags.push(format!("-X {package}.{variable}={value}"));
            }
        }
    }
    Ok(flags.join(" "))
}

/// The major and minor numbers of a version such as `v1.34.4`.
fn major_minor(version: &str) -> Result<(&str, &str)> {
    let numbers = version.strip_prefix('v').unwrap_or(version);
    let mut parts = numbers.split('.');
    match (parts.next(), parts.next()) {
        (Some(major), Some(minor))
            if [major, minor]
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            Ok((major, minor))
        }
        _ => bail!("version {version} is not of the form v<major>.<minor>.<patch>"),
    }
}

/// The `go` to build `upstream` with: the one on PATH, else the one in /usr/local/go, and only if
/// it is at least the Go version the wrapper's go.mod declares (with `GOTOOLCHAIN=local`, go does
/// not fetch a newer one itself).
fn go(upstream: &Upstream, wrapper: &Path) -> Result<PathBuf> {
    let go_mod = wrapper.join("go.mod");
    let text = fs::read_to_string(&go_mod)
        .with_context(|| format!("failed to read {}", go_mod.display()))?;
    let needed = text
        .lines()
        .find_map(|line| directive(line.trim(), "go"))
        .with_context(|| format!("{} has no `go` line", go_mod.display()))?;
    // Debian 12's golang package is Go 1.19, too old: setup does not install it.
    let install = format!(
        "install Go {needed} or later from https://go.dev/dl/ into /usr/local/go \
         (Debian 12's golang package is too old)"
    );
    let Some((go, found)) = [PathBuf::from("go"), PathBuf::from(LOCAL_GO)]
        .into_iter()
        .find_map(|go| go_version(&go).map(|version| (go, version)))
    else {
        bail!(
            "building {} needs Go {needed} or later, but neither `go` on PATH nor {LOCAL_GO} runs: {install}",
            upstream.name
        );
    };
    if version_numbers(&found) < version_numbers(needed) {
        bail!(
            "building {} needs Go {needed} or later ({}), but {} is Go {found}: {install}",
            upstream.name,
            go_mod.display(),
            go.display()
        );
    }
    Ok(go)
}

/// The version `go version` reports (`1.24.0` of `go version go1.24.0 linux/amd64`), if it runs.
fn go_version(go: &Path) -> Option<String> {
    let output = Command::new(go)
        .arg("version")
        // Report this go's own version, not one a go.mod around would have it switch to.
        .env("GOTOOLCHAIN", "local")
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    parse_go_version(&String::from_utf8_lossy(&output.stdout))
}

fn parse_go_version(stdout: &str) -> Option<String> {
    stdout
        .split_whitespace()
        .find_map(|word| word.strip_prefix("go1"))
        .map(|rest| format!("1{rest}"))
}

/// The numbers of a Go version, for comparing: `1.24rc1` is [1, 24], which sorts before `1.24.0`.
fn version_numbers(version: &str) -> Vec<u64> {
    version
        .split('.')
        .map_while(|part| {
            let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// `12 min 3 s`, or `42 s` under a minute.
fn minutes_seconds(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds / 60 {
        0 => format!("{seconds} s"),
        minutes => format!("{minutes} min {} s", seconds % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_line_require() {
        let go_mod = "module example.invalid/w\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes v1.34.4\n";
        assert_eq!(
            required_version(go_mod, "k8s.io/kubernetes"),
            Some("v1.34.4")
        );
    }

    #[test]
    fn a_require_block_with_indirect() {
        let go_mod = "module example.invalid/w\n\
            require (\n\
            \tk8s.io/kubelet v0.34.4 // indirect\n\
            \tk8s.io/kubernetes v1.34.4 // indirect\n\
            \tk8s.io/kubernetes-extra v9.9.9\n\
            )\n";
        assert_eq!(
            required_version(go_mod, "k8s.io/kubernetes"),
            Some("v1.34.4")
        );
        assert_eq!(required_version(go_mod, "k8s.io/kubelet"), Some("v0.34.4"));
    }

    #[test]
    fn a_one_line_require_with_indirect_after_a_block() {
        let go_mod = "require (\n\tgo.etcd.io/bbolt v1.4.3\n)\n\n\
            require go.etcd.io/etcd/server/v3 v3.6.13 // indirect\n";
        assert_eq!(
            required_version(go_mod, "go.etcd.io/etcd/server/v3"),
            Some("v3.6.13")
        );
    }

    #[test]
    fn replace_and_tool_lines_are_not_requires() {
        let go_mod = "replace (\n\tk8s.io/api => k8s.io/api v0.34.4\n)\n\n\
            tool k8s.io/api\n\nrequire k8s.io/kubernetes v1.34.4\n";
        assert_eq!(required_version(go_mod, "k8s.io/api"), None);
    }

    #[test]
    fn a_module_not_required() {
        let go_mod =
            "module example.invalid/w\n\ngo 1.24.0\n\nrequire (\n\tk8s.io/kubelet v0.34.4\n)\n";
        assert_eq!(required_version(go_mod, "k8s.io/kubernetes"), None);
        assert_eq!(required_version("", "k8s.io/kubernetes"), None);
    }

    #[test]
    fn the_wrapper_modules_pin_a_version() {
        for upstream in [&KUBERNETES, &ETCD] {
            let version = pinned_version(upstream).unwrap();
            assert!(major_minor(&version).is_ok(), "{version}");
        }
    }

    #[test]
    fn major_and_minor() {
        assert_eq!(major_minor("v1.34.4").unwrap(), ("1", "34"));
        assert_eq!(major_minor("v1.35.0-rc.1").unwrap(), ("1", "35"));
        assert_eq!(major_minor("v3.6.13").unwrap(), ("3", "6"));
        assert!(major_minor("v1").is_err());
        assert!(major_minor("v1.x.0").is_err());
        assert!(major_minor("").is_err());
    }

    #[test]
    fn ldflags_stamp_the_version() {
        assert_eq!(ldflags("v3.6.13", &[]).unwrap(), "-s -w");
        assert_eq!(
            ldflags("v1.34.4", &["k8s.io/component-base/version"]).unwrap(),
            "-s -w -X k8s.io/component-base/version.gitVersion=v1.34.4 \
             -X k8s.io/component-base/version.gitMajor=1 \
             -X k8s.io/component-base/version.gitMinor=34 \
             -X k8s.io/component-base/version.gitTreeState=clean \
             -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"
        );
    }

    #[test]
    fn go_versions() {
        assert_eq!(
            parse_go_version("go version go1.26.8 linux/amd64\n").as_deref(),
            Some("1.26.8")
        );
        assert_eq!(parse_go_version("nonsense"), None);
        assert!(version_numbers("1.26.8") >= version_numbers("1.24.0"));
        assert!(version_numbers("1.24.0") >= version_numbers("1.24.0"));
        assert!(version_numbers("1.24rc1") < version_numbers("1.24.0"));
        assert!(version_numbers("1.19.8") < version_numbers("1.24.0"));
    }

    #[test]
    fn durations() {
        assert_eq!(minutes_seconds(Duration::from_secs(42)), "42 s");
        assert_eq!(minutes_seconds(Duration::from_secs(723)), "12 min 3 s");
    }
}
