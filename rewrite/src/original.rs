//! The pod annotation that records the probes as they were before the rewriter changed them.
//!
//! The kubelet only ever sees the rewritten probes; the agent learns from this annotation what to
//! actually probe (the port, path, scheme, headers, `host` and gRPC service of the original). One
//! annotation holds every container's probes so that a pod carries a single, atomic record:
//!
//! ```json
//! {"app":{"liveness":{"httpGet":{"path":"/healthz","port":8080}},"readiness":{...}}}
//! ```
//!
//! Only the probes that were rewritten are recorded. Each probe is kept exactly as it was written,
//! fields this crate does not know included, so that rewriting from the record gives the same
//! result as rewriting the probe itself.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Probe;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::ProbeKind;
use crate::contract::ORIGINAL_PROBES_ANNOTATION;

/// Why the annotation could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OriginalError {
    #[error(
        "annotation {ORIGINAL_PROBES_ANNOTATION} is not JSON of the form \
         {{\"<container>\":{{\"liveness\"|\"readiness\"|\"startup\":<probe>}}}}: {source}"
    )]
    Shape { source: serde_json::Error },
    #[error(
        "annotation {ORIGINAL_PROBES_ANNOTATION}: the {kind} probe of container {container:?} is \
         not a Kubernetes probe: {source}"
    )]
    Probe {
        container: String,
        kind: ProbeKind,
        source: serde_json::Error,
    },
}

/// One recorded probe: as written, and as the agent reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Original {
    json: Value,
    probe: Probe,
}

impl Original {
    /// Records `json`, which must be a valid probe.
    pub(super) fn new(json: Value, probe: Probe) -> Self {
        Self { json, probe }
    }

    /// The probe, typed.
    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    /// The probe exactly as it was written.
    pub fn json(&self) -> &Value {
        &self.json
    }
}

/// Every recorded probe of a pod, by container name and kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OriginalProbes {
    probes: BTreeMap<String, BTreeMap<ProbeKind, Original>>,
}

/// The annotation's per-container object; an unknown key is an error rather than a probe lost.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordedKinds {
    liveness: Option<Value>,
    readiness: Option<Value>,
    startup: Option<Value>,
}

impl OriginalProbes {
    /// Reads the annotation's value.
    pub fn parse(annotation: &str) -> Result<Self, OriginalError> {
        let containers: BTreeMap<String, RecordedKinds> =
            serde_json::from_str(annotation).map_err(|source| OriginalError::Shape { source })?;
        let mut originals = Self::default();
        for (container, kinds) in containers {
            let RecordedKinds {
                liveness,
                readiness,
                startup,
            } = kinds;
            let recorded = [
                (ProbeKind::Liveness, liveness),
                (ProbeKind::Readiness, readiness),
                (ProbeKind::Startup, startup),
            ];
            for (kind, json) in recorded {
                let Some(json) = json else { continue };
                let probe = serde_json::from_value(json.clone()).map_err(|source| {
                    OriginalError::Probe {
                        container: container.clone(),
                        kind,
                        source,
                    }
                })?;
                originals.insert(&container, kind, Original::new(json, probe));
            }
        }
        Ok(originals)
    }

    /// The recorded `kind` probe of `container`, if it was rewritten.
    pub fn get(&self, container: &str, kind: ProbeKind) -> Option<&Original> {
        self.probes.get(container)?.get(&kind)
    }

    /// Every recorded probe, by container name, then kind.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ProbeKind, &Original)> {
        self.probes.iter().flat_map(|(container, kinds)| {
            kinds
                .iter()
                .map(move |(kind, original)| (container.as_str(), *kind, original))
        })
    }

    /// Whether no probe is recorded.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    pub(super) fn insert(&mut self, container: &str, kind: ProbeKind, original: Original) {
        self.probes
            .entry(container.to_owned())
            .or_default()
            .insert(kind, original);
    }

    /// The annotation's value. The same probes always give the same text, so that a rewrite that
    /// changes nothing can tell it has nothing to write.
    pub fn to_annotation(&self) -> String {
        let containers: Map<String, Value> = self
            .probes
            .iter()
            .map(|(container, kinds)| {
                let kinds: Map<String, Value> = kinds
                    .iter()
                    .map(|(kind, original)| (kind.name().to_owned(), original.json.clone()))
                    .collect();
                (container.clone(), Value::Object(kinds))
            })
            .collect();
        Value::Object(containers).to_string()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    use serde_json::json;

    use super::*;

    #[test]
    fn the_annotation_reads_back_as_written_unknown_fields_included() {
        let text = r#"{"app":{"liveness":{"httpGet":{"path":"/healthz","port":"http","host":"10.0.0.1","futureField":true},"periodSeconds":5},"startup":{"tcpSocket":{"port":8080}}},"side":{"readiness":{"grpc":{"port":9090,"service":"ready"}}}}"#;
        let originals = OriginalProbes::parse(text).expect("valid");
        let liveness = originals.get("app", ProbeKind::Liveness).expect("recorded");
        let http = liveness.probe().http_get.as_ref().expect("httpGet");
        assert_eq!(http.port, IntOrString::String("http".into()));
        assert_eq!(http.host.as_deref(), Some("10.0.0.1"));
        assert_eq!(liveness.json()["httpGet"]["futureField"], json!(true));
        assert!(originals.get("app", ProbeKind::Readiness).is_none());
        assert_eq!(
            originals
                .get("side", ProbeKind::Readiness)
                .and_then(|o| o.probe().grpc.as_ref())
                .map(|g| (g.port, g.service.clone())),
            Some((9090, Some("ready".into())))
        );
        assert_eq!(originals.iter().count(), 3);
        assert_eq!(originals.to_annotation(), text);
    }

    #[test]
    fn an_annotation_of_another_shape_is_refused_with_the_reason() {
        let error = OriginalProbes::parse("[]").expect_err("not an object");
        assert!(
            error
                .to_string()
                .starts_with("annotation probe-bypass.io/original-probes is not JSON of the form"),
            "{error}"
        );
        let error =
            OriginalProbes::parse(r#"{"app":{"livenes":{}}}"#).expect_err("misspelled kind");
        assert!(
            error.to_string().contains("unknown field `livenes`"),
            "{error}"
        );
        let error = OriginalProbes::parse(r#"{"app":{"liveness":{"httpGet":{"port":true}}}}"#)
            .expect_err("not a probe");
        assert!(
            error
                .to_string()
                .contains("the liveness probe of container \"app\" is not a Kubernetes probe"),
            "{error}"
        );
    }

    #[test]
    fn nothing_recorded_is_an_empty_object() {
        let originals = OriginalProbes::parse("{}").expect("valid");
        assert!(originals.is_empty());
        assert_eq!(originals.to_annotation(), "{}");
    }
}
