//! probe-bypass: one agent per node that lets kubelet health probes past a service mesh's sidecar.
//!
//! The folder layout is the architecture:
//! - [`datapath`]: the eBPF programs (cgroup hooks, and sk_lookup in each meshed pod's network
//!   namespace), embedded in this binary, and their loader.
//! - [`source`]: where the node's meshed pods come from: the Kubernetes API server, or a
//!   directory of pod manifests.
//! - [`discovery`]: finds a Kubernetes pod's network namespace from the host's `/proc`.
//! - [`reconcile`]: turns the wanted set of pods into per-pod listeners, retrying the ones that fail.
//! - [`healthcheck`]: the HTTP-to-TCP healthcheck served inside each pod's network namespace.
//! - [`prober`]: the pod's original httpGet and gRPC probes, run by the agent from inside the pod.
//! - [`admin`]: liveness, readiness and Prometheus metrics in the host network namespace, and on
//!   a Unix socket private to the agent's container.
//! - [`health`]: `probe-bypass health`, the container's probes, which ask the agent over that socket.
//! - [`preflight`]: the start-up checks of the host (kernel, capabilities, cgroup v2, bpffs).
//! - [`exclusions`]: the mesh's per-pod exclusion annotations and the node-wide defaults.
//! - [`webhook`]: `probe-bypass webhook`, the mutating admission webhook that applies the rewriter
//!   to new Pods.
//!
//! The probe rewriter (a pod's probes pointed at the agent, the originals recorded in an
//! annotation, as a JSON Patch for the webhook and as `probe-bypass rewrite` for manifests) and the
//! names the rewriter and the agent share are the workspace's kernel-free crate
//! [`probe_bypass_rewrite`].

pub mod admin;
pub mod cli;
pub mod datapath;
pub mod defaults;
pub mod dial;
pub mod dir_watch;
pub mod discovery;
pub mod error;
pub mod exclusions;
pub mod http_text;
pub mod listen;
pub mod netns;
pub mod pod;
pub mod preflight;
pub mod reconcile;
pub mod run;
pub mod serve;
pub mod signal;
pub mod source;
pub mod time;
pub mod webhook;
