//! What the rewriter tells the user about a pod it could only partly rewrite. A warning never stops
//! the rest of the pod from being rewritten.

use std::fmt;

use super::{ProbeKind, mesh_init::Kept, ports::PortError};
use crate::contract::{REWRITE_ANNOTATION, REWRITE_DISABLED};

/// Why one probe was left as it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unchanged {
    /// The port does not resolve; peers rewrite such a probe to port 0, where it can only fail.
    #[error(transparent)]
    Port(PortError),
    /// A scheme other than HTTP or HTTPS, which the API server refuses anyway.
    #[error("scheme {0:?} is neither HTTP nor HTTPS")]
    Scheme(String),
    /// The probe does not read as a Kubernetes probe.
    #[error("it is not a Kubernetes probe: {0}")]
    NotAProbe(String),
    /// The probe already targets a probe port with no original recorded for it or carried in its
    /// headers (OSM's injector rewrote it, say): taking it for an original would point the agent
    /// at itself.
    #[error(
        "it already targets probe port {port}, and neither its headers nor the pod's \
         probe-bypass.io/original-probes annotation say what it checks (OSM's injector keeps that \
         in the proxy's configuration), so the agent cannot answer it"
    )]
    AlreadyRewritten { port: u16 },
    /// OSM's shape keeps an HTTPS probe's path, so only one container's HTTPS probe of a kind can
    /// own the kind's port without two containers sharing an endpoint (osm#3773).
    #[error(
        "it is HTTPS, and container {owner:?}'s HTTPS probe of the same kind already has the \
         port; HTTPS probes keep their path in the osm style, so a second one could not be told \
         apart (the fsm style can)"
    )]
    HttpsPortTaken { owner: String },
}

/// Something the user should know about a rewritten pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The pod's name (or generateName), when it has one; a pod template often has neither.
    pub pod: Option<String>,
    pub issue: Issue,
}

/// What a [`Warning`] is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Issue {
    /// One probe was left as it was.
    ProbeUnchanged {
        container: String,
        kind: ProbeKind,
        reason: Unchanged,
    },
    /// The opt-out annotation holds a value other than the one that opts out, so the pod was
    /// rewritten all the same.
    OptOutValue { value: String },
    /// `--replace-mesh-init` left the mesh's iptables init container in the pod.
    MeshInitKept { container: String, reason: Kept },
    /// `--replace-mesh-init` left a container named as the mesh's healthcheck container, which is
    /// not of its shape.
    MeshHealthcheckKept { container: String, why: String },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pod) = &self.pod {
            write!(f, "pod {pod}: ")?;
        }
        match &self.issue {
            Issue::ProbeUnchanged {
                container,
                kind,
                reason,
            } => write!(
                f,
                "container {container}: {kind} probe left unchanged: {reason}"
            ),
            Issue::OptOutValue { value } => write!(
                f,
                "annotation {REWRITE_ANNOTATION} is {value}, not {REWRITE_DISABLED:?}; the probes \
                 were rewritten"
            ),
            Issue::MeshInitKept { container, reason } => {
                write!(
                    f,
                    "init container {container} kept, and with it the mesh's iptables rules: "
                )?;
                match reason {
                    Kept::OtherShape(why) => write!(
                        f,
                        "it has the name of the mesh's iptables init container but not the \
                         injector's shape: {why}"
                    ),
                    Kept::Rule(finding) => write!(f, "{finding}"),
                    Kept::MalformedAnnotation { key, value } => write!(
                        f,
                        "annotation {key}={value:?} is malformed, so the agent ignores it whole \
                         and the script's exclusions cannot be carried into it; correct it"
                    ),
                    Kept::SeveralInitContainers(names) => write!(
                        f,
                        "the pod has several mesh init containers ({}), so which rules apply is \
                         not clear",
                        names.join(", ")
                    ),
                    Kept::NoValidationTarget(why) => {
                        write!(f, "the pod could not be validated: {why}")
                    }
                }
            }
            Issue::MeshHealthcheckKept { container, why } => write!(
                f,
                "container {container} kept: it has the name of the mesh's healthcheck container, \
                 but {why}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_names_the_pod_container_probe_and_reason() {
        let warning = Warning {
            pod: Some("web-0".into()),
            issue: Issue::ProbeUnchanged {
                container: "app".into(),
                kind: ProbeKind::Startup,
                reason: Unchanged::Port(PortError::UnknownName {
                    name: "liveness-port".into(),
                    known: vec!["http".into()],
                }),
            },
        };
        assert_eq!(
            warning.to_string(),
            "pod web-0: container app: startup probe left unchanged: port \"liveness-port\" is \
             not the name of one of the container's ports (it names http) and not a number"
        );
        let warning = Warning {
            pod: None,
            issue: Issue::OptOutValue {
                value: "\"disable\"".into(),
            },
        };
        assert_eq!(
            warning.to_string(),
            "annotation probe-bypass.io/rewrite is \"disable\", not \"disabled\"; the probes were \
             rewritten"
        );
    }
}
