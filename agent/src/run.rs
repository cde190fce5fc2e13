//! `probe-bypass run`: wires the pod source, the listeners and the admin endpoints together.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::NodeStatus,
    admin::{self, Admin, access::Reviewer},
    cli::{DatapathArgs, PodSourceError, ProbeBypassFrom, RunArgs, SelectedSource},
    datapath::{
        self, Datapath, DatapathError, DatapathMode, KubeletCgroup, ProbeBypass, SharedDatapath,
    },
    discovery::ProcLookup,
    error::error_chain,
    exclusions::Exclusions,
    listen,
    netns::{NetnsError, NetnsWorker},
    preflight::{self, PreflightFailed, Report},
    reconcile::Reconciler,
    serve::healthcheck::{Context, Settings, status::AgentStatus},
    serve::metrics::Metrics,
    serving_cert::{self, CertError, CertFiles},
    signal,
    source::{
        PodSource, kube,
        manifests::{self, SourceError},
    },
};

/// How long probes in flight may take to finish after SIGTERM; the agent exits within 5 s.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on the admin address {addr}: {source}")]
    AdminBind { addr: SocketAddr, source: io::Error },
    #[error("cannot listen on the admin socket {}: {source}", path.display())]
    AdminSocket { path: PathBuf, source: io::Error },
    #[error("the HTTPS admin address's certificate: {0}")]
    AdminCert(#[from] CertError),
    #[error("the HTTPS admin address's TLS set-up: {0}")]
    AdminTls(#[from] rustls::Error),
    #[error(
        "--secure-admin-addr checks its callers' tokens with the Kubernetes API server, which \
         cannot be reached: {0}"
    )]
    AdminApi(kube::SourceError),
    #[error(transparent)]
    PodSource(#[from] PodSourceError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Kube(#[from] kube::SourceError),
    #[error("the Kubernetes pod source stopped before it listed this node's pods")]
    KubeSourceStopped,
    #[error("cannot enter network namespaces (the agent needs CAP_SYS_ADMIN; run it as root): {0}")]
    Netns(#[from] NetnsError),
    #[error("cannot install the SIGTERM/SIGINT handler: {0}")]
    Signal(io::Error),
    #[error(transparent)]
    Preflight(#[from] PreflightFailed),
    #[error("cannot install the eBPF datapath: {}", error_chain(.0))]
    Datapath(#[from] DatapathError),
}

/// Checks that the host allows what the agent is about to do: the capabilities the pod source
/// needs and, with the eBPF datapath, everything the datapath needs (then mounting bpffs if
/// needed). The report is the datapath's, `None` without it.
fn check_host(args: &DatapathArgs, source: PodSource) -> Result<Option<Report>, RunError> {
    let needs = preflight::needs(args.mode, source);
    if args.mode == DatapathMode::None {
        preflight::check_own_capabilities(&needs)?;
        return Ok(None);
    }
    let report = preflight::check(&needs, args.cgroup_root.as_deref(), &args.pin_path)?;
    log::info!("host checks passed: {report}");
    Ok(Some(report))
}

/// Who gets past the proxy on the probe ports, from `--probe-bypass-from`. A kubelet that cannot
/// be found leaves the host network namespace trusted, as `host` does, with a warning that says
/// why and what to pass.
fn probe_bypass(args: &DatapathArgs, proc_root: &Path, cgroup_root: &Path) -> ProbeBypass {
    match args.probe_bypass_from {
        ProbeBypassFrom::Host => ProbeBypass::Host,
        ProbeBypassFrom::Any => ProbeBypass::Any,
        ProbeBypassFrom::Kubelet => {
            let found = probe_bypass_quietly(args, proc_root, cgroup_root);
            match &found {
                ProbeBypass::Kubelet(kubelet) => log::info!(
                    "probe ports: only the kubelet's cgroup {} (id {}, level {}) gets past the \
                     proxy",
                    kubelet.path.display(),
                    kubelet.id,
                    kubelet.level
                ),
                other => log::warn!(
                    "--probe-bypass-from kubelet: {}; falling back to host (every caller in the \
                     host network namespace gets past the proxy on the probe ports) and looking \
                     again every {}s. Pass --kubelet-cgroup to name the kubelet's cgroup",
                    other.fallback().unwrap_or_default(),
                    KUBELET_RECHECK.as_secs()
                ),
            }
            found
        }
    }
}

/// How often the kubelet's cgroup is looked for again: it moves when the kubelet is restarted in
/// another unit, and one not found at start may appear.
const KUBELET_RECHECK: Duration = Duration::from_secs(10);

/// Looks for the kubelet's cgroup (under `cgroup_root`, where the datapath is attached) every
/// [`KUBELET_RECHECK`] until `stop`, and applies and logs a change.
async fn recheck_kubelet(
    args: DatapathArgs,
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    datapath: SharedDatapath,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(KUBELET_RECHECK) => {}
        }
        let found = probe_bypass_quietly(&args, &proc_root, &cgroup_root);
        let Ok(mut datapath) = datapath.lock() else {
            return;
        };
        let current = &datapath.settings().probe_bypass;
        if *current == found || (current.fallback().is_some() && found.fallback().is_some()) {
            continue;
        }
        match &found {
            ProbeBypass::Kubelet(kubelet) => log::info!(
                "the kubelet's cgroup is now {} (id {}, level {}): only it gets past the proxy",
                kubelet.path.display(),
                kubelet.id,
                kubelet.level
            ),
            other => log::warn!(
                "the kubelet's cgroup is gone ({}): falling back to host",
                other.fallback().unwrap_or("no reason")
            ),
        }
        if let Err(error) = datapath.set_probe_bypass(found) {
            log::error!("applying the kubelet's cgroup to the datapath: {error}");
        }
    }
}

/// [`probe_bypass`] for `kubelet`, without its logging.
fn probe_bypass_quietly(args: &DatapathArgs, proc_root: &Path, cgroup_root: &Path) -> ProbeBypass {
    let found = match &args.kubelet_cgroup {
        Some(path) => KubeletCgroup::at(path),
        None => KubeletCgroup::find(proc_root, cgroup_root),
    };
    found.map_or_else(ProbeBypass::KubeletNotFound, ProbeBypass::Kubelet)
}

/// Installs the datapath the host checks passed for (or adopts the one a previous agent pinned).
fn install_datapath(
    args: &DatapathArgs,
    proc_root: &Path,
    host: Option<Report>,
    stop: CancellationToken,
) -> Result<Option<SharedDatapath>, RunError> {
    let Some(report) = host else {
        log::info!("--datapath none: the mesh's own iptables rules stay in charge of redirects");
        return Ok(None);
    };
    let settings = datapath::Settings {
        proxy_uid: args.proxy_uid,
        inbound_port: args.proxy_inbound_port,
        outbound_port: args.proxy_outbound_port,
        probe_ports: args.probe_ports.clone(),
        probe_bypass: probe_bypass(args, proc_root, &report.cgroup_root),
        sk_msg: args.sk_msg,
        node: Exclusions {
            inbound_ports: args.inbound_port_exclusion_list.clone(),
            outbound_ports: args.outbound_port_exclusion_list.clone(),
            outbound_ip_ranges: args.outbound_ip_range_exclusion_list.clone(),
            outbound_ip_range_inclusions: args.outbound_ip_range_inclusion_list.clone(),
        },
        proc_root: proc_root.to_path_buf(),
    };
    let programs = datapath::Programs {
        object: args.ebpf_object.clone(),
        log: datapath::kernel_log_level(),
    };
    let (datapath, kernel_log) =
        Datapath::install_with(&report.cgroup_root, &args.pin_path, settings, &programs)?;
    log::info!(
        "eBPF datapath attached to {} (pinned in {}; {} pods carried over from an earlier agent)",
        report.cgroup_root.display(),
        args.pin_path.display(),
        datapath.pods().len()
    );
    if let Some(path) = &programs.object {
        log::info!("kernel programs loaded from {}", path.display());
    }
    if let Some(kernel_log) = kernel_log {
        log::info!(
            "the kernel programs log their decisions under {} (--ebpf-log, RUST_LOG)",
            probe_bypass_common::names::LOG_TARGET
        );
        tokio::spawn(kernel_log.drain(stop));
    }
    Ok(Some(Arc::new(Mutex::new(datapath))))
}

/// The client of the API server, made at its first use and shared after.
async fn api_client(
    client: &mut Option<::kube::Client>,
) -> Result<::kube::Client, kube::SourceError> {
    if let Some(client) = client {
        return Ok(client.clone());
    }
    Ok(client.insert(kube::client().await?).clone())
}

/// The HTTPS admin address, bound, and what it is served with.
struct SecureAdmin {
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    /// The certificate, for the log.
    cert: String,
}

/// Binds `--secure-admin-addr` (beside another agent's, as the plain-HTTP one) and loads its
/// certificate, or makes a self-signed one.
fn bind_secure_admin(args: &RunArgs, addr: SocketAddr) -> Result<SecureAdmin, RunError> {
    let listener = listen::shared(addr)
        .and_then(TcpListener::from_std)
        .map_err(|source| RunError::AdminBind { addr, source })?;
    let (cert, described) = match (&args.admin_tls_cert, &args.admin_tls_key) {
        (Some(cert), Some(key)) => (
            serving_cert::load_and_watch(CertFiles {
                cert: cert.clone(),
                key: key.clone(),
            })?,
            format!("{} and key {}", cert.display(), key.display()),
        ),
        _ => {
            let mut names = vec!["localhost".to_owned()];
            names.extend(
                std::env::var("NODE_NAME")
                    .ok()
                    .filter(|name| !name.is_empty()),
            );
            if !addr.ip().is_unspecified() {
                names.push(addr.ip().to_string());
            }
            let described = format!("self-signed for {} (no --admin-tls-cert)", names.join(", "));
            (serving_cert::self_signed(names)?, described)
        }
    };
    Ok(SecureAdmin {
        listener,
        tls: Arc::new(admin::tls_config(cert)?),
        cert: described,
    })
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    log::info!(
        "probe-bypass {} starting with {args:?}",
        env!("CARGO_PKG_VERSION")
    );
    let source = args.pods.select()?;
    let host = check_host(&args.datapath, source.kind())?;
    let worker = NetnsWorker::spawn()?;
    // SO_REUSEPORT: during a rolling update the new agent binds the port beside the old one
    // (issue 4); the probes ask each agent on its own socket instead.
    let admin_listener = listen::shared(args.admin_addr)
        .and_then(TcpListener::from_std)
        .map_err(|source| RunError::AdminBind {
            addr: args.admin_addr,
            source,
        })?;
    let admin_socket = args
        .admin_socket
        .as_ref()
        .map(|path| match admin::bind_socket(path) {
            Ok(listener) => Ok((listener, path)),
            Err(source) => Err(RunError::AdminSocket {
                path: path.clone(),
                source,
            }),
        })
        .transpose()?;
    let mut api = None;
    let secure_admin = match args.secure_admin_addr {
        Some(addr) => {
            let bound = bind_secure_admin(&args, addr)?;
            let client = api_client(&mut api).await.map_err(RunError::AdminApi)?;
            Some((bound, addr, Reviewer::new(client)))
        }
        None => None,
    };
    let mut metrics = Metrics::default();
    let (mut pods, listing) = match source {
        SelectedSource::Manifests { dir } => (manifests::watch(&dir)?, false),
        SelectedSource::Kube { node_name } => {
            let client = api_client(&mut api).await?;
            let lookup = Arc::new(ProcLookup::new(
                args.pods.proc_root.clone(),
                args.datapath.cgroup_root.clone(),
                worker.clone(),
            ));
            let settings = kube::Settings {
                node_name,
                mesh: args.pods.mesh(args.datapath.proxy_uid),
            };
            log::info!(
                "watching the pods of node {}; meshed: {}",
                settings.node_name,
                settings.mesh
            );
            let kube_metrics = kube::KubeMetrics::default();
            metrics.register_kube(&kube_metrics);
            let pods = kube::watch(client, settings, lookup, kube_metrics);
            (pods, true)
        }
    };
    let mut shutdown = pin!(signal::shutdown_requested());
    // Where the datapath is attached: the kubelet's cgroup is looked for under it again later.
    let cgroup_root = host.as_ref().map(|report| report.cgroup_root.clone());
    let stop = CancellationToken::new();
    let datapath = install_datapath(&args.datapath, &args.pods.proc_root, host, stop.clone())?;
    if let Some(datapath) = &datapath {
        metrics.register_datapath(Arc::clone(datapath));
    }
    let metrics = Arc::new(metrics);
    let (status_tx, status) = watch::channel(NodeStatus::default());
    let admin = Arc::new(Admin {
        metrics: Arc::clone(&metrics),
        status,
        ready_grace: args.ready_grace,
        datapath: datapath.clone(),
    });
    if let (Some(datapath), Some(cgroup_root)) = (&datapath, cgroup_root)
        && args.datapath.probe_bypass_from == ProbeBypassFrom::Kubelet
    {
        tokio::spawn(recheck_kubelet(
            args.datapath.clone(),
            args.pods.proc_root.clone(),
            cgroup_root,
            Arc::clone(datapath),
            stop.clone(),
        ));
    }
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&admin),
        stop.clone(),
    ));
    log::info!("admin endpoints on http://{}", args.admin_addr);
    if !args.admin_addr.ip().is_loopback() {
        log::warn!(
            "--admin-addr {} is not a loopback address: it names the node's pods to every caller \
             that reaches it; give Prometheus --secure-admin-addr instead",
            args.admin_addr
        );
    }
    if let Some((bound, addr, reviewer)) = secure_admin {
        tokio::spawn(admin::serve_tls(
            bound.listener,
            bound.tls,
            Arc::new(reviewer),
            Arc::clone(&admin),
            stop.clone(),
        ));
        log::info!(
            "and on https://{addr}, where /metrics and the pods /health/ready names need a \
             bearer token the API server allows; certificate {}",
            bound.cert
        );
    }
    if let Some((listener, path)) = admin_socket {
        tokio::spawn(admin::serve(listener, admin, stop.clone()));
        log::info!("and on the Unix socket {}", path.display());
    }
    if listing {
        // Until the first list is in, the pods an earlier agent left in the datapath would look
        // gone; the agent stays not ready meanwhile, and may be stopped.
        tokio::select! {
            listed = pods.changed() => listed.map_err(|_| RunError::KubeSourceStopped)?,
            signal = &mut shutdown => {
                let signal = signal.map_err(RunError::Signal)?;
                log::info!("{signal} before the first list of this node's pods: stopping");
                stop.cancel();
                return Ok(());
            }
        }
    }
    let ctx = Arc::new(Context {
        settings: Settings {
            port: args.healthcheck_port,
            serve_http_probes: args.serve_http_probes,
            allow_any_port: args.allow_any_port,
            tcp_target: args.tcp_target,
            dial_timeout: args.dial_timeout,
            header_timeout: args.header_read_timeout,
        },
        metrics: Arc::clone(&metrics),
        worker,
        tracker: TaskTracker::new(),
        status: AgentStatus {
            node: args.pods.node_name.clone(),
            agent_pod: std::env::var("POD_NAME")
                .ok()
                .filter(|name| !name.is_empty()),
            datapath: match args.datapath.mode {
                DatapathMode::Ebpf => "ebpf",
                DatapathMode::None => "none",
            },
        },
        reuseport: datapath.as_ref().and_then(|datapath| {
            datapath
                .lock()
                .ok()
                .map(|datapath| datapath.reuseport_program())
        }),
    });
    let reconciler = tokio::spawn(
        Reconciler::new(Arc::clone(&ctx), datapath, status_tx).run(pods, stop.clone()),
    );

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
    log::info!("stopped; the eBPF datapath (if any) stays attached, pinned, for the next agent");
    Ok(())
}
