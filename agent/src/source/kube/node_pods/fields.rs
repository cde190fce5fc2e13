//! What the source keeps of a watched pod: its identity, its IP, and only the fields the agent
//! serves from.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod as K8sPod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::PodIp;
use crate::pod::PodKey;

/// A pod's key and UID.
pub(super) fn identity(pod: &K8sPod) -> Option<(PodKey, String)> {
    let name = pod.metadata.name.clone()?;
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    Some((PodKey { namespace, name }, uid))
}

pub(super) fn pod_ip(pod: &K8sPod) -> PodIp {
    let Some(text) = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
    else {
        return PodIp::Missing;
    };
    match text.parse() {
        Ok(ip) => PodIp::Known(ip),
        Err(_) => PodIp::Invalid(text.to_owned()),
    }
}

/// The pod with only the fields [`Pod::from_k8s`] reads: name, namespace, the annotations it reads
/// (`kept_annotations`), the containers' names, ports and probes, and the pod's IPs.
pub(super) fn trim(pod: K8sPod, kept_annotations: &BTreeSet<String>) -> K8sPod {
    let K8sPod {
        metadata,
        spec,
        status,
    } = pod;
    let annotations = metadata
        .annotations
        .map(|all| {
            all.into_iter()
                .filter(|(key, _)| kept_annotations.contains(key))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|kept| !kept.is_empty());
    K8sPod {
        metadata: ObjectMeta {
            name: metadata.name,
            namespace: metadata.namespace,
            // A terminating pod whose sandbox is gone is let go without a warning.
            deletion_timestamp: metadata.deletion_timestamp,
            annotations,
            ..ObjectMeta::default()
        },
        spec: spec.map(|spec| PodSpec {
            containers: spec.containers.into_iter().map(trim_container).collect(),
            init_containers: spec
                .init_containers
                .map(|all| all.into_iter().map(trim_container).collect()),
            ..PodSpec::default()
        }),
        status: status.map(|status| PodStatus {
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            ..PodStatus::default()
        }),
    }
}

pub(super) fn trim_container(container: Container) -> Container {
    Container {
        name: container.name,
        ports: container.ports,
        liveness_probe: container.liveness_probe,
        readiness_probe: container.readiness_probe,
        startup_probe: container.startup_probe,
        ..Container::default()
    }
}
