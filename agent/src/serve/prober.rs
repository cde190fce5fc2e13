//! Probes answered by the agent (issue 6): a pod's original httpGet and gRPC probes, run by the
//! agent from inside the pod's network namespace with the kubelet's rules
//! (`shared/reference/peers.md` §5), so that a probe rewritten to one of the agent's ports passes or
//! fails as the original would have without a mesh in the way.
//!
//! - [`http`]: httpGet probes, HTTP and HTTPS.
//! - [`grpc`]: gRPC probes, `grpc.health.v1.Health/Check` over plaintext HTTP/2.
//!
//! Both connect through a [`Connector`]; in the agent that is a [`NetnsConnector`], which makes the
//! connection from inside the pod. Both return an [`Outcome`], which the caller answers with and
//! counts in metrics ([`Metrics::prober`](crate::serve::metrics::Metrics::prober)).

pub mod grpc;
mod health_proto;
pub mod http;
mod redirect;
mod tls;

use std::{future::Future, net::SocketAddr, pin::pin, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::{
    dial::{StreamError, connect_stream},
    netns::{Netns, NetnsWorker},
};

/// The prober's parsers of what an app sends, for the fuzz targets in `fuzz/`: the gRPC health
/// response's framing and where a redirect leads.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::{
        health_proto::{DecodeError, ServingStatus, decode_response},
        redirect::{Decision, MAX_REQUESTS, RedirectError, Scheme, Url, decide},
    };
}

/// What the kubelet makes of a probe's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Success,
    /// A success the kubelet records a warning event for: an HTTP probe that ended on a redirect it
    /// does not follow.
    Warning,
    /// The app answered, and the answer is a failure; or the connection failed.
    Failure,
    /// No complete answer within the probe's timeout: a failure to the kubelet.
    Timeout,
}

impl Verdict {
    pub const ALL: [Self; 4] = [Self::Success, Self::Warning, Self::Failure, Self::Timeout];

    /// Whether the kubelet counts the probe as passed.
    pub fn passed(self) -> bool {
        matches!(self, Self::Success | Self::Warning)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Warning => "warning",
            Self::Failure => "failure",
            Self::Timeout => "timeout",
        }
    }
}

/// How one probe ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The status of the last HTTP response, for an HTTP probe that got one: the caller passes it
    /// through to the kubelet.
    pub status: Option<u16>,
    /// What happened, for the caller's answer and log.
    pub message: String,
    /// From the start of the probe to its outcome.
    pub latency: Duration,
}

/// What a probe speaks, as counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Http,
    Https,
    Grpc,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
            Self::Grpc => "grpc",
        }
    }
}

/// The User-Agent to send when the kubelet's own is not known: the kubelet sends
/// `kube-probe/<major>.<minor>`, and a caller that received a probe from the kubelet passes its
/// User-Agent on instead, so the app sees the kubelet's version.
pub const DEFAULT_USER_AGENT: &str = "kube-probe";

/// Makes the TCP connections a probe talks over. The probe bounds the whole of its time, so a
/// connector need not.
pub trait Connector: Sync {
    /// The connection: a [`TcpStream`] in the agent; any byte stream a probe can talk over.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn connect(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = Result<Self::Stream, StreamError>> + Send;
}

/// The agent's connector: connections made from inside a pod's network namespace, like the app's
/// own connections to itself. The mesh's rules leave a connection to the pod's own IP or loopback
/// alone (it stays on `lo`; `shared/reference/peers.md` §4), so the probe reaches the app directly
/// instead of the sidecar, as the kubelet's probe does from outside when nothing is in the way.
#[derive(Clone, Debug)]
pub struct NetnsConnector {
    worker: NetnsWorker,
    netns: Arc<Netns>,
}

impl NetnsConnector {
    pub fn new(worker: NetnsWorker, netns: Arc<Netns>) -> Self {
        Self { worker, netns }
    }
}

impl Connector for NetnsConnector {
    type Stream = TcpStream;

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, StreamError> {
        connect_stream(&self.worker, &self.netns, addr).await
    }
}

/// Runs `exchange` while `connection` does the I/O of the hyper connection it talks over. The
/// connection may finish first, once the server has sent everything and closed, with the response
/// still waiting for `exchange` to read it; and if the connection fails, `exchange` fails with its
/// error. Both run in the caller's task, so a probe's timeout drops the connection with it.
async fn alongside<T, E>(
    connection: impl Future<Output = Result<(), E>>,
    exchange: impl Future<Output = T>,
) -> T {
    let mut exchange = pin!(exchange);
    tokio::select! {
        result = &mut exchange => result,
        _ = connection => exchange.await,
    }
}
