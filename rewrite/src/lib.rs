//! probe-bypass-rewrite: everything kernel-free that the probe rewriter and the admission webhook
//! need, and the contract between the rewriter and the agent ([`contract`]: the ports, paths,
//! headers and annotations a rewritten probe carries, [`ProbeKind`], [`OriginalProbes`],
//! [`ports::resolve_port`]). It depends on no kernel or runtime crate (no aya, nix, tokio), so it
//! builds, tests and fuzzes without the eBPF toolchain and without the agent, which depends on it.
//!
//! The rewriter rewrites a pod's probes so that the kubelet asks the agent, past the mesh's
//! sidecar, and records the originals so that the agent knows what to check. Used by
//! `probe-bypass rewrite` ([`manifest`]) and by the admission webhook, which returns
//! [`Rewrite::patch`] to the API server as it is.
//!
//! The rules (`docs/probe-rewriting.md` has the same with examples):
//! - Only `spec.containers[*]` are rewritten. Init containers, restartable init containers
//!   ("sidecars", `restartPolicy: Always`) and ephemeral containers are left alone: the meshes'
//!   injectors leave them alone too, and a sidecar's probes usually check the sidecar itself.
//! - httpGet probes take the [`Style`]'s shape; tcpSocket probes become an httpGet on 15904
//!   `/fsm-healthcheck` with `Original-Tcp-Port`; gRPC probes an httpGet on 15904
//!   `/probe-bypass-grpc` with `Original-Grpc-Port` and, when the probe names a service,
//!   `Original-Grpc-Service`. exec probes are never changed; an absent probe stays absent. Every
//!   other field of a probe (the timing fields, `terminationGracePeriodSeconds`, fields this crate
//!   does not know) is kept.
//! - Named ports resolve as the kubelet resolves them ([`ports`]). A port that does not resolve
//!   leaves that probe unchanged, with a [`Warning`] that says why; the peers rewrite it to port 0,
//!   where it can only fail.
//! - `httpGet.host`: the rewritten probe never has one, so the kubelet targets the pod's IP, where
//!   the agent answers; the original, `host` included, is recorded and the agent's prober uses it.
//!   A `Host` header in `httpHeaders` is kept on the rewritten probe (the kubelet sends it to the
//!   agent) and recorded with the original.
//! - Two containers' probes of one kind never share an endpoint (osm#3773): in the osm style an
//!   HTTP probe's path names its container, and only the first container's HTTPS probe of a kind is
//!   rewritten (an HTTPS probe keeps its path, so a second could not be told apart); in the fsm
//!   style every probe carries its target in headers.
//! - The originals of the rewritten probes go into one annotation, [`ORIGINAL_PROBES_ANNOTATION`]
//!   ([`original`]). Rewriting is idempotent: a probe that already targets a probe port is
//!   rewritten from its recorded original, or, with none recorded, left as it is and never
//!   recorded as an original.
//! - A pod annotated [`REWRITE_ANNOTATION`]`: "disabled"` is left alone: no patch, no warning.
//! - With [`Options::replace_mesh_init`], the mesh's iptables init container gives way to the
//!   validation init container, its exclusions carried onto the pod, and the mesh's healthcheck
//!   container goes ([`mesh_init`], `docs/replace-mesh-init.md`).

pub mod contract;
mod kind;
pub mod manifest;
pub mod mesh_init;
pub mod original;
mod patch;
pub mod ports;
mod probe;
pub mod review;
mod style;
mod warning;

use std::collections::{BTreeMap, BTreeSet};

use json_patch::{Patch, PatchOperation, jsonptr::PointerBuf};
use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use serde_json::{Map, Value};

use self::probe::{Check, Plan};
pub use self::{
    kind::ProbeKind,
    mesh_init::Kept,
    original::{Original, OriginalError, OriginalProbes},
    style::Style,
    warning::{Issue, Unchanged, Warning},
};
use crate::contract::{
    DEFAULT_VALIDATION_IMAGE, ORIGINAL_PROBES_ANNOTATION, REWRITE_ANNOTATION, REWRITE_DISABLED,
};

/// What the rewriter does to a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// The shape of rewritten httpGet probes.
    pub style: Style,
    /// Replace the mesh's iptables init container with the validation init container, carrying
    /// its exclusions onto the pod, and remove the mesh's healthcheck container ([`mesh_init`]).
    pub replace_mesh_init: bool,
    /// The image of the validation init container: the agent's.
    pub validation_image: String,
}

impl Options {
    /// Probes rewritten in `style`, nothing else.
    pub fn new(style: Style) -> Options {
        Options {
            style,
            replace_mesh_init: false,
            validation_image: DEFAULT_VALIDATION_IMAGE.to_owned(),
        }
    }

    /// These options with `--replace-mesh-init` on.
    pub fn replacing_mesh_init(self) -> Options {
        Options {
            replace_mesh_init: true,
            ..self
        }
    }
}

/// What rewriting a pod comes to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rewrite {
    /// RFC 6902 operations against the pod's JSON; empty when nothing changes.
    pub patch: Patch,
    pub warnings: Vec<Warning>,
}

/// A pod the rewriter cannot read. Such a pod fails the API server's validation as well.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("{pointer} is {problem}")]
    Shape { pointer: String, problem: String },
    #[error(transparent)]
    Original(#[from] OriginalError),
    #[error("the rewrite's own patch does not apply, which is a bug: {0}")]
    Patch(#[from] json_patch::PatchError),
}

fn shape(pointer: impl Into<String>, problem: impl Into<String>) -> RewriteError {
    RewriteError::Shape {
        pointer: pointer.into(),
        problem: problem.into(),
    }
}

/// The patch that rewrites `pod` (a Pod, or a pod template: anything with `metadata` and `spec`),
/// and what the user should know about it.
pub fn rewrite_pod(pod: &Value, style: Style) -> Result<Rewrite, RewriteError> {
    rewrite_pod_with(pod, &Options::new(style))
}

/// [`rewrite_pod`] with every option.
pub fn rewrite_pod_with(pod: &Value, options: &Options) -> Result<Rewrite, RewriteError> {
    let style = options.style;
    let pod = pod
        .as_object()
        .ok_or_else(|| shape("the pod", "not a JSON object"))?;
    let metadata = optional_object(pod.get("metadata"), "/metadata")?;
    let annotations = optional_object(
        metadata.and_then(|m| m.get("annotations")),
        "/metadata/annotations",
    )?;
    let annotation = |key: &str| annotations.and_then(|a| a.get(key));
    let pod_name = metadata
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .map(ToOwned::to_owned);

    let mut warnings = Vec::new();
    match annotation(REWRITE_ANNOTATION) {
        Some(Value::String(value)) if value == REWRITE_DISABLED => return Ok(Rewrite::default()),
        Some(value) => warnings.push(Warning {
            pod: pod_name.clone(),
            issue: Issue::OptOutValue {
                value: value.to_string(),
            },
        }),
        None => {}
    }
    let recorded = match annotation(ORIGINAL_PROBES_ANNOTATION) {
        None => OriginalProbes::default(),
        Some(Value::String(text)) => OriginalProbes::parse(text)?,
        Some(_) => {
            let pointer =
                PointerBuf::from_tokens(["metadata", "annotations", ORIGINAL_PROBES_ANNOTATION]);
            return Err(shape(pointer.as_str(), "not a string"));
        }
    };

    let spec = optional_object(pod.get("spec"), "/spec")?;
    let replacement = if options.replace_mesh_init {
        let (replacement, issues) = mesh_init::plan(spec, annotations, &options.validation_image);
        warnings.extend(issues.into_iter().map(|issue| Warning {
            pod: pod_name.clone(),
            issue,
        }));
        replacement
    } else {
        None
    };
    let removed = replacement.as_ref().and_then(|r| r.healthcheck_index);
    let containers = spec
        .and_then(|spec| spec.get("containers"))
        .and_then(Value::as_array)
        .ok_or_else(|| shape("/spec/containers", "missing or not a list"))?;
    let mut rewriter = Rewriter {
        style,
        pod_name,
        recorded: &recorded,
        originals: OriginalProbes::default(),
        https_owners: BTreeMap::new(),
        patch: Vec::new(),
        warnings,
    };
    let mut names = BTreeSet::new();
    for (index, container) in containers.iter().enumerate() {
        let name = if removed == Some(index) {
            // Removed below; its probes, if any, are the healthcheck's own.
            container
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
        } else {
            rewriter.container(index, container)?
        };
        // The record is by container name: two containers of one name would overwrite each
        // other's originals.
        if !names.insert(name) {
            return Err(shape(
                format!("/spec/containers/{index}/name"),
                format!("{name:?}, the name of an earlier container too"),
            ));
        }
    }

    let Rewriter {
        style: _,
        pod_name: _,
        recorded: _,
        originals,
        https_owners: _,
        mut patch,
        warnings,
    } = rewriter;
    let existing = annotation(ORIGINAL_PROBES_ANNOTATION).and_then(Value::as_str);
    let mut set = Vec::new();
    if originals.is_empty() {
        if existing.is_some() {
            patch.push(patch::remove_annotation(ORIGINAL_PROBES_ANNOTATION));
        }
    } else {
        let text = originals.to_annotation();
        if existing != Some(text.as_str()) {
            set.push((ORIGINAL_PROBES_ANNOTATION.to_owned(), text));
        }
    }
    if let Some(replacement) = replacement {
        set.extend(replacement.annotations);
        patch.extend(patch::set_annotations(metadata, set));
        // The probes' paths name containers by their index before any is removed, so the
        // containers change last.
        let init = patch::container_path("initContainers", replacement.init_index);
        patch.push(match replacement.validation {
            Some(validation) => patch::replace(init, validation),
            None => patch::remove(init),
        });
        if let Some(index) = replacement.healthcheck_index {
            patch.push(patch::remove(patch::container_path("containers", index)));
        }
    } else {
        patch.extend(patch::set_annotations(metadata, set));
    }
    Ok(Rewrite {
        patch: Patch(patch),
        warnings,
    })
}

/// Rewrites `pod` in place, as [`rewrite_pod`] would have it patched.
pub fn rewrite_in_place(pod: &mut Value, style: Style) -> Result<Vec<Warning>, RewriteError> {
    rewrite_in_place_with(pod, &Options::new(style))
}

/// Rewrites `pod` in place, as [`rewrite_pod_with`] would have it patched.
pub fn rewrite_in_place_with(
    pod: &mut Value,
    options: &Options,
) -> Result<Vec<Warning>, RewriteError> {
    let Rewrite { patch, warnings } = rewrite_pod_with(pod, options)?;
    json_patch::patch(pod, &patch)?;
    Ok(warnings)
}

/// `value` as an object; absent and `null` are the same to the API server.
fn optional_object<'a>(
    value: Option<&'a Value>,
    pointer: &str,
) -> Result<Option<&'a Map<String, Value>>, RewriteError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(object)) => Ok(Some(object)),
        Some(_) => Err(shape(pointer, "not an object")),
    }
}

/// One pod's rewrite, container by container.
struct Rewriter<'a> {
    style: Style,
    pod_name: Option<String>,
    /// The originals the pod's annotation recorded by an earlier rewrite.
    recorded: &'a OriginalProbes,
    /// The originals of the probes rewritten now: the annotation's new value.
    originals: OriginalProbes,
    /// In the osm style, the container whose HTTPS probe has each kind's port.
    https_owners: BTreeMap<ProbeKind, String>,
    patch: Vec<PatchOperation>,
    warnings: Vec<Warning>,
}

impl<'a> Rewriter<'a> {
    /// Rewrites the probes of the container at `index`, and says its name.
    fn container<'c>(
        &mut self,
        index: usize,
        container: &'c Value,
    ) -> Result<&'c str, RewriteError> {
        let pointer = format!("/spec/containers/{index}");
        let container = container
            .as_object()
            .ok_or_else(|| shape(&pointer, "not an object"))?;
        let name = container
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| shape(format!("{pointer}/name"), "missing or not a string"))?;
        let ports: Vec<ContainerPort> = match container.get("ports") {
            None | Some(Value::Null) => Vec::new(),
            Some(ports) => serde_json::from_value(ports.clone()).map_err(|error| {
                shape(
                    format!("{pointer}/ports"),
                    format!("not a list of container ports: {error}"),
                )
            })?,
        };
        for kind in ProbeKind::ALL {
            let Some(current) = container.get(kind.field()).filter(|p| !p.is_null()) else {
                continue;
            };
            let wanted = self.probe(name, &ports, kind, current);
            if wanted != *current {
                let path = patch::probe_path(index, kind.field());
                self.patch.push(patch::replace(path, wanted));
            }
        }
        Ok(name)
    }

    /// What the `kind` probe of `container`, now `current`, should be.
    fn probe(
        &mut self,
        container: &str,
        ports: &[ContainerPort],
        kind: ProbeKind,
        current: &Value,
    ) -> Value {
        let typed: Probe = match serde_json::from_value(current.clone()) {
            Ok(typed) => typed,
            Err(error) => {
                self.warn(container, kind, Unchanged::NotAProbe(error.to_string()));
                return current.clone();
            }
        };
        let (source, typed) = match probe::rewritten_port(&typed) {
            None => (current, typed),
            Some(port) => {
                // The record outlives this borrow of `self`, which `warn` needs.
                let recorded: &'a OriginalProbes = self.recorded;
                let recorded = recorded
                    .get(container, kind)
                    .filter(|original| probe::rewritten_port(original.probe()).is_none());
                match recorded {
                    Some(original) => (original.json(), original.probe().clone()),
                    // FSM's injector ran first: the agent answers the probe as it is.
                    None if probe::carries_its_original(&typed) => return current.clone(),
                    None => {
                        self.warn(container, kind, Unchanged::AlreadyRewritten { port });
                        return current.clone();
                    }
                }
            }
        };
        let check = match probe::plan(&typed, ports) {
            Plan::Keep => return source.clone(),
            Plan::Warn(reason) => {
                self.warn(container, kind, reason);
                return source.clone();
            }
            Plan::Rewrite(check) => check,
        };
        if self.style == Style::Osm && matches!(check, Check::Http { https: true, .. }) {
            if let Some(owner) = self.https_owners.get(&kind) {
                let owner = owner.clone();
                self.warn(container, kind, Unchanged::HttpsPortTaken { owner });
                return source.clone();
            }
            self.https_owners.insert(kind, container.to_owned());
        }
        let Some(object) = source.as_object() else {
            // A value that reads as a probe is an object; nothing else gets here.
            return source.clone();
        };
        let rewritten = self.style.rewrite(object, check, kind, container);
        self.originals.insert(
            container,
            kind,
            Original::new(source.clone(), typed.clone()),
        );
        rewritten
    }

    fn warn(&mut self, container: &str, kind: ProbeKind, reason: Unchanged) {
        self.warnings.push(Warning {
            pod: self.pod_name.clone(),
            issue: Issue::ProbeUnchanged {
                container: container.to_owned(),
                kind,
                reason,
            },
        });
    }
}
