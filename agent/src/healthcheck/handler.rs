//! What a healthcheck request asks for: a port to dial, or an answer without dialing.

use super::{
    Outcome,
    http::{Request, Response},
};
use crate::{
    pod::Pod,
    ports::{HEALTHCHECK_PATHS, ORIGINAL_TCP_PORT_HEADER},
};

/// A request the healthcheck answers without dialing.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejection {
    pub outcome: Outcome,
    pub response: Response,
}

fn reject(outcome: Outcome, status: u16, body: String) -> Rejection {
    Rejection {
        outcome,
        response: Response::new(status, body),
    }
}

/// Decides which port of `pod` a request asks to dial. `allow_any_port` restores the peers'
/// behaviour of dialing any port; otherwise only ports the pod's probes name are dialed, so a caller
/// who reaches the healthcheck cannot use it to scan the pod.
pub fn route(request: &Request, pod: &Pod, allow_any_port: bool) -> Result<u16, Rejection> {
    if !HEALTHCHECK_PATHS.contains(&request.path.as_str()) {
        return Err(reject(
            Outcome::NotFound,
            404,
            format!(
                "no healthcheck at {}; use {}",
                request.path,
                HEALTHCHECK_PATHS.join(" or ")
            ),
        ));
    }
    if request.method != "GET" && request.method != "HEAD" {
        return Err(reject(
            Outcome::MethodNotAllowed,
            405,
            format!("method {} is not allowed; use GET or HEAD", request.method),
        ));
    }
    let port = parse_port(&request.header_values)
        .map_err(|reason| reject(Outcome::BadRequest, 400, reason))?;
    if !allow_any_port && !pod.probe_ports.contains(&port) {
        return Err(reject(
            Outcome::Forbidden,
            403,
            format!(
                "port {port} is not named by any probe of pod {}; probed ports: {}",
                pod.key,
                describe_ports(pod)
            ),
        ));
    }
    Ok(port)
}

fn describe_ports(pod: &Pod) -> String {
    if pod.probe_ports.is_empty() {
        return "none".to_owned();
    }
    let ports: Vec<String> = pod.probe_ports.iter().map(u16::to_string).collect();
    ports.join(", ")
}

/// Reads the one `Original-Tcp-Port` value: a decimal port from 1 to 65535.
fn parse_port(values: &[Vec<u8>]) -> Result<u16, String> {
    let value = match values {
        [] => None,
        [value] => Some(value),
        _ => {
            return Err(format!(
                "Header {ORIGINAL_TCP_PORT_HEADER} appears {} times; send it once",
                values.len()
            ));
        }
    };
    let text = value.map(|v| String::from_utf8_lossy(v).trim().to_owned());
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Err(format!(
            "Header {ORIGINAL_TCP_PORT_HEADER} not found in request"
        ));
    };
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "Header {ORIGINAL_TCP_PORT_HEADER} value {text:?} is not a port number (1-65535)"
        ));
    }
    text.parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| {
            format!(
                "Header {ORIGINAL_TCP_PORT_HEADER} value {text} is outside the port range 1-65535"
            )
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{
        exclusions::Exclusions,
        pod::{NetnsRef, PodKey},
    };

    fn pod() -> Pod {
        Pod {
            key: PodKey {
                namespace: "shop".into(),
                name: "bookstore".into(),
            },
            ip: "198.18.0.2".parse().expect("ip"),
            netns: NetnsRef::Named("pod".into()),
            probe_ports: BTreeSet::from([8080]),
            exclusions: Exclusions::default(),
            annotation_errors: Vec::new(),
        }
    }

    fn request(method: &str, path: &str, ports: &[&str]) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            header_values: ports.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    fn status(request: &Request, allow_any_port: bool) -> Result<u16, u16> {
        route(request, &pod(), allow_any_port).map_err(|r| r.response.status)
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
            let rejection = route(&request("GET", "/fsm-healthcheck", ports), &pod(), true)
                .expect_err("rejected");
            assert_eq!(rejection.response.status, 400, "{ports:?}");
            assert!(
                rejection.response.body.contains(ORIGINAL_TCP_PORT_HEADER),
                "{ports:?}"
            );
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
