//! A gRPC probe rewritten to the healthcheck: the agent runs the original gRPC health check from
//! inside the pod and answers 200 (SERVING) or 503 with why not.
//!
//! The request carries only the original probe's port and service, not its `timeoutSeconds`: the
//! kubelet's own timeout bounds its request to the healthcheck, and the agent bounds the health
//! check with its dial timeout (`--dial-timeout`). An app whose health check answers slower than
//! that fails here even when its probe's timeout would have allowed it: raise `--dial-timeout`.

use std::{net::SocketAddr, sync::Arc};

use super::{Context, Outcome, http::Response};
use crate::{
    netns::Netns,
    pod::Pod,
    prober::{
        self, DEFAULT_USER_AGENT, NetnsConnector, ProbeKind, Protocol, Verdict, grpc::GrpcProbe,
    },
};

/// Runs the health check of `service` on `port` of `pod`, at the pod IP as the kubelet does, and
/// counts it. `user_agent` is the kubelet's, passed on to the app.
pub async fn check(
    ctx: &Context,
    pod: &Pod,
    netns: &Arc<Netns>,
    port: u16,
    service: String,
    user_agent: Option<&str>,
) -> (Outcome, Response) {
    let probe = GrpcProbe {
        addr: SocketAddr::new(pod.ip, port),
        service,
        timeout: ctx.settings.dial_timeout,
    };
    let connector = NetnsConnector::new(ctx.worker.clone(), Arc::clone(netns));
    let user_agent = user_agent.unwrap_or(DEFAULT_USER_AGENT);
    let outcome = prober::grpc::probe(&connector, &probe, user_agent).await;
    // The request names neither the container nor the kind of probe.
    ctx.metrics
        .prober(&pod.key, "", ProbeKind::Unknown, Protocol::Grpc, &outcome);
    let (result, status) = match outcome.verdict {
        Verdict::Success | Verdict::Warning => (Outcome::Success, 200),
        Verdict::Timeout => (Outcome::Timeout, 503),
        Verdict::Failure => (Outcome::Failed, 503),
    };
    (result, Response::new(status, outcome.message))
}
