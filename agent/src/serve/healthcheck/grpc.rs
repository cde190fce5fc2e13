//! A gRPC probe rewritten to the healthcheck: the agent runs the original gRPC health check from
//! inside the pod and answers 200 (SERVING) or 503 with why not.
//!
//! The request carries only the original probe's port and service. The pod's original-probes
//! record tells which probe that is: the health check is bounded by its `timeoutSeconds`, as the
//! kubelet bounds the original, and counted under its container and kind. A pod with no record
//! (FSM's injector rewrote it) is bounded by `--dial-timeout` and counted under kind `unknown`.

use std::{net::SocketAddr, sync::Arc};

use super::{Context, Outcome, http::Response};
use crate::{
    netns::Netns,
    pod::Pod,
    serve::prober::{self, DEFAULT_USER_AGENT, NetnsConnector, Protocol, Verdict, grpc::GrpcProbe},
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
    let recorded = pod.recorded(|original, _| {
        original.grpc.as_ref().is_some_and(|grpc| {
            i64::from(port) == i64::from(grpc.port)
                && grpc.service.as_deref().unwrap_or_default() == service
        })
    });
    let probe = GrpcProbe {
        addr: SocketAddr::new(pod.ip, port),
        service,
        timeout: recorded.timeout.unwrap_or(ctx.settings.dial_timeout),
    };
    let connector = NetnsConnector::new(ctx.worker.clone(), Arc::clone(netns));
    let user_agent = user_agent.unwrap_or(DEFAULT_USER_AGENT);
    let outcome = prober::grpc::probe(&connector, &probe, user_agent).await;
    let (container, kind) = recorded.labels();
    ctx.metrics
        .prober(&pod.key, container, kind, Protocol::Grpc, &outcome);
    let (result, status) = match outcome.verdict {
        Verdict::Success | Verdict::Warning => (Outcome::Success, 200),
        Verdict::Timeout => (Outcome::Timeout, 503),
        Verdict::Failure => (Outcome::Failed, 503),
    };
    (result, Response::new(status, outcome.message))
}
