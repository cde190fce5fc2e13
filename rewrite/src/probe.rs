//! What an original probe asks the kubelet to check, read the way the kubelet reads it, before any
//! shape is chosen for the rewritten probe.

use k8s_openapi::{
    api::core::v1::{ContainerPort, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    ProbeKind,
    ports::{PortError, resolve_port},
    warning::Unchanged,
};
use crate::contract::{
    GRPC_HEALTHCHECK_PATH, HEALTHCHECK_PATHS, HEALTHCHECK_PORT, ORIGINAL_GRPC_PORT_HEADER,
    ORIGINAL_HTTP_PORT_HEADER, ORIGINAL_TCP_PORT_HEADER,
};

/// A check the rewriter moves behind the agent, its port resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Check<'a> {
    /// An httpGet probe; `https` when its scheme is HTTPS.
    Http { port: u16, https: bool },
    /// A tcpSocket probe.
    Tcp { port: u16 },
    /// A gRPC probe, with the service it asks about, if any.
    Grpc { port: u16, service: Option<&'a str> },
}

/// What to do with a probe.
#[derive(Debug, PartialEq)]
pub(super) enum Plan<'a> {
    /// Rewrite it to run this check through the agent.
    Rewrite(Check<'a>),
    /// Leave it alone, silently: an exec probe (the kubelet runs it inside the container, past no
    /// proxy), or a probe with no handler, which the API server refuses anyway.
    Keep,
    /// Leave it alone, and tell the user why.
    Warn(Unchanged),
}

/// Decides what to do with `probe` of a container whose ports are `ports`. The kubelet picks the
/// handler in the order exec, httpGet, tcpSocket, gRPC, and so does this.
pub(super) fn plan<'a>(probe: &'a Probe, ports: &[ContainerPort]) -> Plan<'a> {
    let port = |port| resolve_port(port, ports).map_err(Unchanged::Port);
    let check = if probe.exec.is_some() {
        return Plan::Keep;
    } else if let Some(http) = &probe.http_get {
        let https = match http.scheme.as_deref() {
            None | Some("HTTP") => false,
            Some("HTTPS") => true,
            Some(other) => return Plan::Warn(Unchanged::Scheme(other.to_owned())),
        };
        port(&http.port).map(|port| Check::Http { port, https })
    } else if let Some(tcp) = &probe.tcp_socket {
        port(&tcp.port).map(|port| Check::Tcp { port })
    } else if let Some(grpc) = &probe.grpc {
        // The kubelet takes a gRPC port as a number only; names are not looked up.
        u16::try_from(grpc.port)
            .ok()
            .filter(|port| *port != 0)
            .map(|port| Check::Grpc {
                port,
                service: grpc.service.as_deref().filter(|s| !s.is_empty()),
            })
            .ok_or(Unchanged::Port(PortError::OutOfRange {
                port: i64::from(grpc.port),
            }))
    } else {
        return Plan::Keep;
    };
    match check {
        Ok(check) => Plan::Rewrite(check),
        Err(unchanged) => Plan::Warn(unchanged),
    }
}

/// The port of a probe that already points at one of the agent's (or the mesh's) probe endpoints:
/// an httpGet probe on 15901-15904. Such a probe is never taken for an original.
pub(super) fn rewritten_port(probe: &Probe) -> Option<u16> {
    let IntOrString::Int(port) = probe.http_get.as_ref()?.port else {
        return None;
    };
    let port = u16::try_from(port).ok()?;
    let ours = port == HEALTHCHECK_PORT || ProbeKind::ALL.iter().any(|kind| kind.port() == port);
    ours.then_some(port)
}

/// Whether a probe on a probe port carries its original in its own headers, as FSM's injector (and
/// this rewriter's tcpSocket, gRPC and fsm-style shapes) write it: `/fsm-healthcheck` with
/// `Original-Tcp-Port` or `Original-Http-Port`, or a gRPC check with `Original-Grpc-Port`. The
/// agent answers such a probe as it is, with no record; OSM's shape, a bare path on 15901-15903,
/// keeps its original in the proxy's configuration and the agent cannot.
pub(super) fn carries_its_original(probe: &Probe) -> bool {
    let Some(http) = &probe.http_get else {
        return false;
    };
    let path = http.path.as_deref().unwrap_or_default();
    let header = |name: &str| {
        http.http_headers
            .iter()
            .flatten()
            .any(|header| header.name.eq_ignore_ascii_case(name))
    };
    if path == GRPC_HEALTHCHECK_PATH {
        return header(ORIGINAL_GRPC_PORT_HEADER);
    }
    HEALTHCHECK_PATHS.contains(&path)
        && (header(ORIGINAL_TCP_PORT_HEADER) || header(ORIGINAL_HTTP_PORT_HEADER))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn probe(json: serde_json::Value) -> Probe {
        serde_json::from_value(json).expect("a probe")
    }

    #[test]
    fn exec_probes_and_probes_without_a_handler_are_kept() {
        let exec = probe(json!({"exec": {"command": ["cat", "/tmp/healthy"]}}));
        assert_eq!(plan(&exec, &[]), Plan::Keep);
        assert_eq!(plan(&probe(json!({"periodSeconds": 5})), &[]), Plan::Keep);
    }

    #[test]
    fn each_handler_becomes_its_check() {
        let http = probe(json!({"httpGet": {"port": 8080}}));
        assert_eq!(
            plan(&http, &[]),
            Plan::Rewrite(Check::Http {
                port: 8080,
                https: false
            })
        );
        let https = probe(json!({"httpGet": {"port": 8443, "scheme": "HTTPS"}}));
        assert_eq!(
            plan(&https, &[]),
            Plan::Rewrite(Check::Http {
                port: 8443,
                https: true
            })
        );
        let tcp = probe(json!({"tcpSocket": {"port": "5432"}}));
        assert_eq!(plan(&tcp, &[]), Plan::Rewrite(Check::Tcp { port: 5432 }));
        let grpc = probe(json!({"grpc": {"port": 2379, "service": ""}}));
        assert_eq!(
            plan(&grpc, &[]),
            Plan::Rewrite(Check::Grpc {
                port: 2379,
                service: None
            })
        );
    }

    #[test]
    fn a_scheme_the_kubelet_does_not_know_is_left_alone() {
        let odd = probe(json!({"httpGet": {"port": 80, "scheme": "https"}}));
        assert_eq!(
            plan(&odd, &[]),
            Plan::Warn(Unchanged::Scheme("https".into()))
        );
    }

    #[test]
    fn only_httpget_probes_on_the_probe_ports_count_as_rewritten() {
        for port in [15901, 15902, 15903, 15904] {
            let rewritten = probe(json!({"httpGet": {"port": port, "path": "/anything"}}));
            assert_eq!(rewritten_port(&rewritten), Some(port));
        }
        assert_eq!(
            rewritten_port(&probe(json!({"httpGet": {"port": 8080}}))),
            None
        );
        assert_eq!(
            rewritten_port(&probe(json!({"httpGet": {"port": "15901"}}))),
            None
        );
        assert_eq!(
            rewritten_port(&probe(json!({"tcpSocket": {"port": 15904}}))),
            None
        );
    }

    #[test]
    fn a_probe_with_its_original_in_its_headers_is_told_from_a_bare_one() {
        let carries = |json| carries_its_original(&probe(json));
        assert!(carries(
            json!({"httpGet": {"port": 15904, "path": "/fsm-healthcheck",
            "httpHeaders": [{"name": "Original-Tcp-Port", "value": "8080"}]}})
        ));
        assert!(carries(
            json!({"httpGet": {"port": 15901, "path": "/osm-healthcheck",
            "httpHeaders": [{"name": "original-http-port", "value": "8080"},
                            {"name": "Original-Http-Path", "value": "/"}]}})
        ));
        assert!(carries(
            json!({"httpGet": {"port": 15904, "path": "/probe-bypass-grpc",
            "httpHeaders": [{"name": "Original-Grpc-Port", "value": "9090"}]}})
        ));
        // OSM's shape: the original is in the proxy's configuration.
        assert!(!carries(
            json!({"httpGet": {"port": 15901, "path": "/osm-liveness-probe"}})
        ));
        assert!(!carries(
            json!({"httpGet": {"port": 15904, "path": "/fsm-healthcheck"}})
        ));
        assert!(!carries(
            json!({"httpGet": {"port": 15904, "path": "/probe-bypass-grpc",
            "httpHeaders": [{"name": "Original-Tcp-Port", "value": "8080"}]}})
        ));
    }
}
