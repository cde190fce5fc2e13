//! The agent's own ports, paths and annotation names: the proxy's, the admin endpoints', the
//! webhook's, the mesh's exclusion annotations. Those a rewritten probe carries, which the rewriter
//! writes and the agent answers on, are the contract in [`probe_bypass_rewrite::contract`].
//!
//! Values match FSM and OSM (`shared/reference/peers.md` §1, §3) so that pods rewritten by either
//! mesh's injector keep working unchanged.

/// Annotation that names a pod's network namespace in a pod manifest: a name under
/// [`NETNS_RUN_DIR`] or an absolute path (for example `/proc/<pid>/ns/net`).
pub const NETNS_ANNOTATION: &str = "probe-bypass/netns";

/// The proxy's UID and ports, and the mesh's exclusion annotations, which the rewriter writes
/// too (`--replace-mesh-init` carries the mesh's exclusions into them).
pub use probe_bypass_rewrite::contract::{
    INBOUND_PORT_EXCLUSION_LIST, MESH_ANNOTATION_PREFIXES, OUTBOUND_IP_RANGE_EXCLUSION_LIST,
    OUTBOUND_IP_RANGE_INCLUSION_LIST, OUTBOUND_PORT_EXCLUSION_LIST, PROXY_INBOUND_PORT,
    PROXY_OUTBOUND_PORT, PROXY_UID,
};

/// Where `ip netns add` keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Default address of the plain-HTTP admin endpoints (health and metrics), in the host network
/// namespace: loopback, as it names pods to every caller. 9091 is the port FSM's controller uses
/// for the same endpoints.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9091";

/// The Unix socket the agent's container probes ask it on (`probe-bypass health`), in a directory
/// private to the container (an emptyDir in the DaemonSet).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/probe-bypass/admin.sock";

/// Ports the mesh's iptables rules leave alone on the way in: the proxy's metrics port (15010), the
/// liveness/readiness/startup probe ports the injector rewrites httpGet probes to (15901-15903) and
/// the healthcheck (15904). The datapath lets only the kubelet reach them past the proxy.
pub const DEFAULT_PROBE_PORTS: &str = "15010,15901,15902,15903,15904";

/// Default address of the admission webhook's HTTPS listener; the webhook's Service sends 443 here.
pub const DEFAULT_WEBHOOK_LISTEN: &str = "0.0.0.0:9443";

/// Default address of the webhook's plain-HTTP `/healthz`: port 9090, as FSM's injector.
pub const DEFAULT_WEBHOOK_HEALTHZ: &str = "0.0.0.0:9090";

/// The path the API server POSTs admission reviews to (the MutatingWebhookConfiguration's
/// `clientConfig.service.path`).
pub const WEBHOOK_MUTATE_PATH: &str = "/mutate";

/// The path at which the webhook always replaces the mesh's iptables init container, whatever
/// `--replace-mesh-init` says: a MutatingWebhookConfiguration entry that selects namespaces by
/// label sends their pods here.
pub const WEBHOOK_REPLACE_MESH_INIT_PATH: &str = "/mutate/replace-mesh-init";

/// The webhook's health path, on [`DEFAULT_WEBHOOK_HEALTHZ`].
pub const WEBHOOK_HEALTHZ_PATH: &str = "/healthz";

/// Where the agent pins its eBPF links and maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/probe-bypass";

/// How often a pod's network namespace file is checked against the namespace it named: the
/// process that named it may exit, or a namespace may be replaced under the same name. The pod
/// source looks a stale one up again; the reconciler reopens the listeners of a replaced one.
pub const NETNS_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Where bpffs is mounted on a usual node, and the one place the agent mounts it itself.
pub const BPFFS_DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// The mount table of the agent's mount namespace, where the cgroup v2 hierarchy is found.
pub const PROC_MOUNTS: &str = "/proc/mounts";

/// The host's `/proc`, where pods' network namespaces are found, unless told otherwise (the
/// DaemonSet mounts the host's at `/host/proc`).
pub const DEFAULT_PROC_ROOT: &str = "/proc";

/// The labels FSM's and OSM's injectors put on every pod they inject.
pub const DEFAULT_MESH_LABELS: &str = "fsm-proxy-uuid,osm-proxy-uuid";

/// The admin endpoints' paths: liveness, readiness and Prometheus metrics.
pub const ALIVE_PATH: &str = "/health/alive";
pub const READY_PATH: &str = "/health/ready";
pub const METRICS_PATH: &str = "/metrics";
