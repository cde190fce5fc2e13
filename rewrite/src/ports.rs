//! A probe's port as the kubelet resolves it, so that the rewritten probe targets the very port the
//! kubelet would have probed.
//!
//! The kubelet's rule (`ResolveContainerPort` in kubernetes `pkg/probe/util.go`):
//! - an integer is the port;
//! - a string is first looked up among the container's `ports[].name`, the first match giving its
//!   `containerPort`; the protocol is not looked at, so a name on a UDP port still resolves;
//! - a string that names no port is parsed as a decimal integer (Go's `strconv.Atoi`: an optional
//!   sign, digits, nothing else), so `"8080"` is port 8080 although the API server's validation
//!   only lets names through;
//! - whatever comes out must be 1-65535.

use k8s_openapi::{api::core::v1::ContainerPort, apimachinery::pkg::util::intstr::IntOrString};

/// Why a probe's port does not resolve, in the terms the user wrote it in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("port {port} is outside 1-65535")]
    OutOfRange { port: i64 },
    #[error(
        "port {name:?} is not the name of one of the container's ports ({}) and not a number",
        known_names(.known)
    )]
    UnknownName { name: String, known: Vec<String> },
}

fn known_names(known: &[String]) -> String {
    if known.is_empty() {
        "it names none".to_owned()
    } else {
        format!("it names {}", known.join(", "))
    }
}

/// Resolves `port` against a container's declared ports, as the kubelet does.
pub fn resolve_port(
    port: &IntOrString,
    container_ports: &[ContainerPort],
) -> Result<u16, PortError> {
    let number = match port {
        IntOrString::Int(number) => i64::from(*number),
        IntOrString::String(name) => {
            let named = container_ports
                .iter()
                .find(|declared| declared.name.as_deref() == Some(name.as_str()));
            match (named, name.parse::<i64>()) {
                (Some(declared), _) => i64::from(declared.container_port),
                (None, Ok(number)) => number,
                (None, Err(_)) => {
                    return Err(PortError::UnknownName {
                        name: name.clone(),
                        known: container_ports
                            .iter()
                            .filter_map(|declared| declared.name.clone())
                            .collect(),
                    });
                }
            }
        }
    };
    u16::try_from(number)
        .ok()
        .filter(|port| *port != 0)
        .ok_or(PortError::OutOfRange { port: number })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(name: &str, port: i32, protocol: &str) -> ContainerPort {
        ContainerPort {
            name: Some(name.to_owned()),
            container_port: port,
            protocol: Some(protocol.to_owned()),
            ..ContainerPort::default()
        }
    }

    fn name(text: &str) -> IntOrString {
        IntOrString::String(text.to_owned())
    }

    #[test]
    fn an_integer_is_the_port() {
        assert_eq!(resolve_port(&IntOrString::Int(8080), &[]), Ok(8080));
    }

    #[test]
    fn a_name_resolves_to_the_first_declared_port_of_that_name_whatever_its_protocol() {
        let ports = [
            declared("metrics", 9090, "TCP"),
            declared("liveness-port", 8080, "UDP"),
            declared("liveness-port", 8081, "TCP"),
        ];
        assert_eq!(resolve_port(&name("liveness-port"), &ports), Ok(8080));
    }

    #[test]
    fn a_name_wins_over_its_reading_as_a_number() {
        let ports = [declared("8080", 9000, "TCP")];
        assert_eq!(resolve_port(&name("8080"), &ports), Ok(9000));
    }

    #[test]
    fn a_numeric_string_that_names_no_port_is_read_as_go_atoi_reads_it() {
        assert_eq!(resolve_port(&name("8080"), &[]), Ok(8080));
        assert_eq!(resolve_port(&name("+8080"), &[]), Ok(8080));
        assert_eq!(resolve_port(&name("008080"), &[]), Ok(8080));
        assert!(resolve_port(&name(" 8080"), &[]).is_err());
        assert!(resolve_port(&name("80_80"), &[]).is_err());
    }

    #[test]
    fn ports_outside_the_tcp_range_do_not_resolve() {
        assert_eq!(
            resolve_port(&IntOrString::Int(0), &[]),
            Err(PortError::OutOfRange { port: 0 })
        );
        assert_eq!(
            resolve_port(&name("70000"), &[]),
            Err(PortError::OutOfRange { port: 70000 })
        );
        assert_eq!(
            resolve_port(&name("-1"), &[]),
            Err(PortError::OutOfRange { port: -1 })
        );
        let ports = [declared("broken", 0, "TCP")];
        assert_eq!(
            resolve_port(&name("broken"), &ports),
            Err(PortError::OutOfRange { port: 0 })
        );
    }

    #[test]
    fn an_unknown_name_says_which_names_the_container_has() {
        let ports = [
            declared("http", 80, "TCP"),
            declared("metrics", 9090, "TCP"),
        ];
        let error = resolve_port(&name("liveness-port"), &ports).expect_err("unknown");
        assert_eq!(
            error.to_string(),
            "port \"liveness-port\" is not the name of one of the container's ports (it names \
             http, metrics) and not a number"
        );
        let error = resolve_port(&name("http"), &[]).expect_err("unknown");
        assert_eq!(
            error.to_string(),
            "port \"http\" is not the name of one of the container's ports (it names none) and \
             not a number"
        );
    }
}
