use std::{io::Write as _, process::ExitCode, time::Duration};

use clap::Parser as _;
use probe_bypass::{
    admin::health::{self, HealthError},
    cli::{Cli, Command, HealthArgs, RewriteArgs, UninstallArgs},
};
use probe_bypass_rewrite::manifest;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => {
            init_log(args.datapath.ebpf_log);
            serve(probe_bypass::run::run(*args))
        }
        Command::Uninstall(args) => {
            init_log(None);
            uninstall(&args)
        }
        Command::Health(args) => ask_health(&args),
        Command::MountBpffs(args) => mount_bpffs(&args.at),
        Command::Rewrite(args) => rewrite(&args),
        Command::Webhook(args) => {
            init_log(None);
            serve(probe_bypass::webhook::run(args))
        }
        Command::Validate(args) => probe_bypass::validate::main(&args),
    }
}

/// `probe-bypass rewrite`: the rewritten manifest on stdout, warnings on stderr; on an error,
/// nothing on stdout.
fn rewrite(args: &RewriteArgs) -> ExitCode {
    let output = manifest::read_input(&args.file)
        .and_then(|input| manifest::rewrite_manifests_with(&input, &args.options()));
    match output {
        Ok(output) => {
            for warning in &output.warnings {
                eprintln!("warning: {warning}");
            }
            let text = if args.diff {
                let name = args.file.display().to_string();
                similar::TextDiff::from_lines(&output.original, &output.manifest)
                    .unified_diff()
                    .header(&name, &format!("{name} (rewritten)"))
                    .to_string()
            } else {
                output.manifest
            };
            // A closed pipe (`| head`) is the reader's choice, not a reason to panic.
            match std::io::stdout().write_all(text.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: cannot write the manifest: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `probe-bypass mount-bpffs`: mounts bpffs unless it is there, and says which it was.
fn mount_bpffs(at: &std::path::Path) -> ExitCode {
    match probe_bypass::preflight::mount_bpffs(at) {
        Ok(true) => {
            println!("mounted bpffs on {}", at.display());
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("{} is bpffs already", at.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{}", probe_bypass::error::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr as `RUST_LOG` says (`info` by default); `ebpf_log` (`--ebpf-log`), when given,
/// sets the level of the kernel programs' target over it.
fn init_log(ebpf_log: Option<log::LevelFilter>) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(level) = ebpf_log {
        builder.filter_module(probe_bypass_common::names::LOG_TARGET, level);
    }
    builder.init();
}

/// Runs `probe-bypass run` or `webhook`, until SIGTERM or SIGINT, on a multi-threaded runtime,
/// logging to stderr (set up by the caller); its error is logged.
fn serve<E: std::fmt::Display>(command: impl Future<Output = Result<(), E>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            log::error!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(command);
    // Connections still open after the grace period are dropped here, not waited for.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// `probe-bypass health`: prints the agent's answer, which the kubelet puts in the probe's event;
/// exits 0 on 200, 1 on any other answer, 2 when the agent cannot be reached. No log set-up: the
/// output is the answer or the one problem.
fn ask_health(args: &HealthArgs) -> ExitCode {
    match health::ask(&args.socket, args.ready) {
        Ok(answer) => {
            print!("{}", answer.body);
            if answer.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("{error}");
            match error {
                HealthError::Connect { .. } => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `probe-bypass uninstall`: removes the agent's pins, which detaches its programs.
fn uninstall(args: &UninstallArgs) -> ExitCode {
    let pins = args.pin_path.as_path();
    // The datapath is all that sends these pods' traffic through their sidecars.
    let dependents = match probe_bypass::datapath::dependents(pins) {
        Ok(pods) => pods,
        Err(error) if args.force => {
            log::warn!(
                "cannot read which pods depend on the datapath ({}); removing it anyway (--force)",
                probe_bypass::error::error_chain(&error)
            );
            Vec::new()
        }
        Err(error) => {
            log::error!(
                "cannot read which pods depend on the datapath, so it is left in place: {}; \
                 pass --force to remove it anyway",
                probe_bypass::error::error_chain(&error)
            );
            return ExitCode::FAILURE;
        }
    };
    if !dependents.is_empty() {
        let pods = dependents.join(", ");
        let count = dependents.len();
        if !args.force {
            log::error!(
                "{count} pod(s) depend on the datapath: their mesh's iptables init container was \
                 replaced, so removing it would leave their traffic unprotected: {pods}. Turn \
                 --replace-mesh-init off in the webhook, restart these workloads so that the \
                 mesh's injector puts its init container back, then uninstall again; or pass \
                 --force to remove it now. The datapath is left in place."
            );
            return ExitCode::FAILURE;
        }
        log::warn!(
            "removing the datapath although {count} pod(s) depend on it (--force): their traffic \
             no longer goes through their sidecars until they are restarted with the mesh's own \
             init container: {pods}"
        );
    }
    match probe_bypass::datapath::uninstall(pins) {
        Ok(report) => {
            for path in &report.removed {
                log::info!("removed {}", path.display());
            }
            if report.removed.is_empty() {
                log::info!("nothing to remove under {}", pins.display());
            }
            for path in &report.left {
                log::warn!("left {}: not the agent's", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            log::error!(
                "uninstall failed: {}",
                probe_bypass::error::error_chain(&error)
            );
            ExitCode::FAILURE
        }
    }
}
