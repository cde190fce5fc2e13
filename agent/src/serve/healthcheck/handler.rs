//! What a healthcheck request asks for: a port to dial, a gRPC health check to run, or an answer
//! without either. What a request on 15901-15903 asks for is in [`super::probes`].

use probe_bypass_rewrite::{
    ProbeKind,
    contract::{
        GRPC_HEALTHCHECK_PATH, HEALTHCHECK_PATHS, ORIGINAL_GRPC_PORT_HEADER,
        ORIGINAL_GRPC_SERVICE_HEADER, ORIGINAL_HTTP_PATH_HEADER, ORIGINAL_HTTP_PORT_HEADER,
        ORIGINAL_TCP_PORT_HEADER,
    },
};

use super::{
    Outcome,
    http::{Request, Response},
};
use crate::{pod::Pod, serve::prober::http::HttpProbe};

/// The headers the listeners read; the kubelet's `User-Agent` is passed on to the app by the
/// probes the agent runs.
pub const HEADERS: [&str; 6] = [
    ORIGINAL_TCP_PORT_HEADER,
    ORIGINAL_GRPC_PORT_HEADER,
    ORIGINAL_GRPC_SERVICE_HEADER,
    ORIGINAL_HTTP_PORT_HEADER,
    ORIGINAL_HTTP_PATH_HEADER,
    "User-Agent",
];

/// What the healthcheck does for a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Connects to this port of the pod (a rewritten tcpSocket probe).
    Tcp(u16),
    /// Runs the gRPC health check of `service` on `port` (a rewritten gRPC probe).
    Grpc { port: u16, service: String },
    /// Runs an httpGet probe (a rewritten one, on 15901-15903).
    Http(Box<HttpRoute>),
}

/// An httpGet probe to run, and which of the pod's probes it stands for.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRoute {
    /// Empty when the request does not say (FSM's shape with no recorded original).
    pub container: String,
    pub kind: ProbeKind,
    pub probe: HttpProbe,
}

/// A request the healthcheck answers without dialing.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    pub outcome: Outcome,
    pub response: Response,
}

pub(super) fn reject(outcome: Outcome, status: u16, body: String) -> Rejection {
    Rejection {
        outcome,
        response: Response::new(status, body),
    }
}

/// Decides what a request asks of `pod`. `allow_any_port` restores the peers' behaviour of dialing
/// any port; otherwise only ports the pod's probes name are dialed or health-checked, so a caller
/// who reaches the healthcheck cannot use it to scan the pod.
pub fn route(request: &Request, pod: &Pod, allow_any_port: bool) -> Result<Route, Rejection> {
    let grpc = request.path == GRPC_HEALTHCHECK_PATH;
    if !grpc && !HEALTHCHECK_PATHS.contains(&request.path.as_str()) {
        return Err(reject(
            Outcome::NotFound,
            404,
            format!(
                "no healthcheck at {}; use {}, or {GRPC_HEALTHCHECK_PATH} for a gRPC probe",
                request.path,
                HEALTHCHECK_PATHS.join(" or ")
            ),
        ));
    }
    check_method(request)?;
    let port_header = if grpc {
        ORIGINAL_GRPC_PORT_HEADER
    } else {
        ORIGINAL_TCP_PORT_HEADER
    };
    let bad_request = |reason| reject(Outcome::BadRequest, 400, reason);
    let port = parse_port(port_header, &request.values(port_header)).map_err(bad_request)?;
    check_port(pod, port, allow_any_port)?;
    if !grpc {
        return Ok(Route::Tcp(port));
    }
    let service =
        parse_service(&request.values(ORIGINAL_GRPC_SERVICE_HEADER)).map_err(bad_request)?;
    Ok(Route::Grpc { port, service })
}

/// Probes answer GET (the kubelet's) and HEAD.
pub(super) fn check_method(request: &Request) -> Result<(), Rejection> {
    if request.method == "GET" || request.method == "HEAD" {
        return Ok(());
    }
    Err(reject(
        Outcome::MethodNotAllowed,
        405,
        format!("method {} is not allowed; use GET or HEAD", request.method),
    ))
}

/// Refuses a port that none of the pod's probes name, unless `allow_any_port`.
pub(super) fn check_port(pod: &Pod, port: u16, allow_any_port: bool) -> Result<(), Rejection> {
    if allow_any_port || pod.probe_ports.contains(&port) {
        return Ok(());
    }
    Err(reject(
        Outcome::Forbidden,
        403,
        format!(
            "port {port} is not named by any probe of pod {}; probed ports: {}",
            pod.key,
            describe_ports(pod)
        ),
    ))
}

fn describe_ports(pod: &Pod) -> String {
    if pod.probe_ports.is_empty() {
        return "none".to_owned();
    }
    let ports: Vec<String> = pod.probe_ports.iter().map(u16::to_string).collect();
    ports.join(", ")
}

/// Reads the one value of the port header `name`: a decimal port from 1 to 65535.
pub(super) fn parse_port(name: &str, values: &[&[u8]]) -> Result<u16, String> {
    let value = match values {
        [] => None,
        [value] => Some(value),
        _ => {
            return Err(format!(
                "Header {name} appears {} times; send it once",
                values.len()
            ));
        }
    };
    let text = value.map(|v| String::from_utf8_lossy(v).trim().to_owned());
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Err(format!("Header {name} not found in request"));
    };
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "Header {name} value {text:?} is not a port number (1-65535)"
        ));
    }
    text.parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("Header {name} value {text} is outside the port range 1-65535"))
}

/// Reads the gRPC service to check: absent is the empty service (the server's overall health), as
/// for a gRPC probe without `service`.
fn parse_service(values: &[&[u8]]) -> Result<String, String> {
    let name = ORIGINAL_GRPC_SERVICE_HEADER;
    match values {
        [] => Ok(String::new()),
        [value] => std::str::from_utf8(value)
            .map(|service| service.trim().to_owned())
            .map_err(|_| format!("Header {name} is not UTF-8")),
        _ => Err(format!(
            "Header {name} appears {} times; send it once",
            values.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod::for_tests()
    }

    fn request(method: &str, path: &str, ports: &[&str]) -> Request {
        let header = if path == GRPC_HEALTHCHECK_PATH {
            ORIGINAL_GRPC_PORT_HEADER
        } else {
            ORIGINAL_TCP_PORT_HEADER
        };
        Request {
            method: method.into(),
            path: path.into(),
            headers: ports
                .iter()
                .map(|p| (header, p.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn status(request: &Request, allow_any_port: bool) -> Result<u16, u16> {
        match route(request, &pod(), allow_any_port) {
            Ok(Route::Tcp(port) | Route::Grpc { port, .. }) => Ok(port),
            Ok(Route::Http(route)) => Err(route.probe.url.port),
            Err(rejection) => Err(rejection.response.status),
        }
    }

    #[test]
    fn declared_port_is_dialed_on_both_mesh_paths() {
        assert_eq!(
            status(&request("GET", "/fsm-healthcheck", &["8080"]), false),
            Ok(8080)
        );
        assert_eq!(
            status(&request("HEAD", "/osm-healthcheck", &[" 8080 "]), false),
            Ok(8080)
        );
    }

    #[test]
    fn missing_empty_invalid_or_repeated_port_is_400() {
        for ports in [
            &[][..],
            &[""],
            &["abc"],
            &["0"],
            &["65536"],
            &["-1"],
            &["+80"],
            &["80,81"],
            &["80", "80"],
        ] {
            for (path, header) in [
                ("/fsm-healthcheck", ORIGINAL_TCP_PORT_HEADER),
                (GRPC_HEALTHCHECK_PATH, ORIGINAL_GRPC_PORT_HEADER),
            ] {
                let rejection =
                    route(&request("GET", path, ports), &pod(), true).expect_err("rejected");
                assert_eq!(rejection.response.status, 400, "{path} {ports:?}");
                assert!(
                    rejection.response.body.contains(header),
                    "{path} {ports:?}: {}",
                    rejection.response.body
                );
            }
        }
        let missing =
            route(&request("GET", "/fsm-healthcheck", &[]), &pod(), false).expect_err("400");
        assert_eq!(
            missing.response.body,
            "Header Original-Tcp-Port not found in request"
        );
    }

    #[test]
    fn undeclared_port_is_403_unless_any_port_is_allowed() {
        let rejection =
            route(&request("GET", "/fsm-healthcheck", &["22"]), &pod(), false).expect_err("403");
        assert_eq!(rejection.response.status, 403);
        assert!(rejection.response.body.contains("probed ports: 8080"));
        assert_eq!(
            status(&request("GET", "/fsm-healthcheck", &["22"]), true),
            Ok(22)
        );
    }

    #[test]
    fn grpc_path_asks_for_a_health_check_of_a_declared_port() {
        let mut grpc = request("GET", GRPC_HEALTHCHECK_PATH, &["8080"]);
        assert_eq!(
            route(&grpc, &pod(), false),
            Ok(Route::Grpc {
                port: 8080,
                service: String::new()
            })
        );
        grpc.headers
            .push((ORIGINAL_GRPC_SERVICE_HEADER, b" ready ".to_vec()));
        assert_eq!(
            route(&grpc, &pod(), false),
            Ok(Route::Grpc {
                port: 8080,
                service: "ready".into()
            })
        );
        grpc.headers
            .push((ORIGINAL_GRPC_SERVICE_HEADER, b"other".to_vec()));
        let twice = route(&grpc, &pod(), false).expect_err("400");
        assert_eq!(twice.response.status, 400);
        assert!(twice.response.body.contains("appears 2 times"));
        // The tcpSocket header does not stand in for the gRPC one, nor the other way round.
        let mut tcp_header = request("GET", "/fsm-healthcheck", &["8080"]);
        tcp_header.path = GRPC_HEALTHCHECK_PATH.into();
        let missing = route(&tcp_header, &pod(), false).expect_err("400");
        assert_eq!(
            missing.response.body,
            "Header Original-Grpc-Port not found in request"
        );
        assert_eq!(
            status(&request("GET", GRPC_HEALTHCHECK_PATH, &["22"]), false),
            Err(403)
        );
        assert_eq!(
            status(&request("POST", GRPC_HEALTHCHECK_PATH, &["8080"]), false),
            Err(405)
        );
    }

    #[test]
    fn other_paths_are_404_and_other_methods_405() {
        assert_eq!(status(&request("GET", "/", &["8080"]), false), Err(404));
        assert_eq!(
            status(&request("GET", "/fsm-healthcheck/x", &["8080"]), false),
            Err(404)
        );
        assert_eq!(
            status(&request("POST", "/fsm-healthcheck", &["8080"]), false),
            Err(405)
        );
    }
}
