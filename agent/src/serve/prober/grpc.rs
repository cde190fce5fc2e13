//! gRPC probes, run as the kubelet runs them (kubernetes `pkg/probe/grpc`;
//! `shared/reference/peers.md` §5): one `grpc.health.v1.Health/Check` call for the probe's service
//! to the pod IP and the probe's port, over plaintext HTTP/2 (h2c, no TLS), within the probe's
//! timeout. Only `SERVING` passes. `NOT_SERVING`, `UNKNOWN`, `SERVICE_UNKNOWN`, a gRPC error
//! status (a server without the health service answers UNIMPLEMENTED, one that does not know the
//! service NOT_FOUND), a broken connection and the timeout all fail, each with its own message.
//!
//! One difference: the kubelet's gRPC client keeps retrying a refused connection until the timeout
//! and then reports a timeout; this prober reports the refusal at once. Either way the probe fails,
//! unless the app starts listening within that one timeout.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Request,
    body::Bytes,
    client::conn::http2,
    header::{CONTENT_TYPE, HeaderMap, HeaderValue, TE, USER_AGENT},
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::GRPCAction;

use super::{
    Connector, Outcome, Verdict, alongside,
    health_proto::{self, DecodeError, ServingStatus},
};
use crate::{dial::StreamError, error::error_chain};

/// The health service's one unary method.
const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// The largest response read: a health response is 7 bytes, and its trailers come apart.
const MAX_RESPONSE: usize = 16 * 1024;

/// gRPC status codes this prober tells apart.
const DEADLINE_EXCEEDED: u32 = 4;
const UNIMPLEMENTED: u32 = 12;

/// A gRPC probe, ready to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcProbe {
    /// The pod IP and the probe's port.
    pub addr: SocketAddr,
    /// The service to ask about; empty for the server's overall health.
    pub service: String,
    /// The probe's `timeoutSeconds`: a bound on the whole probe.
    pub timeout: Duration,
}

/// Why a gRPC probe cannot be run, or why it failed.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("port {0} is outside 1-65535")]
    Port(i32),
    #[error("mode {0:?} is not supported: the agent runs gRPC probes in plaintext only")]
    Mode(String),
    #[error(transparent)]
    Connect(#[from] StreamError),
    #[error("HTTP/2 with {addr}: {}", error_chain(.source))]
    Http2 {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("cannot build the request: {0}")]
    Request(String),
    #[error("the server answered HTTP status {0}, not a gRPC response")]
    HttpStatus(u16),
    #[error("reading the response: {0}")]
    Body(String),
    #[error("the response has no grpc-status")]
    NoStatus,
    #[error(
        "this server does not implement the gRPC health protocol (grpc.health.v1.Health): {message}"
    )]
    Unimplemented { message: String },
    #[error("health check failed with gRPC status {code} ({}): {message}", code_name(*.code))]
    Status { code: u32, message: String },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

impl GrpcProbe {
    /// The probe the kubelet runs for `action` in a pod with IP `pod_ip`.
    pub fn from_action(
        action: &GRPCAction,
        pod_ip: IpAddr,
        timeout: Duration,
    ) -> Result<Self, GrpcError> {
        if let Some(mode) = action
            .mode
            .as_deref()
            .filter(|mode| !mode.is_empty() && !mode.eq_ignore_ascii_case("plaintext"))
        {
            return Err(GrpcError::Mode(mode.to_owned()));
        }
        let port = u16::try_from(action.port)
            .ok()
            .filter(|port| *port != 0)
            .ok_or(GrpcError::Port(action.port))?;
        Ok(Self {
            addr: SocketAddr::new(pod_ip, port),
            service: action.service.clone().unwrap_or_default(),
            timeout,
        })
    }
}

/// Runs `probe`, connecting through `connector`, with `user_agent` (the kubelet's,
/// `kube-probe/<major>.<minor>`).
pub async fn probe<C: Connector>(connector: &C, probe: &GrpcProbe, user_agent: &str) -> Outcome {
    let started = Instant::now();
    let what = format!(
        "gRPC health check of service {:?} at {}",
        probe.service, probe.addr
    );
    let result = tokio::time::timeout(probe.timeout, check(connector, probe, user_agent)).await;
    let (verdict, message) = match result {
        Ok(Ok(ServingStatus::Serving)) => (Verdict::Success, format!("{what}: SERVING")),
        Ok(Ok(status)) => (
            Verdict::Failure,
            format!("{what}: service unhealthy ({status})"),
        ),
        Ok(Err(
            error @ GrpcError::Status {
                code: DEADLINE_EXCEEDED,
                ..
            },
        )) => (Verdict::Timeout, format!("{what}: {error}")),
        Ok(Err(error)) => (Verdict::Failure, format!("{what}: {error}")),
        Err(_) => (
            Verdict::Timeout,
            format!("{what}: no answer within {:?}", probe.timeout),
        ),
    };
    Outcome {
        verdict,
        status: None,
        message,
        latency: started.elapsed(),
    }
}

/// One `Check` call on a new connection.
async fn check<C: Connector>(
    connector: &C,
    probe: &GrpcProbe,
    user_agent: &str,
) -> Result<ServingStatus, GrpcError> {
    let addr = probe.addr;
    let http2 = |source| GrpcError::Http2 { addr, source };
    let stream = connector.connect(addr).await?;
    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(http2)?;
    let request = request(probe, user_agent)?;
    let call = async {
        let response = sender.send_request(request).await.map_err(http2)?;
        let (head, body) = response.into_parts();
        if head.status != hyper::StatusCode::OK {
            return Err(GrpcError::HttpStatus(head.status.as_u16()));
        }
        let collected = Limited::new(body, MAX_RESPONSE)
            .collect()
            .await
            .map_err(|error| GrpcError::Body(error_chain(error.as_ref())))?;
        // A call that fails at once may answer with headers only ("Trailers-Only").
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let code = grpc_status(&trailers).or_else(|| grpc_status(&head.headers));
        match code {
            Some(0) => Ok(health_proto::decode_response(&collected.to_bytes())?),
            Some(code) => {
                let message = grpc_message(&trailers)
                    .or_else(|| grpc_message(&head.headers))
                    .unwrap_or_default();
                Err(match code {
                    UNIMPLEMENTED => GrpcError::Unimplemented { message },
                    code => GrpcError::Status { code, message },
                })
            }
            None => Err(GrpcError::NoStatus),
        }
    };
    alongside(connection, call).await
}

fn request(probe: &GrpcProbe, user_agent: &str) -> Result<Request<Full<Bytes>>, GrpcError> {
    let invalid = |error: hyper::http::Error| GrpcError::Request(error.to_string());
    let mut request = Request::post(format!("http://{}{CHECK_PATH}", probe.addr))
        .header(CONTENT_TYPE, "application/grpc")
        .header(TE, "trailers")
        // The server may give up when the caller has: it knows the probe's timeout too.
        .header(
            "grpc-timeout",
            format!("{}m", probe.timeout.as_millis().clamp(1, 99_999_999)),
        )
        .body(Full::new(Bytes::from(health_proto::encode_request(
            &probe.service,
        ))))
        .map_err(invalid)?;
    if !user_agent.is_empty() {
        let value = HeaderValue::try_from(user_agent)
            .map_err(|error| GrpcError::Request(error.to_string()))?;
        request.headers_mut().insert(USER_AGENT, value);
    }
    Ok(request)
}

fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

fn grpc_message(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("grpc-message")?;
    Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
}

/// The name gRPC gives `code`, for messages.
fn code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|index| NAMES.get(index))
        .copied()
        .unwrap_or("not a gRPC code")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(port: i32, service: Option<&str>, mode: Option<&str>) -> GRPCAction {
        GRPCAction {
            port,
            service: service.map(str::to_owned),
            mode: mode.map(str::to_owned),
        }
    }

    #[test]
    fn probe_from_action_targets_the_pod_ip_and_defaults_to_the_empty_service() {
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let second = Duration::from_secs(1);
        let probe = GrpcProbe::from_action(&action(9090, None, None), ip, second).expect("valid");
        assert_eq!(probe.addr.to_string(), "10.1.2.3:9090");
        assert_eq!(probe.service, "");
        let named =
            GrpcProbe::from_action(&action(9090, Some("ready"), Some("Plaintext")), ip, second)
                .expect("valid");
        assert_eq!(named.service, "ready");
        for port in [0, -1, 65536] {
            assert!(matches!(
                GrpcProbe::from_action(&action(port, None, None), ip, second),
                Err(GrpcError::Port(_))
            ));
        }
        assert!(matches!(
            GrpcProbe::from_action(&action(9090, None, Some("TLS")), ip, second),
            Err(GrpcError::Mode(_))
        ));
    }

    #[test]
    fn request_is_a_grpc_call_with_the_kubelets_user_agent_and_deadline() {
        let probe = GrpcProbe {
            addr: "10.1.2.3:9090".parse().expect("addr"),
            service: "ready".into(),
            timeout: Duration::from_millis(1500),
        };
        let request = request(&probe, "kube-probe/1.31").expect("request");
        assert_eq!(
            request.uri(),
            "http://10.1.2.3:9090/grpc.health.v1.Health/Check"
        );
        assert_eq!(request.method(), hyper::Method::POST);
        let headers = request.headers();
        assert_eq!(headers[CONTENT_TYPE], "application/grpc");
        assert_eq!(headers[TE], "trailers");
        assert_eq!(headers[USER_AGENT], "kube-probe/1.31");
        assert_eq!(headers["grpc-timeout"], "1500m");
    }

    #[test]
    fn status_messages_name_the_code() {
        let error = GrpcError::Status {
            code: 5,
            message: "unknown service".into(),
        };
        assert_eq!(
            error.to_string(),
            "health check failed with gRPC status 5 (NOT_FOUND): unknown service"
        );
        assert_eq!(code_name(99), "not a gRPC code");
    }
}
