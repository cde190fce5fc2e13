//! The contract between the rewriter and the agent: the ports, paths, headers and annotation names
//! that a rewritten probe carries and that the agent answers on. The rewriter writes them and the
//! agent's healthcheck and prober read them, so they are defined once, here.
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

/// Pod annotation the rewriter writes when `--replace-mesh-init` has taken out the mesh's iptables
/// init container: the record of what was removed. A pod that carries it has no interception but
/// the node's datapath, which the agent records so that `probe-bypass uninstall` can name it.
pub const REPLACED_MESH_INIT_ANNOTATION: &str = "probe-bypass.io/replaced-mesh-init";

/// UID the mesh's sidecar proxy runs as (FSM's and OSM's injectors both use it). The datapath
/// leaves this UID's own connections alone, as the mesh's iptables rules do.
pub const PROXY_UID: u32 = 1500;

/// The proxy's inbound port: the mesh redirects connections to a meshed pod here.
pub const PROXY_INBOUND_PORT: u16 = 15003;

/// The proxy's outbound port: the mesh redirects a meshed pod's own connections here.
pub const PROXY_OUTBOUND_PORT: u16 = 15001;

/// The proxy's Prometheus port, which the mesh's iptables rules leave alone on the way in.
pub const PROXY_METRICS_PORT: u16 = 15010;

/// FSM's prefix of its pod annotations (`flomesh.io/outbound-port-exclusion-list`, ...).
pub const FSM_ANNOTATION_PREFIX: &str = "flomesh.io/";
/// OSM's prefix of its pod annotations.
pub const OSM_ANNOTATION_PREFIX: &str = "openservicemesh.io/";

/// Prefixes of the mesh's own pod annotations: FSM's, then OSM's. The agent honours both.
pub const MESH_ANNOTATION_PREFIXES: [&str; 2] = [FSM_ANNOTATION_PREFIX, OSM_ANNOTATION_PREFIX];

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

/// Name of the init container `--replace-mesh-init` puts where the mesh's iptables init container
/// was: `probe-bypass validate`, which holds the pod until the node's datapath intercepts it.
pub const VALIDATION_CONTAINER_NAME: &str = "probe-bypass-validation";

/// The agent's image, which runs the validation container unless told otherwise: the name and tag
/// `cargo xtask image` builds and `deploy/` runs.
pub const DEFAULT_VALIDATION_IMAGE: &str = concat!("probe-bypass:", env!("CARGO_PKG_VERSION"));

/// The agent's binary in its image (`cargo xtask image`), which the validation container runs.
pub const AGENT_BINARY: &str = "/probe-bypass";

/// Where `probe-bypass validate` connects unless told otherwise (`--target-range`): documentation
/// ranges no network routes (RFC 5737 TEST-NET-1, RFC 3849). The rewriter aims it elsewhere only
/// when a pod's exclusions leave these unredirected.
pub const VALIDATION_TARGET_V4: ipnet::Ipv4Net =
    ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::new(192, 0, 2, 0), 24);
pub const VALIDATION_TARGET_V6: ipnet::Ipv6Net =
    ipnet::Ipv6Net::new_assert(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32);
