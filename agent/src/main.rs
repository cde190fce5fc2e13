use std::{process::ExitCode, time::Duration};

use clap::Parser as _;
use probe_bypass::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(probe_bypass::run::run(*args)),
        Command::Uninstall(args) => return uninstall(&args.pin_path),
    };
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

/// `probe-bypass uninstall`: removes the agent's pins, which detaches its programs.
fn uninstall(pins: &std::path::Path) -> ExitCode {
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
                probe_bypass::run::error_chain(&error)
            );
            ExitCode::FAILURE
        }
    }
}
