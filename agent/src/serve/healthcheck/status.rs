//! `GET /probe-bypass-status` on the healthcheck port: which agent serves this pod, and how.
//!
//! `probe-bypass validate`, the pod's validation init container, asks it from inside the pod when
//! its check fails, to say in its message which agent to look at (node, agent pod) and what it does
//! with the pod (datapath mode). A pod only gets a healthcheck listener once the agent serves it,
//! and in `ebpf` mode only after the pod's datapath entries are in, so an answer means the pod is
//! in the datapath exactly when the mode is `ebpf`.

use super::http::Response;
use crate::pod::Pod;

/// The path of the status answer on the healthcheck port.
pub const STATUS_PATH: &str = "/probe-bypass-status";

/// The JSON fields of the answer, for the client to read by the same names.
pub mod field {
    pub const NODE: &str = "node";
    pub const AGENT_POD: &str = "agent_pod";
    pub const DATAPATH: &str = "datapath";
    pub const POD: &str = "pod";
    pub const IN_DATAPATH: &str = "in_datapath";
}

/// What the agent says of itself, fixed at start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    /// The node's name (`--node-name` / NODE_NAME), when the agent was given one.
    pub node: Option<String>,
    /// The agent's own pod (its POD_NAME, from the downward API), when it runs in one.
    pub agent_pod: Option<String>,
    /// The datapath mode: `ebpf` or `none`.
    pub datapath: &'static str,
}

/// The answer for `pod`: 200 with a JSON object.
pub fn answer(status: &AgentStatus, pod: &Pod) -> Response {
    let body = serde_json::json!({
        field::NODE: status.node,
        field::AGENT_POD: status.agent_pod,
        field::DATAPATH: status.datapath,
        field::POD: pod.key.to_string(),
        field::IN_DATAPATH: status.datapath == "ebpf",
    });
    Response::new(200, body.to_string())
}
