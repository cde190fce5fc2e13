//! The validation init container that takes the mesh's init container's place: `probe-bypass
//! validate` in the agent's image, which exits 0 only once the node's datapath intercepts the
//! pod's connections, and so holds the pod until then.
//!
//! It needs nothing the mesh's container needed: no root, no capability, no writable filesystem.
//! It reads who it is from the downward API: the node (whose agent it names when it fails), the
//! pod, and the pod's IP.

use ipnet::IpNet;
use serde_json::{Value, json};

use crate::contract::{AGENT_BINARY, VALIDATION_CONTAINER_NAME};

/// The user and group it runs as: the distroless `nonroot` IDs, no user of the mesh's (the proxy
/// is 1500) and not root.
pub const VALIDATION_UID: u32 = 65532;

/// The container, running `image`, checking that connections reach `outbound_port` (the proxy's
/// outbound port, where the mesh's rules sent them); aimed at `target_ranges` when the defaults
/// would not be redirected for the pod (see `target`).
pub fn container(image: &str, outbound_port: u16, target_ranges: &[IpNet]) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut args = vec!["--outbound-port".to_owned(), outbound_port.to_string()];
    if !target_ranges.is_empty() {
        let ranges: Vec<String> = target_ranges.iter().map(ToString::to_string).collect();
        args.extend(["--target-range".to_owned(), ranges.join(",")]);
    }
    json!({
        "name": VALIDATION_CONTAINER_NAME,
        "image": image,
        "command": [AGENT_BINARY, "validate"],
        "args": args,
        "env": [
            field("NODE_NAME", "spec.nodeName"),
            field("POD_NAME", "metadata.name"),
            field("POD_NAMESPACE", "metadata.namespace"),
            field("POD_IP", "status.podIP"),
        ],
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"cpu": "100m", "memory": "32Mi"},
        },
        "securityContext": {
            "runAsUser": VALIDATION_UID,
            "runAsGroup": VALIDATION_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    })
}
