//! `cargo xtask`: the project's own commands for setting a machine up, building and checking.
//!
//! Each subcommand lives in its own module with a `run` function; this file only parses the
//! command line and holds the helpers they share.

mod bench;
mod build_ebpf;
mod cluster;
mod demo;
mod image;
mod layers;
mod setup;
mod test;
mod upstream;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Project tasks for probe-bypass.
#[derive(Parser)]
#[command(bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks to build and test the project (Debian; apt, rustup, cargo).
    Setup,
    /// Build the kernel programs on their own and list the programs and maps in the object.
    BuildEbpf {
        /// Without the decision log: the `log` feature off, every log call compiled out (the
        /// benchmark's baseline for `--ebpf-log` off). Written to <target dir>/ebpf-no-log/ unless
        /// --out says otherwise.
        #[arg(long)]
        no_log: bool,
        /// Copy the object here.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
    /// Show the product (needs root): meshed pods A and B (from the mesh's injector output,
    /// passed through `probe-bypass rewrite --replace-mesh-init`) and pod C, called behind the
    /// mesh's iptables rules and behind the agent's eBPF datapath, as a table.
    Demo {
        /// Show only the healthcheck on 15904 (the agent with `--datapath none`).
        #[arg(long, conflicts_with = "keep")]
        healthcheck_only: bool,
        /// Leave the datapath's node up after the table, print commands to poke at it, and tear
        /// it down on Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Run every test, the privileged ones included (needs root for those).
    Test,
    /// A one-node Kubernetes cluster of upstream components on this machine, with probe-bypass
    /// installed from deploy/ and a namespace of meshed pods (needs root).
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
    /// Check that the agent's modules import nothing from a higher layer (see ARCHITECTURE.md).
    Layers,
    /// Build the agent's container image: an OCI archive for `kind load image-archive` or
    /// `skopeo copy`, holding the agent as a static binary and nothing else.
    Image {
        /// Where to write the archive [default: <target dir>/image/probe-bypass-<version>.oci.tar].
        #[arg(long, value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Measure the agent against a baseline run in the same invocation (every benchmark when
    /// none is named).
    Bench {
        #[command(subcommand)]
        which: Option<bench::Which>,
    },
    /// The demo's app: accepts and closes connections on ADDR (run inside a pod's namespace).
    #[command(hide = true)]
    DemoApp {
        #[arg(long)]
        listen: SocketAddr,
    },
}

fn main() -> Result<()> {
    let Cli { command } = Cli::parse();
    match command {
        Task::Setup => setup::ensure(),
        Task::BuildEbpf { no_log, out } => build_ebpf::run(no_log, out),
        Task::Demo {
            healthcheck_only,
            keep,
        } => {
            if healthcheck_only {
                demo::run()
            } else {
                demo::run_mesh(keep)
            }
        }
        Task::Test => test::run(),
        Task::Cluster { action } => cluster::run(action),
        Task::Layers => layers::run(),
        Task::Image { output } => image::run(output),
        Task::Bench { which } => bench::run(which),
        Task::DemoApp { listen } => demo::app(listen),
    }
}

/// The workspace's root directory, whatever directory the command was started from.
pub fn workspace_root() -> PathBuf {
    let xtask = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask.parent().unwrap_or(xtask).to_path_buf()
}

/// Where cargo puts what it builds: CARGO_TARGET_DIR (relative to where we were started), else
/// the workspace's target/.
pub fn target_dir() -> Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => Ok(std::env::current_dir()
            .context("failed to read the current directory")?
            .join(dir)),
        None => Ok(workspace_root().join("target")),
    }
}

/// Runs a command to the end and fails, naming it, unless it succeeds.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Runs cargo (the one that runs this xtask) in the workspace root with `args`.
pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// [`cargo`] with `env` added to its environment.
pub fn cargo_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(workspace_root());
    command.envs(env.iter().copied());
    run(&mut command)
}
