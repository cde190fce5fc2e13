//! The one place that knows the mesh's ports, paths, headers and annotation names.
//!
//! Values match FSM and OSM (`shared/reference/peers.md` §1, §3) so that pods rewritten by either
//! mesh's injector keep working unchanged.

/// Port of the HTTP-to-TCP healthcheck that tcpSocket probes are rewritten to.
pub const HEALTHCHECK_PORT: u16 = 15904;

/// Paths the healthcheck answers on: FSM's and OSM's spelling.
pub const HEALTHCHECK_PATHS: [&str; 2] = ["/fsm-healthcheck", "/osm-healthcheck"];

/// Header that carries the port of the original tcpSocket probe.
pub const ORIGINAL_TCP_PORT_HEADER: &str = "Original-Tcp-Port";

/// Annotation that names a pod's network namespace in a pod manifest: a name under
/// [`NETNS_RUN_DIR`] or an absolute path (for example `/proc/<pid>/ns/net`).
pub const NETNS_ANNOTATION: &str = "probe-bypass/netns";

/// Where `ip netns add` keeps named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Default address of the admin endpoints (health and metrics), in the host network namespace.
/// 9091 is the port FSM's controller uses for the same endpoints.
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:9091";
