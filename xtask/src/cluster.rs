//! `cargo xtask cluster up|down`: the tests' one-node Kubernetes cluster (upstream Kubernetes
//! built by setup, on a containerd of its own) for a person, with probe-bypass installed from
//! `deploy/` and a namespace of meshed pods.
//!
//! `up` runs the tests' supervisor (`probe-bypass-cluster`, tests/support/bin/cluster.rs) in a
//! session of its own, so that it outlives the terminal, and returns once the cluster is ready;
//! `down` asks it to tear everything down and waits until it has. Everything the cluster makes is
//! named in tests/support/cluster.rs; its files are under `<target dir>/cluster/`.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, target_dir, upstream};

/// How long `up` waits for the cluster, the agent, the webhook and the demo's pods.
const UP_WITHIN: Duration = Duration::from_secs(300);
/// How long `down` waits for the teardown.
const DOWN_WITHIN: Duration = Duration::from_secs(120);

#[derive(clap::Subcommand)]
pub enum Action {
    /// Start the cluster, install probe-bypass from deploy/ and the demo namespace, and print
    /// how to reach it.
    Up,
    /// Tear the cluster down: its processes, pods, mounts, cgroups, addresses and rules.
    Down,
}

pub fn run(action: Action) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the cluster runs a kubelet, containerd and eBPF programs, and changes addresses and \
             cgroups: run it as root"
        );
    }
    let dir = target_dir()?.join("cluster");
    match action {
        Action::Up => up(&dir),
        Action::Down => down(&dir),
    }
}

fn up(dir: &Path) -> Result<()> {
    if let Some(pid) = running(dir) {
        println!("the cluster is already up (its supervisor is pid {pid})");
        return show(dir);
    }
    setup::ensure()?;
    println!("building the test images, the agent's image and the cluster's supervisor…");
    crate::test::test_node_parts()?;
    let supervisor = target_dir()?.join("debug/probe-bypass-cluster");
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| {
            format!(
                "failed to remove {}, left by an earlier cluster",
                dir.display()
            )
        })?;
    }
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let log_path = dir.join("supervisor.log");
    let log = fs::File::create(&log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))?;
    // setsid: a session of its own, which the terminal's hangup and Ctrl-C do not reach.
    let mut child = Command::new("setsid")
        .arg(&supervisor)
        .arg("--dir")
        .arg(dir)
        .arg("--demo")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("the supervisor's log")?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("failed to start {}", supervisor.display()))?;
    fs::write(dir.join("supervisor.pid"), child.id().to_string())
        .context("failed to write the supervisor's pid")?;
    println!(
        "starting the cluster, probe-bypass and the demo's pods (about a minute; log: {})…",
        log_path.display()
    );
    let started = Instant::now();
    loop {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        if log.lines().any(|line| line.starts_with("ready ")) {
            break;
        }
        if let Some(status) = child.try_wait().context("the supervisor's status")? {
            bail!(
                "the cluster did not start ({status}); it tore down what it had made:\n{}",
                tail(&log, 30)
            );
        }
        if started.elapsed() > UP_WITHIN {
            bail!(
                "the cluster was not ready within {UP_WITHIN:?}; `cargo xtask cluster down` tears \
                 it down:\n{}",
                tail(&log, 30)
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
    println!("up in {} s", started.elapsed().as_secs());
    show(dir)
}

/// Prints the kubeconfig and a few commands to look around.
fn show(dir: &Path) -> Result<()> {
    let kubeconfig = dir.join("admin.kubeconfig");
    let kubectl = upstream::kubernetes_bin_dir()?.join("kubectl");
    let k = format!(
        "{} --kubeconfig {}",
        kubectl.display(),
        kubeconfig.display()
    );
    println!(
        "\nkubeconfig: {}\n\n\
         {k} get nodes -o wide\n\
         {k} --namespace probe-bypass get pods                    # the agent and the webhook\n\
         {k} --namespace demo get pods -o wide                   # meshed pods, Ready through the agent\n\
         {k} --namespace demo get pods -o jsonpath='{{.items[0].spec.containers[0].readinessProbe}}'\n\
         {k} --namespace probe-bypass logs daemonset/probe-bypass --container agent\n\
         curl -s http://127.0.0.1:9091/metrics | grep probe_bypass_healthcheck_probes_total\n\n\
         The components' logs are in {}/logs. `cargo xtask cluster down` tears it all down.",
        kubeconfig.display(),
        dir.display()
    );
    Ok(())
}

fn down(dir: &Path) -> Result<()> {
    let Some(pid) = running(dir) else {
        println!("no cluster is up (no supervisor in {})", dir.display());
        return Ok(());
    };
    println!("tearing the cluster down…");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .with_context(|| format!("failed to signal the supervisor (pid {pid})"))?;
    let started = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        if started.elapsed() > DOWN_WITHIN {
            bail!(
                "the supervisor (pid {pid}) is still tearing down after {DOWN_WITHIN:?}; see {}",
                dir.join("supervisor.log").display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    let log = fs::read_to_string(dir.join("supervisor.log")).unwrap_or_default();
    fs::remove_dir_all(dir).with_context(|| format!("failed to remove {}", dir.display()))?;
    if !log.contains("the test cluster is torn down") {
        bail!(
            "the supervisor ended before it said it had torn down:\n{}",
            tail(&log, 30)
        );
    }
    println!("torn down in {} s", started.elapsed().as_secs());
    Ok(())
}

/// The pid of the cluster's supervisor, if one runs.
fn running(dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(dir.join("supervisor.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("probe-bypass-cluster")
        .then_some(pid)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
