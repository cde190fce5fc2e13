//! Which of the node's pods are meshed.
//!
//! By default, a pod the FSM or OSM injector has marked, with any of the marks it leaves:
//! - the label with the proxy's unique ID it puts on every pod it injects (`fsm-proxy-uuid`,
//!   `osm-proxy-uuid`; `SidecarUniqueIDLabelName` / `EnvoyUniqueIDLabelName` in their
//!   `pkg/constants`), by which the meshes' own tools tell a meshed pod;
//! - the injection annotation on the pod itself, `flomesh.io/sidecar-injection` or
//!   `openservicemesh.io/sidecar-injection`, set to `enabled` (or `yes`, `true`, as the injectors
//!   accept);
//! - its sidecar container: named as the injector names it (FSM `sidecar`, OSM `envoy`) *and*
//!   running as the proxy's UID. The name alone is too weak a sign (many pods have a container
//!   called `sidecar`), and redirecting a pod that has no proxy would cut it off.
//!
//! `--mesh-label` replaces the labels; `--mesh-sidecar-name` adds container names that count
//! whatever their UID.

use std::{fmt, str::FromStr};

use k8s_openapi::api::core::v1::{Container, Pod as K8sPod};

use crate::defaults::DEFAULT_MESH_LABELS;
use crate::defaults::{MESH_ANNOTATION_PREFIXES, PROXY_UID};

/// The injection annotation, after a [`MESH_ANNOTATION_PREFIXES`] prefix.
const INJECTION_ANNOTATION: &str = "sidecar-injection";

/// Values of the injection annotation that ask for a sidecar.
const INJECTION_ENABLED: [&str; 3] = ["enabled", "yes", "true"];

/// The names FSM's and OSM's injectors give their sidecar container.
const INJECTED_SIDECAR_NAMES: [&str; 2] = ["sidecar", "envoy"];

/// A label a meshed pod carries: `KEY` (any value) or `KEY=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMatch {
    pub key: String,
    pub value: Option<String>,
}

impl FromStr for LabelMatch {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (key, value) = match text.split_once('=') {
            Some((key, value)) => (key.trim(), Some(value.trim().to_owned())),
            None => (text.trim(), None),
        };
        if key.is_empty() {
            return Err(format!(
                "{text:?} has no label key (expected KEY or KEY=VALUE)"
            ));
        }
        Ok(Self {
            key: key.to_owned(),
            value,
        })
    }
}

impl fmt::Display for LabelMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{}={value}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// A pod is meshed when it carries any of `labels`, has a container named in `sidecar_names`, or
/// bears the injectors' other marks: the injection annotation enabled, or their sidecar container
/// running as `proxy_uid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSelector {
    pub labels: Vec<LabelMatch>,
    pub sidecar_names: Vec<String>,
    pub proxy_uid: u32,
}

impl MeshSelector {
    /// What marks `pod` as meshed (for the log), or `None` when it is not.
    pub fn marker(&self, pod: &K8sPod) -> Option<String> {
        if let Some(labels) = &pod.metadata.labels {
            for wanted in &self.labels {
                let matches = labels
                    .get(&wanted.key)
                    .is_some_and(|value| wanted.value.as_ref().is_none_or(|v| v == value));
                if matches {
                    return Some(format!("label {wanted}"));
                }
            }
        }
        if let Some(annotations) = &pod.metadata.annotations {
            for prefix in MESH_ANNOTATION_PREFIXES {
                let key = format!("{prefix}{INJECTION_ANNOTATION}");
                let enabled = annotations.get(&key).is_some_and(|value| {
                    INJECTION_ENABLED.contains(&value.trim().to_ascii_lowercase().as_str())
                });
                if enabled {
                    return Some(format!("annotation {key}"));
                }
            }
        }
        let spec = pod.spec.as_ref()?;
        // A native sidecar (an init container with restartPolicy Always) counts as well.
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| self.sidecar_names.contains(&c.name) || self.is_injected_sidecar(c))
            .map(|c| format!("container {}", c.name))
    }

    fn is_injected_sidecar(&self, container: &Container) -> bool {
        let uid = container
            .security_context
            .as_ref()
            .and_then(|context| context.run_as_user);
        INJECTED_SIDECAR_NAMES.contains(&container.name.as_str())
            && uid == Some(i64::from(self.proxy_uid))
    }
}

/// As the log shows it: "pods with label fsm-proxy-uuid or osm-proxy-uuid, or a container named sidecar".
impl fmt::Display for MeshSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels: Vec<String> = self.labels.iter().map(ToString::to_string).collect();
        let mut parts = Vec::new();
        if !labels.is_empty() {
            parts.push(format!("label {}", labels.join(" or ")));
        }
        if !self.sidecar_names.is_empty() {
            parts.push(format!(
                "a container named {}",
                self.sidecar_names.join(" or ")
            ));
        }
        parts.push(format!(
            "the injection annotation enabled, or an injected {} container running as UID {}",
            INJECTED_SIDECAR_NAMES.join("/"),
            self.proxy_uid
        ));
        write!(f, "pods with {}", parts.join(", or "))
    }
}

impl Default for MeshSelector {
    fn default() -> Self {
        Self {
            labels: DEFAULT_MESH_LABELS
                .split(',')
                .filter_map(|label| label.parse().ok())
                .collect(),
            sidecar_names: Vec::new(),
            proxy_uid: PROXY_UID,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(labels: &[(&str, &str)], containers: &[&str]) -> K8sPod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p",
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            },
            "spec": {
                "containers": containers.iter().map(|name| serde_json::json!({"name": name}))
                    .collect::<Vec<_>>(),
            },
        }))
        .expect("test pod")
    }

    #[test]
    fn injected_pods_are_meshed_by_their_proxy_label() {
        let mesh = MeshSelector::default();
        assert_eq!(
            mesh.marker(&pod(&[("fsm-proxy-uuid", "0b1c")], &["app", "sidecar"])),
            Some("label fsm-proxy-uuid".to_owned())
        );
        assert!(
            mesh.marker(&pod(&[("osm-proxy-uuid", "0b1c")], &["app"]))
                .is_some()
        );
        assert_eq!(
            mesh.marker(&pod(&[("app", "web")], &["app", "sidecar"])),
            None
        );
    }

    #[test]
    fn labels_with_a_value_and_sidecar_names_can_be_asked_for() {
        let mesh = MeshSelector {
            labels: vec!["mesh=blue".parse().expect("label")],
            sidecar_names: vec!["envoy".to_owned()],
            ..MeshSelector::default()
        };
        assert!(mesh.marker(&pod(&[("mesh", "blue")], &["app"])).is_some());
        assert_eq!(mesh.marker(&pod(&[("mesh", "green")], &["app"])), None);
        assert_eq!(
            mesh.marker(&pod(&[], &["app", "envoy"])),
            Some("container envoy".to_owned())
        );
    }

    #[test]
    fn the_log_says_which_pods_are_meshed() {
        assert_eq!(
            MeshSelector::default().to_string(),
            "pods with label fsm-proxy-uuid or osm-proxy-uuid, or the injection annotation \
             enabled, or an injected sidecar/envoy container running as UID 1500"
        );
        let mesh = MeshSelector {
            labels: vec!["mesh=blue".parse().expect("label")],
            sidecar_names: vec!["sidecar".to_owned(), "envoy".to_owned()],
            proxy_uid: 1337,
        };
        assert_eq!(
            mesh.to_string(),
            "pods with label mesh=blue, or a container named sidecar or envoy, or the injection \
             annotation enabled, or an injected sidecar/envoy container running as UID 1337"
        );
    }

    #[test]
    fn the_injection_annotation_and_the_injected_sidecar_mark_a_pod_too() {
        let mesh = MeshSelector::default();
        let annotated = |key: &str, value: &str| -> K8sPod {
            let mut pod = pod(&[], &["app"]);
            pod.metadata.annotations = Some([(key.to_owned(), value.to_owned())].into());
            pod
        };
        assert_eq!(
            mesh.marker(&annotated("flomesh.io/sidecar-injection", "enabled")),
            Some("annotation flomesh.io/sidecar-injection".to_owned())
        );
        assert!(
            mesh.marker(&annotated("openservicemesh.io/sidecar-injection", "Yes"))
                .is_some()
        );
        assert_eq!(
            mesh.marker(&annotated("flomesh.io/sidecar-injection", "disabled")),
            None
        );

        let with_sidecar = |name: &str, uid: Option<i64>| -> K8sPod {
            let mut pod = pod(&[], &["app", name]);
            if let Some(spec) = pod.spec.as_mut() {
                spec.containers[1].security_context =
                    Some(k8s_openapi::api::core::v1::SecurityContext {
                        run_as_user: uid,
                        ..Default::default()
                    });
            }
            pod
        };
        assert_eq!(
            mesh.marker(&with_sidecar("envoy", Some(1500))),
            Some("container envoy".to_owned())
        );
        assert!(mesh.marker(&with_sidecar("sidecar", Some(1500))).is_some());
        // The name alone, or the UID on another name, is not the injector's mark.
        assert_eq!(mesh.marker(&with_sidecar("sidecar", Some(1000))), None);
        assert_eq!(mesh.marker(&with_sidecar("sidecar", None)), None);
        assert_eq!(mesh.marker(&with_sidecar("proxy", Some(1500))), None);
    }

    #[test]
    fn a_label_needs_a_key() {
        assert!("=x".parse::<LabelMatch>().is_err());
        assert!("".parse::<LabelMatch>().is_err());
        assert_eq!(
            " a = b ".parse::<LabelMatch>().map(|l| l.to_string()),
            Ok("a=b".to_owned())
        );
    }
}
