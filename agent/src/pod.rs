//! The agent's own view of a meshed pod: the few fields it serves from, whatever source they come from.
//!
//! Every pod source (a directory of manifests today, the Kubernetes API later) produces [`Pod`]s, so
//! everything after the source is shared.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::PathBuf,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, ContainerPort, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use probe_bypass_rewrite::{
    OriginalProbes, ProbeKind,
    contract::{
        ORIGINAL_GRPC_PORT_HEADER, ORIGINAL_HTTP_PORT_HEADER, ORIGINAL_PROBES_ANNOTATION,
        ORIGINAL_TCP_PORT_HEADER, REPLACED_MESH_INIT_ANNOTATION,
    },
    ports::resolve_port,
};

use crate::{
    defaults::{NETNS_ANNOTATION, NETNS_RUN_DIR},
    exclusions::{AnnotationError, Exclusions},
    netns::NetnsId,
};

/// Identifies a pod on the node: namespace and name, as the API server does.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where a pod's network namespace is: a name under `/run/netns`, a path to an nsfs file, or the
/// nsfs file of one of the pod's processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsRef {
    Named(String),
    Path(PathBuf),
    /// `<proc>/<pid>/ns/net` of a process found in the pod, which names the pod's namespace only
    /// while it is `id`: once the process exits, its pid can be reused by a process in another
    /// namespace (another pod's, or the host's), which must never be taken for the pod's.
    Process {
        path: PathBuf,
        id: NetnsId,
    },
}

impl NetnsRef {
    /// Parses the value of the [`NETNS_ANNOTATION`] annotation.
    pub fn parse(value: &str) -> Result<Self, PodError> {
        let invalid = |reason: &str| PodError::InvalidNetns {
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if value.is_empty() {
            return Err(invalid("it is empty"));
        }
        if value.starts_with('/') {
            return Ok(Self::Path(PathBuf::from(value)));
        }
        if value.contains('/') || value == "." || value == ".." {
            return Err(invalid(
                "a name must not contain '/'; give an absolute path instead",
            ));
        }
        Ok(Self::Named(value.to_owned()))
    }

    /// The file to open to enter the namespace.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Named(name) => PathBuf::from(NETNS_RUN_DIR).join(name),
            Self::Path(path) | Self::Process { path, .. } => path.clone(),
        }
    }

    /// The namespace this reference must name, when it is known: a namespace of another identity
    /// at the path is not the pod's.
    pub fn expected(&self) -> Option<NetnsId> {
        match self {
            Self::Process { id, .. } => Some(*id),
            Self::Named(_) | Self::Path(_) => None,
        }
    }

    /// Whether the path still leads to the pod's namespace: it exists and, for a process's file,
    /// still names the namespace found through it.
    pub fn is_current(&self) -> bool {
        let found = NetnsId::of(&self.path());
        match self.expected() {
            Some(id) => found.is_ok_and(|found| found == id),
            None => found.is_ok(),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path().display())
    }
}

/// A meshed pod the agent serves.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub key: PodKey,
    /// `status.podIP`: the address the kubelet probes and the healthcheck dials.
    pub ip: IpAddr,
    /// The pod's other addresses in `status.podIPs` (a dual-stack pod's address of the other
    /// family): the datapath intercepts connections to them as to [`Self::ip`].
    pub other_ips: Vec<IpAddr>,
    pub netns: NetnsRef,
    /// Ports the pod's probes name: those of its probes as the kubelet sees them, and those of the
    /// original probes recorded in [`ORIGINAL_PROBES_ANNOTATION`]. The healthcheck dials only these
    /// unless told otherwise, so a caller that reaches it cannot use it to scan the pod's other
    /// ports.
    pub probe_ports: BTreeSet<u16>,
    /// The probes as they were before the rewriter pointed them at the agent, from
    /// [`ORIGINAL_PROBES_ANNOTATION`]: what the agent runs for a probe on 15901-15903. Empty when
    /// the annotation is absent or malformed.
    pub originals: OriginalProbes,
    /// Each container's declared ports (`spec.containers[*].ports`), by container name, for the
    /// named ports of the original probes.
    pub container_ports: BTreeMap<String, Vec<ContainerPort>>,
    /// Traffic the pod's mesh annotations (`flomesh.io/…-exclusion-list` and OSM's) leave out of
    /// the proxy, without the node-wide defaults. Malformed annotations are left out of it.
    pub exclusions: Exclusions,
    /// The pod's malformed exclusion annotations, each ignored whole; the rest of the pod is
    /// served as usual. For the reconciler to log and count
    /// ([`Metrics::annotation_errors`](crate::serve::metrics::Metrics::annotation_errors)).
    pub annotation_errors: Vec<AnnotationError>,
    /// Why [`ORIGINAL_PROBES_ANNOTATION`] could not be read, when it could not: the pod is served
    /// without originals (its rewritten HTTP probes then fail with a 404 that says so). For the
    /// reconciler to log and count, like [`Self::annotation_errors`].
    pub originals_error: Option<String>,
    /// The pod carries [`REPLACED_MESH_INIT_ANNOTATION`]: its mesh's iptables init container was
    /// replaced, so the datapath is all that sends its traffic through its sidecar.
    pub replaced_mesh_init: bool,
}

/// Every annotation [`Pod::from_k8s`] reads: the mesh's exclusion lists under both prefixes, the
/// original probes and the record of a replaced init container. A source that trims pods keeps
/// these and drops the rest.
pub fn read_annotations() -> impl Iterator<Item = String> {
    crate::exclusions::annotation_keys().chain(
        [ORIGINAL_PROBES_ANNOTATION, REPLACED_MESH_INIT_ANNOTATION]
            .into_iter()
            .map(str::to_owned),
    )
}

impl Pod {
    /// `shop/bookstore` at 198.18.0.2 in the named namespace `pod`, probing port 8080, with
    /// nothing else: for unit tests to change what they test.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self {
            key: PodKey {
                namespace: "shop".into(),
                name: "bookstore".into(),
            },
            ip: IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 2)),
            other_ips: Vec::new(),
            netns: NetnsRef::Named("pod".into()),
            probe_ports: BTreeSet::from([8080]),
            originals: OriginalProbes::default(),
            container_ports: BTreeMap::new(),
            exclusions: Exclusions::default(),
            annotation_errors: Vec::new(),
            originals_error: None,
            replaced_mesh_init: false,
        }
    }

    /// The declared ports of `container`; none for a container the pod does not have.
    pub fn ports_of(&self, container: &str) -> &[ContainerPort] {
        declared_ports(&self.container_ports, container)
    }

    /// What the pod's record says of the original probes a healthcheck request stands for: those
    /// `stands_for` accepts, given the container's declared ports. A tcpSocket or gRPC probe
    /// rewritten to the healthcheck names only its port (and service), not which probe it is.
    pub fn recorded(&self, stands_for: impl Fn(&Probe, &[ContainerPort]) -> bool) -> Recorded<'_> {
        let mut recorded = Recorded::default();
        for (container, kind, original) in self.originals.iter() {
            if !stands_for(original.probe(), self.ports_of(container)) {
                continue;
            }
            let timeout = timeout_of(original.probe());
            recorded.timeout = recorded.timeout.max(Some(timeout));
            recorded.count += 1;
            recorded.container = match recorded.container {
                None if recorded.count == 1 => Some(container),
                Some(same) if same == container => Some(same),
                _ => None,
            };
            recorded.kind = (recorded.count == 1).then_some(kind);
        }
        recorded
    }
}

/// The original probes a healthcheck request stands for, as far as the pod's record tells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded<'a> {
    /// How many recorded probes it may stand for.
    pub count: usize,
    /// Their container, when they share one.
    pub container: Option<&'a str>,
    /// Their kind, when there is one probe.
    pub kind: Option<ProbeKind>,
    /// The longest of their `timeoutSeconds`. The kubelet bounds each probe with its own on its
    /// request to the agent, so the agent bounding its check by the longest decides none of them
    /// early.
    pub timeout: Option<Duration>,
}

impl Recorded<'_> {
    /// The labels an outcome is counted under: the container and kind when known.
    pub fn labels(&self) -> (&str, Option<ProbeKind>) {
        (self.container.unwrap_or_default(), self.kind)
    }
}

/// The declared ports of `container` in `by_container`; none for a container not in it.
fn declared_ports<'a>(
    by_container: &'a BTreeMap<String, Vec<ContainerPort>>,
    container: &str,
) -> &'a [ContainerPort] {
    by_container.get(container).map_or(&[], Vec::as_slice)
}

/// Why a manifest does not describe a pod the agent can serve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("kind is {kind:?}, expected \"Pod\" (apiVersion v1)")]
    NotAPod { kind: String },
    #[error("metadata.name is missing")]
    MissingName,
    #[error("status.podIP is missing: the agent needs the address the kubelet probes")]
    MissingPodIp,
    #[error("status.podIP {value:?} is not an IP address")]
    InvalidPodIp { value: String },
    #[error("annotation {NETNS_ANNOTATION} is missing: it names the pod's network namespace")]
    MissingNetns,
    #[error("annotation {NETNS_ANNOTATION}={value:?} is invalid: {reason}")]
    InvalidNetns { value: String, reason: String },
    #[error("not a valid Pod: {0}")]
    Schema(String),
}

/// A pod read from a manifest, with what was odd about it but did not stop it being served.
#[derive(Debug)]
pub struct Parsed {
    pub pod: Pod,
    pub warnings: Vec<String>,
}

impl Pod {
    /// Reads a Pod manifest (YAML or JSON, as an already parsed document) whose netns is named by
    /// the [`NETNS_ANNOTATION`] annotation.
    pub fn from_manifest(doc: serde_json::Value) -> Result<Parsed, PodError> {
        let kind = doc.get("kind").and_then(|k| k.as_str()).unwrap_or_default();
        let api_version = doc
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if kind != "Pod" || api_version != "v1" {
            return Err(PodError::NotAPod {
                kind: kind.to_owned(),
            });
        }
        let pod: k8s_openapi::api::core::v1::Pod =
            serde_json::from_value(doc).map_err(|e| PodError::Schema(e.to_string()))?;
        let annotation = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NETNS_ANNOTATION))
            .ok_or(PodError::MissingNetns)?;
        let netns = NetnsRef::parse(annotation)?;
        Self::from_k8s(&pod, netns)
    }

    /// Builds the agent's view of a Kubernetes pod whose network namespace is already known.
    pub fn from_k8s(
        pod: &k8s_openapi::api::core::v1::Pod,
        netns: NetnsRef,
    ) -> Result<Parsed, PodError> {
        let name = pod.metadata.name.clone().ok_or(PodError::MissingName)?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let ip_text = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|ip| !ip.is_empty())
            .ok_or(PodError::MissingPodIp)?;
        let ip = ip_text.parse().map_err(|_| PodError::InvalidPodIp {
            value: ip_text.to_owned(),
        })?;
        let mut warnings = Vec::new();
        let mut other_ips = Vec::new();
        let listed = pod.status.as_ref().and_then(|s| s.pod_ips.as_ref());
        for text in listed.into_iter().flatten().map(|entry| entry.ip.as_str()) {
            match text.parse::<IpAddr>() {
                Ok(other) if other != ip && !other_ips.contains(&other) => other_ips.push(other),
                Ok(_) => {}
                Err(_) => warnings.push(format!(
                    "status.podIPs entry {text:?} is not an IP address; ignored (the pod's \
                     other addresses are intercepted)"
                )),
            }
        }
        let mut probe_ports = BTreeSet::new();
        let mut container_ports = BTreeMap::new();
        if let Some(spec) = &pod.spec {
            // Init containers count too: a sidecar (restartPolicy Always) init container has probes.
            let containers = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten());
            for container in containers {
                collect_probe_ports(container, &mut probe_ports, &mut warnings);
                container_ports.insert(
                    container.name.clone(),
                    container.ports.clone().unwrap_or_default(),
                );
            }
        }
        let (exclusions, annotation_errors) = match &pod.metadata.annotations {
            Some(annotations) => Exclusions::from_annotations(annotations),
            None => (Exclusions::default(), Vec::new()),
        };
        let annotation = |key| {
            pod.metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(key))
        };
        let replaced_mesh_init = annotation(REPLACED_MESH_INIT_ANNOTATION).is_some();
        let recorded = annotation(ORIGINAL_PROBES_ANNOTATION);
        let (originals, originals_error) = match recorded.map(|text| OriginalProbes::parse(text)) {
            None => (OriginalProbes::default(), None),
            Some(Ok(originals)) => (originals, None),
            Some(Err(error)) => (OriginalProbes::default(), Some(error.to_string())),
        };
        for (container, kind, original) in originals.iter() {
            if let Some(port) = original_port(original.probe()) {
                let declared = declared_ports(&container_ports, container);
                let what = || format!("container {container:?} original {kind} probe");
                add_port(&port, declared, what, &mut probe_ports, &mut warnings);
            }
        }
        Ok(Parsed {
            pod: Pod {
                key: PodKey { namespace, name },
                ip,
                other_ips,
                netns,
                probe_ports,
                originals,
                container_ports,
                exclusions,
                annotation_errors,
                originals_error,
                replaced_mesh_init,
            },
            warnings,
        })
    }
}

/// Adds the ports a container's probes name: tcpSocket ports, and the `Original-Tcp-Port`,
/// `Original-Grpc-Port` and `Original-Http-Port` headers of probes already rewritten.
fn collect_probe_ports(
    container: &Container,
    ports: &mut BTreeSet<u16>,
    warnings: &mut Vec<String>,
) {
    let probes = [
        ("liveness", &container.liveness_probe),
        ("readiness", &container.readiness_probe),
        ("startup", &container.startup_probe),
    ];
    for (kind, probe) in probes {
        let Some(probe) = probe else { continue };
        for port in probe_ports_of(probe) {
            let declared = container.ports.as_deref().unwrap_or_default();
            let what = || format!("container {:?} {kind} probe", container.name);
            add_port(&port, declared, what, ports, warnings);
        }
    }
}

/// Adds `port`, resolved against the container's `declared` ports, to `ports`; one that does not
/// resolve is a warning about `what` names instead.
fn add_port(
    port: &IntOrString,
    declared: &[ContainerPort],
    what: impl FnOnce() -> String,
    ports: &mut BTreeSet<u16>,
    warnings: &mut Vec<String>,
) {
    match resolve_port(port, declared) {
        Ok(port) => {
            ports.insert(port);
        }
        Err(reason) => warnings.push(format!(
            "{}: {reason}; that port will not be served",
            what()
        )),
    }
}

/// The port an original probe checks, before a named one is resolved: the agent runs it.
fn original_port(probe: &Probe) -> Option<IntOrString> {
    let tcp = probe.tcp_socket.as_ref().map(|tcp| tcp.port.clone());
    let http = probe.http_get.as_ref().map(|http| http.port.clone());
    let grpc = probe.grpc.as_ref().map(|grpc| IntOrString::Int(grpc.port));
    tcp.or(http).or(grpc)
}

/// The ports a probe as the kubelet sees it names, before named ports are resolved: a tcpSocket
/// port, and the ports in the headers of a probe already rewritten.
fn probe_ports_of(probe: &Probe) -> Vec<IntOrString> {
    let mut ports = Vec::new();
    if let Some(tcp) = &probe.tcp_socket {
        ports.push(tcp.port.clone());
    }
    if let Some(http) = &probe.http_get {
        for header in http.http_headers.iter().flatten() {
            let names_a_port = [
                ORIGINAL_TCP_PORT_HEADER,
                ORIGINAL_GRPC_PORT_HEADER,
                ORIGINAL_HTTP_PORT_HEADER,
            ]
            .iter()
            .any(|name| header.name.eq_ignore_ascii_case(name));
            if names_a_port {
                ports.push(IntOrString::String(header.value.clone()));
            }
        }
    }
    ports
}

/// A probe's `timeoutSeconds` as the kubelet applies it: 1 s when absent (the API server's
/// default), and never under 1 s (the API server's minimum).
pub fn timeout_of(probe: &Probe) -> Duration {
    let seconds = probe.timeout_seconds.unwrap_or(1).max(1);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(1))
}

#[cfg(test)]
mod tests;
