//! Requests pinned to one host: a builder-side gate (`nixdispatch-gate`) asks for a slot on
//! its own host for a build that has already arrived there over SSH. There is nothing to
//! place: that host or nothing. And nothing is counted twice: when a member's build hook
//! already holds a lease for the same derivation on that host (the hook chose the host, and
//! its build-remote is now running the build there through the gate), the gate is given that
//! lease again, marked attached, instead of a second slot.

use super::eligibility::{self, Ask, Unfit};
use super::{Decision, Grant, HostId, HostState, LeaseRequest, Scheduler, Time};

impl Scheduler {
    /// Decides a request pinned to `pin`. See `AcquireRequest.pin_host` in `lease.proto`.
    pub(super) fn acquire_pinned(
        &mut self,
        now: Time,
        req: &LeaseRequest,
        pin: &HostId,
    ) -> Decision {
        let Some(host) = self.registry.get(pin) else {
            self.waiters.remove(&req.client, &req.drv_path);
            return Decision::DeclinePermanently {
                reason: format!("{pin} is not a registered builder"),
            };
        };
        if let Some((lease_id, lease)) = self.ledger.attachable(pin, &req.drv_path) {
            let grant = Grant {
                lease_id: lease_id.clone(),
                host: host.spec.clone(),
                ttl: lease.expires_at.since(now),
                slots_used: host.used(),
                slots_total: host.spec.max_jobs,
                attached: true,
            };
            self.waiters.remove(&req.client, &req.drv_path);
            return Decision::Granted(grant);
        }
        let ask = Ask {
            system: &req.system,
            mask: self.registry.system_bits().request_mask(&req.system),
            features: &req.required_features,
            client: Some(&req.client),
            exclude: &req.exclude_hosts,
        };
        let global = self.policy.sees_global_load();
        match eligibility::assess(now, &self.config, global, host, &ask) {
            Ok(_) => self.granted(now, pin, req),
            Err(unfit) => {
                let why = eligibility::describe(
                    now,
                    &self.config,
                    host,
                    unfit,
                    &req.system,
                    &req.required_features,
                );
                // What no wait can change: the gate then lets the build through (or refuses
                // it, if it fails closed) rather than holding it forever.
                let never = matches!(unfit, Unfit::System | Unfit::Features)
                    || host.state(now, &self.config) == HostState::Gone;
                if never {
                    self.waiters.remove(&req.client, &req.drv_path);
                    Decision::DeclinePermanently {
                        reason: format!("{pin}: {why}"),
                    }
                } else {
                    self.postpone(now, req, format!("{pin}: {why}"))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::*;

    fn spec(id: &str, slots: u32) -> HostSpec {
        HostSpec {
            id: HostId::new(id),
            store_uri: format!("ssh-ng://{id}"),
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample".into(),
            systems: [System::new("x86_64-linux")].into_iter().collect(),
            supported_features: BTreeSet::new(),
            mandatory_features: BTreeSet::new(),
            max_jobs: slots,
            speed_factor: 1.0,
            cpu_count: slots,
            total_memory_bytes: 0,
            agent_version: "test".into(),
        }
    }

    fn req(client: &str, drv: &str, pin: Option<&str>) -> LeaseRequest {
        LeaseRequest {
            system: System::new("x86_64-linux"),
            required_features: BTreeSet::new(),
            drv_path: format!("/nix/store/{drv}.drv"),
            client: ClientId::new(client),
            can_build_locally: false,
            exclude_hosts: BTreeSet::new(),
            pin_host: pin.map(HostId::new),
        }
    }

    fn t(ms: u64) -> Time {
        Time::from_millis(ms)
    }

    /// Two hosts: a busy small one (`gated`, 1 slot) and an idle big one (`big`, 8 slots).
    fn two_hosts() -> Scheduler {
        let mut s = Scheduler::new(CoreConfig::default(), PolicyKind::LeastLoaded.build(), 1);
        s.connect(t(0), spec("gated", 1));
        s.connect(t(0), spec("big", 8));
        s
    }

    fn grant(d: Decision) -> Grant {
        match d {
            Decision::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    /// A pinned request gets its host even when another is less loaded, and waits for it
    /// when it is full even though another host is free.
    #[test]
    fn pinned_requests_get_their_host_or_wait_for_it() {
        let mut s = two_hosts();
        let g = grant(s.acquire(t(1), &req("alice", "a", Some("gated"))));
        assert_eq!((g.host.id.as_str(), g.attached), ("gated", false));
        assert!(matches!(
            s.acquire(t(2), &req("bob", "b", Some("gated"))),
            Decision::Postpone { position: 1, .. }
        ));
        // Unpinned, the same request goes to the free host.
        assert_eq!(
            grant(s.acquire(t(3), &req("bob", "b", None)))
                .host
                .id
                .as_str(),
            "big"
        );
        // The slot freed, the pinned waiter gets it.
        s.release(t(4), &g.lease_id, BuildOutcome::Succeeded)
            .unwrap();
        let g = grant(s.acquire(t(5), &req("carol", "c", Some("gated"))));
        assert_eq!(g.host.id.as_str(), "gated");
    }

    /// A gate attaches to the member's hook lease for the same derivation on its host: no
    /// second slot is counted, and the hook's release frees the one slot.
    #[test]
    fn pinned_request_attaches_to_the_hooks_lease() {
        let mut s = two_hosts();
        // The hook got `gated` for drv `x` (the only free slot there).
        let mut hook = req("member-laptop", "x", None);
        hook.exclude_hosts.insert(HostId::new("big"));
        let h = grant(s.acquire(t(1), &hook));
        assert_eq!(h.host.id.as_str(), "gated");
        // Its build arrives at the gate on `gated`.
        let g = grant(s.acquire(t(2), &req("alice", "x", Some("gated"))));
        assert!(g.attached);
        assert_eq!((g.lease_id.clone(), g.slots_used), (h.lease_id.clone(), 1));
        // Another derivation is not attached: `gated` is full.
        assert!(matches!(
            s.acquire(t(3), &req("alice", "y", Some("gated"))),
            Decision::Postpone { .. }
        ));
        // The hook releases; nothing is left, and the slot is free again.
        s.release(t(4), &h.lease_id, BuildOutcome::Succeeded)
            .unwrap();
        assert_eq!(s.lease_count(), 0);
        let g = grant(s.acquire(t(5), &req("alice", "x", Some("gated"))));
        assert!(!g.attached, "a released lease is not attached to");
        // A pinned lease is never attached to: a second gate session waits.
        assert!(matches!(
            s.acquire(t(6), &req("alice", "x", Some("gated"))),
            Decision::Postpone { .. }
        ));
    }

    /// A pinned request for an unknown host, or one that can never build it, is declined
    /// permanently; one for a drained host waits.
    #[test]
    fn pinned_request_to_an_impossible_host_is_declined_permanently() {
        let mut s = two_hosts();
        assert!(matches!(
            s.acquire(t(1), &req("alice", "a", Some("nowhere"))),
            Decision::DeclinePermanently { .. }
        ));
        let mut arm = req("alice", "a", Some("gated"));
        arm.system = System::new("aarch64-linux");
        assert!(matches!(
            s.acquire(t(1), &arm),
            Decision::DeclinePermanently { .. }
        ));
        s.set_draining(&HostId::new("gated"), true);
        assert!(matches!(
            s.acquire(t(2), &req("alice", "a", Some("gated"))),
            Decision::Postpone { .. }
        ));
    }
}
