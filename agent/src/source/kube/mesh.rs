//! Which of the node's pods are meshed.
//!
//! FSM's and OSM's injectors label every pod they inject with the proxy's unique ID
//! (`fsm-proxy-uuid`, `osm-proxy-uuid`; `SidecarUniqueIDLabelName` / `EnvoyUniqueIDLabelName` in
//! their `pkg/constants`), and the meshes' own tools tell a meshed pod by that label alone. So does
//! the agent by default. A container's name is a weaker sign (many pods have a container called
//! `sidecar`), and the `sidecar-injection` annotation only asks for injection, which may not
//! have happened; redirecting a pod that has no proxy would cut it off, so neither counts unless
//! asked for.

use std::{fmt, str::FromStr};

use k8s_openapi::api::core::v1::Pod as K8sPod;

/// The labels FSM's and OSM's injectors put on every pod they inject.
pub const DEFAULT_MESH_LABELS: &str = "fsm-proxy-uuid,osm-proxy-uuid";

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

/// A pod is meshed when it carries any of `labels` or has a container named in `sidecar_names`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshSelector {
    pub labels: Vec<LabelMatch>,
    pub sidecar_names: Vec<String>,
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
        let spec = pod.spec.as_ref()?;
        // A native sidecar (an init container with restartPolicy Always) counts as well.
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| self.sidecar_names.contains(&c.name))
            .map(|c| format!("container {}", c.name))
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
        if parts.is_empty() {
            return f.write_str("no pods (no --mesh-label, no --mesh-sidecar-name)");
        }
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
            "pods with label fsm-proxy-uuid or osm-proxy-uuid"
        );
        let mesh = MeshSelector {
            labels: vec!["mesh=blue".parse().expect("label")],
            sidecar_names: vec!["sidecar".to_owned(), "envoy".to_owned()],
        };
        assert_eq!(
            mesh.to_string(),
            "pods with label mesh=blue, or a container named sidecar or envoy"
        );
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
