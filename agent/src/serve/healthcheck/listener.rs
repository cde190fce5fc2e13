//! A pod's listeners, the healthcheck's and (with `--serve-http-probes`) one per probe kind: bound
//! inside the pod's namespace, served from tokio.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use probe_bypass_rewrite::{ProbeKind, ports::resolve_port};
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    Outcome, Settings, grpc,
    handler::{HEADERS, Rejection, Route, route},
    http::{ReadError, Response, read_request, write_response},
    probes,
    status::{self, AgentStatus, STATUS_PATH},
};
use crate::{
    dial::{Dialed, Failure, dial},
    listen,
    netns::{Netns, NetnsError, NetnsWorker},
    pod::Pod,
    serve::metrics::Metrics,
};

/// How long an answered connection waits for the prober to close it. The side that closes first
/// keeps the TIME_WAIT entry; the kubelet closes as soon as it has read the response, so waiting
/// for it keeps those entries out of the pod. A prober that waits for the server to close instead
/// gets the close after this long.
const LINGER: Duration = Duration::from_secs(1);

/// What every pod's listener shares.
pub struct Context {
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub worker: NetnsWorker,
    /// Every connection in flight, so shutdown can let them finish.
    pub tracker: TaskTracker,
    /// What `GET /probe-bypass-status` says of this agent.
    pub status: AgentStatus,
    /// With the eBPF datapath: the sk_reuseport program each listener is given, so that a killed
    /// agent's queued connections go to the agent beside it ([`listen::migrate_on_close`]).
    pub reuseport: Option<Arc<OwnedFd>>,
}

/// What a listener answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// The healthcheck (15904): rewritten tcpSocket and gRPC probes.
    Healthcheck,
    /// The port of one kind of probe (15901-15903): rewritten httpGet probes of that kind.
    Probes(ProbeKind),
}

/// Opens a listener inside `netns`, on the wildcard address of the pod IP's family
/// (for IPv6, dual-stack). SO_REUSEPORT lets a new agent bind beside this one and take over.
pub async fn bind(
    ctx: &Context,
    netns: &Arc<Netns>,
    pod_ip: IpAddr,
    port: u16,
) -> Result<TcpListener, NetnsError> {
    let addr = match pod_ip {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
    };
    let reuseport = ctx.reuseport.clone();
    let listener = ctx
        .worker
        .run(netns, move || {
            let listener = listen::shared(addr)?;
            if let Some(program) = &reuseport
                && let Err(error) = listen::migrate_on_close(&listener, program.as_fd())
            {
                // The listener still works; only a killed agent's queue would be lost.
                log::warn!("{addr}: cannot attach the sk_reuseport program: {error}");
            }
            Ok(listener)
        })
        .await?;
    TcpListener::from_std(listener).map_err(|source| NetnsError::Op {
        path: netns.path().to_owned(),
        source,
    })
}

/// Accepts connections until `stop` fires. Each connection is answered with the pod as it is when
/// the request arrives, so a manifest change (new probe ports) applies without a new listener.
pub async fn serve(
    listener: TcpListener,
    endpoint: Endpoint,
    ctx: Arc<Context>,
    pod: watch::Receiver<Arc<Pod>>,
    netns: Arc<Netns>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let pod = Arc::clone(&pod.borrow());
                ctx.tracker.spawn(answer(
                    stream,
                    endpoint,
                    Arc::clone(&ctx),
                    pod,
                    Arc::clone(&netns),
                ));
            }
            Err(error) => {
                // Out of file descriptors or memory: back off instead of spinning.
                log::warn!("{}: accept failed: {error}", pod.borrow().key);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    endpoint: Endpoint,
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    netns: Arc<Netns>,
) {
    let settings = &ctx.settings;
    if let Endpoint::Probes(kind) = endpoint {
        match probes::starts_tls(&stream, settings.header_timeout).await {
            Some(true) => return probes::pass_through(stream, kind, &ctx, &pod, &netns).await,
            Some(false) => {}
            None => {
                log::debug!("{}: no request on the {kind} probe port", pod.key);
                return;
            }
        }
    }
    let (outcome, response, head_only) =
        match read_request(&mut stream, &HEADERS, settings.header_timeout).await {
            Ok(request) => {
                let head_only = request.method == "HEAD";
                let user_agent = request
                    .values("User-Agent")
                    .first()
                    .map(|value| String::from_utf8_lossy(value).into_owned());
                let user_agent = user_agent.as_deref();
                let routed = match endpoint {
                    // Answered, not routed: the status is no probe (and counts as a success).
                    Endpoint::Healthcheck if request.path == STATUS_PATH => Err(Rejection {
                        outcome: Outcome::Success,
                        response: status::answer(&ctx.status, &pod),
                    }),
                    Endpoint::Healthcheck => route(&request, &pod, settings.allow_any_port),
                    Endpoint::Probes(kind) => probes::route(&request, &pod, kind, settings),
                };
                let (outcome, response) = match routed {
                    Ok(Route::Tcp(port)) => probe(&ctx, &pod, &netns, port).await,
                    Ok(Route::Grpc { port, service }) => {
                        grpc::check(&ctx, &pod, &netns, port, service, user_agent).await
                    }
                    Ok(Route::Http(route)) => {
                        probes::check(&ctx, &pod, &netns, &route, user_agent).await
                    }
                    Err(rejection) => (rejection.outcome, rejection.response),
                };
                (outcome, response, head_only)
            }
            Err(error @ (ReadError::TooLarge | ReadError::Malformed(_))) => (
                Outcome::BadRequest,
                Response::new(400, error.to_string()),
                false,
            ),
            Err(error) => {
                log::debug!("{}: no request: {error}", pod.key);
                return;
            }
        };
    ctx.metrics.probe(&pod.key, outcome);
    log::debug!("{}: {} {}", pod.key, response.status, response.body);
    if let Err(error) = write_response(&mut stream, &response, head_only).await {
        log::debug!("{}: writing the response: {error}", pod.key);
        return;
    }
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Dials `port` of the pod and turns the result into the answer. The connect is bounded by the
/// `timeoutSeconds` of the recorded tcpSocket probe it stands for, as the kubelet bounds the
/// original's, or by `--dial-timeout` when the pod has no record of one.
async fn probe(ctx: &Context, pod: &Pod, netns: &Arc<Netns>, port: u16) -> (Outcome, Response) {
    let settings = &ctx.settings;
    let targets = settings.tcp_target.addrs(pod.ip, port);
    let recorded = pod.recorded(|original, ports| {
        original
            .tcp_socket
            .as_ref()
            .and_then(|tcp| resolve_port(&tcp.port, ports).ok())
            == Some(port)
    });
    let timeout = recorded.timeout.unwrap_or(settings.dial_timeout);
    let started = Instant::now();
    let dialed = dial(&ctx.worker, netns, &targets, timeout).await;
    let took = started.elapsed();
    match dialed {
        Ok(Dialed::Connected(addr)) => {
            ctx.metrics.dial(true, took);
            let body = format!("Successfully established connection to {addr}");
            (Outcome::Success, Response::new(200, body))
        }
        Ok(Dialed::Failed(failures)) => {
            ctx.metrics.dial(false, took);
            (
                failure_outcome(&failures),
                Response::new(503, describe_failures(&failures)),
            )
        }
        Err(error) => (
            Outcome::Error,
            Response::new(503, format!("Failed to dial from inside the pod: {error}")),
        ),
    }
}

fn failure_outcome(failures: &[(SocketAddr, Failure)]) -> Outcome {
    if failures
        .iter()
        .any(|(_, f)| matches!(f, Failure::TimedOut(_)))
    {
        Outcome::Timeout
    } else if failures.iter().all(|(_, f)| *f == Failure::Refused) {
        Outcome::Refused
    } else {
        Outcome::Error
    }
}

fn describe_failures(failures: &[(SocketAddr, Failure)]) -> String {
    let parts: Vec<String> = failures
        .iter()
        .map(|(addr, failure)| format!("{addr} ({failure})"))
        .collect();
    format!("Failed to establish connection to {}", parts.join(" or "))
}
