//! probe-bypass: one agent per node that lets kubelet health probes past a service mesh's sidecar.
//!
//! The folder layout is the architecture. Modules sit in five layers, and a module imports only
//! modules of its own layer or of a layer below (`cargo xtask layers` checks it; ARCHITECTURE.md
//! draws it):
//!
//! 1. **Leaf: helpers, defaults and the pod model.** [`defaults`] (every default path, port and
//!    name), [`netns`] (namespace handles and the thread that enters them), [`dial`] (TCP connects
//!    from inside a pod), [`listen`], [`signal`], [`error`], [`time`] (backoff, deadlines),
//!    [`dir_watch`], [`http_text`], [`serving_cert`] (a TLS server's certificate); [`pod`] (the agent's view of a meshed pod) and [`exclusions`]
//!    (the traffic that skips the sidecar).
//! 2. **The node.** [`datapath`] (the eBPF programs embedded in this binary, and their loader),
//!    [`discovery`] (a pod's network namespace found from the host's `/proc`), [`source`] (where
//!    the node's meshed pods come from: the Kubernetes API, or a directory of manifests), and
//!    [`preflight`] (the host's start-up checks).
//! 3. **Serving.** [`serve`] (the healthcheck on 15904 and the prober, inside each pod's network
//!    namespace, and the series they count) and [`admin`] (liveness, readiness and metrics; the
//!    `probe-bypass health` client).
//! 4. **[`reconcile`]**: the pod set made real, each pod's datapath entries and listeners opened,
//!    moved, closed and retried.
//! 5. **Commands.** [`cli`], [`run`] (`probe-bypass run`, which wires the layers together) and
//!    [`webhook`] (`probe-bypass webhook`), [`validate`] (`probe-bypass validate`, the validation
//!    init container's check). Only the binary uses `run`.
//!
//! The probe rewriter (a pod's probes pointed at the agent, the originals recorded in an
//! annotation), the webhook's review function, and the names the rewriter and the agent share are
//! the workspace's kernel-free crate [`probe_bypass_rewrite`].

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
pub mod serving_cert;
pub mod signal;
pub mod source;
pub mod time;
pub mod validate;
pub mod webhook;
