//! The HTTP-to-TCP healthcheck: what a rewritten tcpSocket probe reaches on port 15904.
//!
//! One listener per pod, inside the pod's network namespace, all served by this process. A request
//! names the original probe's port in `Original-Tcp-Port`; the agent connects to that port from
//! inside the pod, as the kubelet's own tcpSocket probe would, and answers 200 or 503. A rewritten
//! gRPC probe asks `/probe-bypass-grpc` with `Original-Grpc-Port` (and `Original-Grpc-Service`);
//! the agent runs the gRPC health check from inside the pod ([`grpc`]) and answers 200 or 503.
//!
//! `GET /probe-bypass-status` tells the pod's validation init container which agent serves it
//! ([`status`]).
//!
//! With `--serve-http-probes` each pod also gets a listener on each of 15901-15903, which answers
//! the pod's rewritten httpGet probes of that port's kind ([`probes`]).

mod grpc;
mod handler;
pub mod http;
mod listener;
mod probes;
pub mod status;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

pub use listener::{Context, Endpoint, bind, serve};

/// What a request read by [`http::read_request`] asks of a pod, on the healthcheck's port and on a
/// probe kind's, for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::{
        handler::{HEADERS, Rejection, Route, route},
        probes::route as probes_route,
    };
}

/// Which address of the pod a probe connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcpTarget {
    /// The pod's IP, as the kubelet's tcpSocket probe does.
    PodIp,
    /// 127.0.0.1 (::1 for an IPv6 pod), as FSM's and OSM's healthcheck containers do.
    Loopback,
    /// The pod's IP, then loopback: passes if the app listens on either.
    Either,
}

impl TcpTarget {
    /// The addresses to try, in order.
    pub fn addrs(self, pod_ip: IpAddr, port: u16) -> Vec<SocketAddr> {
        let loopback = match pod_ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        let ips = match self {
            Self::PodIp => vec![pod_ip],
            Self::Loopback => vec![loopback],
            Self::Either => vec![pod_ip, loopback],
        };
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    }
}

/// How the healthcheck behaves, from the command line.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Port of the listener in each pod.
    pub port: u16,
    /// Also listen on 15901-15903 in each pod and answer its rewritten httpGet probes.
    pub serve_http_probes: bool,
    /// Dial any port asked for, not only those the pod's probes name (the peers' behaviour).
    pub allow_any_port: bool,
    pub tcp_target: TcpTarget,
    /// Bound on the whole connect, over every address tried; and on a whole gRPC health check.
    pub dial_timeout: Duration,
    /// Bound on reading a request head.
    pub header_timeout: Duration,
}

/// How a healthcheck request ended, as counted in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The probed port accepted a connection: 200.
    Success,
    /// The probed port refused: 503.
    Refused,
    /// The probed port did not answer within the dial timeout: 503.
    Timeout,
    /// The connect failed otherwise, or the pod's namespace could not be used: 503.
    Error,
    /// The gRPC health check failed: the app is not SERVING, answered an error, or could not be
    /// reached: 503.
    Failed,
    BadRequest,
    Forbidden,
    NotFound,
    MethodNotAllowed,
}

impl Outcome {
    pub const ALL: [Self; 9] = [
        Self::Success,
        Self::Refused,
        Self::Timeout,
        Self::Error,
        Self::Failed,
        Self::BadRequest,
        Self::Forbidden,
        Self::NotFound,
        Self::MethodNotAllowed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Error => "error",
            Self::Failed => "failed",
            Self::BadRequest => "bad_request",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }
}

/// How a TLS connection on a probe port (an HTTPS probe in the osm shape) ended, as counted in
/// `probe_bypass_prober_passthrough_total`: the app's answer travels encrypted, so the agent knows
/// only whether it relayed the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passthrough {
    /// Connected to the app and relayed both ways until either side closed.
    Relayed,
    /// The app's port could not be connected to: the kubelet's probe fails.
    Refused,
    /// The relay outlasted the probe's timeout and a second.
    Timeout,
    /// The pod records no HTTPS probe of the port's kind: closed.
    NoProbe,
    /// Several containers' HTTPS probes of the kind name different ports: closed.
    Ambiguous,
}

impl Passthrough {
    pub const ALL: [Self; 5] = [
        Self::Relayed,
        Self::Refused,
        Self::Timeout,
        Self::NoProbe,
        Self::Ambiguous,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Relayed => "relayed",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::NoProbe => "no_probe",
            Self::Ambiguous => "ambiguous",
        }
    }
}
