//! What the reconciler tells the rest of the agent: the node's status for readiness, and the pod
//! counts in metrics.

use tokio::time::Instant;

use super::{Reconciler, State};
use crate::admin::{Failing, NodeStatus};

impl Reconciler {
    pub(super) fn publish(&self) {
        let mut status = NodeStatus {
            synced: true,
            ..NodeStatus::default()
        };
        for (key, entry) in &self.entries {
            match &entry.state {
                State::Listening { .. } => status.served += 1,
                State::Failing { error, since, .. } => {
                    let failing = Failing {
                        reason: error.clone(),
                        since: *since,
                    };
                    status.failing.insert(key.clone(), failing);
                }
            }
        }
        for (key, pending) in &self.pending {
            let since = self
                .pending_since
                .get(key)
                .copied()
                .unwrap_or_else(Instant::now);
            let failing = Failing {
                reason: pending.reason.clone(),
                since,
            };
            status.failing.insert(key.clone(), failing);
        }
        self.ctx.metrics.set_pods(self.entries.len(), status.served);
        self.status.send_replace(status);
    }
}
