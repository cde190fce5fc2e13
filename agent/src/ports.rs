//! The one place that knows the mesh's ports, paths, headers and annotation names.
//!
//! Values match FSM and OSM (`shared/reference/peers.md` §1, §3) so that pods rewritten by either
//! mesh's injector keep working unchanged.

/// Port of the HTTP-to-TCP healthcheck that tcpSocket probes are rewritten to.
pub const HEALTHCHECK_PORT: u16 = 15904;

/// The healthcheck's path in FSM's spelling, the one the probe rewriter writes.
pub const HEALTHCHECK_PATH: &str = "/fsm-healthcheck";

/// Paths the healthcheck answers on: FSM's and OSM's spelling.
pub const HEALTHCHECK_PATHS: [&str; 2] = [HEALTHCHECK_PATH, "/osm-healthcheck"];

/// Header that carries the port of the original tcpSocket probe.
pub const ORIGINAL_TCP_PORT_HEADER: &str = "Original-Tcp-Port";

/// Path on the healthcheck port that a rewritten gRPC probe asks: the agent runs the original
/// gRPC health check from inside the pod and answers 200 (SERVING) or 503. The probe-bypass
/// name, not a mesh's: neither FSM nor OSM rewrites gRPC probes.
pub const GRPC_HEALTHCHECK_PATH: &str = "/probe-bypass-grpc";

/// Header of a [`GRPC_HEALTHCHECK_PATH`] request: the original gRPC probe's port.
pub const ORIGINAL_GRPC_PORT_HEADER: &str = "Original-Grpc-Port";

/// Header of a [`GRPC_HEALTHCHECK_PATH`] request: the original gRPC probe's service, if it names
/// one (absent: the empty service, the server's overall health).
pub const ORIGINAL_GRPC_SERVICE_HEADER: &str = "Original-Grpc-Service";

/// Port the rewriter points liveness httpGet probes at (FSM's and OSM's).
pub const LIVENESS_PROBE_PORT: u16 = 15901;
/// Port the rewriter points readiness httpGet probes at.
pub const READINESS_PROBE_PORT: u16 = 15902;
/// Port the rewriter points startup httpGet probes at.
pub const STARTUP_PROBE_PORT: u16 = 15903;

/// Path of a rewritten liveness httpGet probe in the OSM shape, followed by `/<container>` so that
/// two containers' probes of one kind never share an endpoint (osm#3773). Spelled as the FSM
/// documentation spells it, as are the two below.
pub const LIVENESS_PROBE_PATH: &str = "/fsm-liveness-probe";
/// Path of a rewritten readiness httpGet probe in the OSM shape, followed by `/<container>`.
pub const READINESS_PROBE_PATH: &str = "/fsm-readiness-probe";
/// Path of a rewritten startup httpGet probe in the OSM shape, followed by `/<container>`.
pub const STARTUP_PROBE_PATH: &str = "/fsm-startup-probe";

/// Header of FSM's shape of a rewritten HTTP probe: the original port.
pub const ORIGINAL_HTTP_PORT_HEADER: &str = "Original-Http-Port";
/// Header of FSM's shape of a rewritten HTTP probe: the original path.
pub const ORIGINAL_HTTP_PATH_HEADER: &str = "Original-Http-Path";

/// Pod annotation that holds the probes as they were before the rewriter changed them, as JSON
/// `{"<container>":{"liveness":<Probe>,...}}`; the agent probes what it names.
pub const ORIGINAL_PROBES_ANNOTATION: &str = "probe-bypass.io/original-probes";

/// Pod annotation that, set to [`REWRITE_DISABLED`], keeps the rewriter away from the pod.
pub const REWRITE_ANNOTATION: &str = "probe-bypass.io/rewrite";
/// The value of [`REWRITE_ANNOTATION`] that opts a pod out.
pub const REWRITE_DISABLED: &str = "disabled";

/// Annotation that names a pod's network namespace in a pod manifest: a name under
/// [`NETNS_RUN_DIR`] or an absolute path (for example `/proc/<pid>/ns/net`).
pub const NETNS_ANNOTATION: &str = "probe-bypass/netns";

/// Where `ip netns add` keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Default address of the admin endpoints (health and metrics), in the host network namespace.
/// 9091 is the port FSM's controller uses for the same endpoints.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:9091";

/// The Unix socket the agent's container probes ask it on (`probe-bypass health`), in a directory
/// private to the container (an emptyDir in the DaemonSet).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/probe-bypass/admin.sock";

/// UID the mesh's sidecar proxy runs as.
pub const PROXY_UID: u32 = 1500;

/// The proxy's inbound port: the mesh redirects connections to a meshed pod here.
pub const PROXY_INBOUND_PORT: u16 = 15003;

/// The proxy's outbound port: the mesh redirects a meshed pod's own connections here.
pub const PROXY_OUTBOUND_PORT: u16 = 15001;

/// Ports the mesh's iptables rules leave alone on the way in: the proxy's metrics port (15010), the
/// liveness/readiness/startup probe ports the injector rewrites httpGet probes to (15901-15903) and
/// the healthcheck (15904). The datapath lets only the kubelet reach them past the proxy.
pub const DEFAULT_PROBE_PORTS: &str = "15010,15901,15902,15903,15904";

/// Prefixes of the mesh's own pod annotations: FSM's, then OSM's. Both are honoured.
pub const MESH_ANNOTATION_PREFIXES: [&str; 2] = ["flomesh.io/", "openservicemesh.io/"];

/// Annotation (after a [`MESH_ANNOTATION_PREFIXES`] prefix): inbound ports that skip the proxy.
pub const INBOUND_PORT_EXCLUSION_LIST: &str = "inbound-port-exclusion-list";

/// Annotation (after a [`MESH_ANNOTATION_PREFIXES`] prefix): outbound ports that skip the proxy.
pub const OUTBOUND_PORT_EXCLUSION_LIST: &str = "outbound-port-exclusion-list";

/// Annotation (after a [`MESH_ANNOTATION_PREFIXES`] prefix): outbound destinations (CIDRs) that
/// skip the proxy.
pub const OUTBOUND_IP_RANGE_EXCLUSION_LIST: &str = "outbound-ip-range-exclusion-list";

/// Annotation (after a [`MESH_ANNOTATION_PREFIXES`] prefix): when set, the only outbound
/// destinations (CIDRs) that go through the proxy.
pub const OUTBOUND_IP_RANGE_INCLUSION_LIST: &str = "outbound-ip-range-inclusion-list";

/// Default address of the admission webhook's HTTPS listener; the webhook's Service sends 443 here.
pub const DEFAULT_WEBHOOK_LISTEN: &str = "0.0.0.0:9443";

/// Default address of the webhook's plain-HTTP `/healthz`: port 9090, as FSM's injector.
pub const DEFAULT_WEBHOOK_HEALTHZ: &str = "0.0.0.0:9090";

/// The path the API server POSTs admission reviews to (the MutatingWebhookConfiguration's
/// `clientConfig.service.path`).
pub const WEBHOOK_MUTATE_PATH: &str = "/mutate";

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
