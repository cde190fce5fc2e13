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
