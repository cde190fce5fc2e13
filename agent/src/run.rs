//! `probe-bypass run`: wires the pod source, the listeners and the admin endpoints together.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, Admin},
    cli::RunArgs,
    healthcheck::{Context, Settings},
    metrics::Metrics,
    netns::{NetnsError, NetnsWorker},
    reconcile::{NodeStatus, Reconciler},
    signal,
    source::manifests::{self, SourceError},
};

/// How long probes in flight may take to finish after SIGTERM; the agent exits within 5 s.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on the admin address {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot enter network namespaces (the agent needs CAP_SYS_ADMIN; run it as root): {0}")]
    Netns(#[from] NetnsError),
    #[error("cannot install the SIGTERM/SIGINT handler: {0}")]
    Signal(io::Error),
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    log::info!(
        "probe-bypass {} starting with {args:?}",
        env!("CARGO_PKG_VERSION")
    );
    let worker = NetnsWorker::spawn()?;
    let admin_listener =
        TcpListener::bind(args.admin_addr)
            .await
            .map_err(|source| RunError::AdminBind {
                addr: args.admin_addr,
                source,
            })?;
    let pods = manifests::watch(&args.pod_manifests)?;
    let shutdown = signal::shutdown_requested();
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context {
        settings: Settings {
            port: args.healthcheck_port,
            allow_any_port: args.allow_any_port,
            tcp_target: args.tcp_target,
            dial_timeout: args.dial_timeout,
            header_timeout: args.header_read_timeout,
        },
        metrics: Arc::clone(&metrics),
        worker,
        tracker: TaskTracker::new(),
    });
    let stop = CancellationToken::new();
    let (status_tx, status) = watch::channel(NodeStatus::default());
    let reconciler =
        tokio::spawn(Reconciler::new(Arc::clone(&ctx), status_tx).run(pods, stop.clone()));
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin { metrics, status }),
        stop.clone(),
    ));
    log::info!("admin endpoints on http://{}", args.admin_addr);

    let signal = shutdown.await.map_err(RunError::Signal)?;
    log::info!("{signal}: closing listeners; letting probes in flight finish");
    stop.cancel();
    if let Err(error) = reconciler.await {
        log::error!("the reconciler ended abnormally: {error}");
    }
    ctx.tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, ctx.tracker.wait())
        .await
        .is_err()
    {
        log::warn!(
            "{} probe connections still open after {SHUTDOWN_GRACE:?}; closing them",
            ctx.tracker.len()
        );
    }
    log::info!("stopped");
    Ok(())
}
