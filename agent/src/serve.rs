//! What the agent serves inside each meshed pod's network namespace: the healthcheck on 15904
//! ([`healthcheck`]), the pod's original probes run from inside the pod ([`prober`]), and the
//! series both count ([`metrics`]).

pub mod healthcheck;
pub mod metrics;
pub mod prober;
