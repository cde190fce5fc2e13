//! The three probes a container can have, and what each is called where the rewriter and the agent
//! meet it.

use std::fmt;

use crate::contract::{
    LIVENESS_PROBE_PATH, LIVENESS_PROBE_PORT, READINESS_PROBE_PATH, READINESS_PROBE_PORT,
    STARTUP_PROBE_PATH, STARTUP_PROBE_PORT,
};

/// A container's liveness, readiness or startup probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProbeKind {
    Liveness,
    Readiness,
    Startup,
}

impl ProbeKind {
    /// Every kind, in the order the Kubernetes documentation lists them.
    pub const ALL: [Self; 3] = [Self::Liveness, Self::Readiness, Self::Startup];

    /// The container's field that holds the probe.
    pub fn field(self) -> &'static str {
        match self {
            Self::Liveness => "livenessProbe",
            Self::Readiness => "readinessProbe",
            Self::Startup => "startupProbe",
        }
    }

    /// The key of the probe in the original-probes annotation, its name in messages, and the
    /// agent's `probe` label in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Liveness => "liveness",
            Self::Readiness => "readiness",
            Self::Startup => "startup",
        }
    }

    /// The port an httpGet probe of this kind is rewritten to.
    pub fn port(self) -> u16 {
        match self {
            Self::Liveness => LIVENESS_PROBE_PORT,
            Self::Readiness => READINESS_PROBE_PORT,
            Self::Startup => STARTUP_PROBE_PORT,
        }
    }

    /// The path an HTTP probe of this kind is rewritten to in the OSM shape, before the container.
    pub fn path(self) -> &'static str {
        match self {
            Self::Liveness => LIVENESS_PROBE_PATH,
            Self::Readiness => READINESS_PROBE_PATH,
            Self::Startup => STARTUP_PROBE_PATH,
        }
    }
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
