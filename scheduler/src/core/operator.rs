//! Operator state: what operators decided about hosts (drains today; quotas and provisioned
//! hosts later), keyed by host id and independent of whether that host's agent is
//! connected: a drain set before a host's agent ever connected applies when it does. This is
//! the state the service layer persists (`crate::store`) and restores at start; the
//! registry keeps a copy of each registered host's drain flag for the hot path.

use std::collections::BTreeSet;

use super::HostId;

/// Operators' decisions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OperatorState {
    drains: BTreeSet<HostId>,
}

impl OperatorState {
    /// Sets or clears the drain of host `id`.
    pub(super) fn set_draining(&mut self, id: &HostId, draining: bool) {
        if draining {
            self.drains.insert(id.clone());
        } else {
            self.drains.remove(id);
        }
    }

    /// Whether host `id` is drained.
    pub fn is_draining(&self, id: &HostId) -> bool {
        self.drains.contains(id)
    }

    /// Every drained host id.
    pub fn drains(&self) -> impl Iterator<Item = &HostId> {
        self.drains.iter()
    }
}
