//! Requests pinned to one host: a builder-side gate (`nixdispatch-gate`) asks for a slot on
//! its own host for a build that has already arrived there over SSH, with `Acquire`
//! (`AcquireRequest.pin_host`) or `WaitForLease` (`pin_host_id`). Both reach the one pin of
//! placement (`place(now, req, Some(pin))`): that host or nothing. And nothing is counted
//! twice: when a member's build hook already holds a lease for the same derivation on that
//! host (the hook chose the host, and its build-remote is now running the build there
//! through the gate), the gate is given that lease again, marked attached, instead of a
//! second slot (`Scheduler::attach`, over the ledger's `(host, drv_path)` index).
//!
//! This module holds the tests of that behaviour; the logic lives in `placement`.

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

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

    /// Two hosts, long past the start: a small one (`gated`, 1 slot) and an idle big one
    /// (`big`, 8 slots).
    fn two_hosts() -> Scheduler {
        let config = CoreConfig {
            startup_window: Duration::ZERO,
            startup_hold: Duration::ZERO,
            ..CoreConfig::default()
        };
        let mut s = Scheduler::new(config, PolicyKind::LeastLoaded.build(), 1);
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
        // Unpinned, another build goes to the free host.
        assert_eq!(
            grant(s.acquire(t(3), &req("bob", "c", None)))
                .host
                .id
                .as_str(),
            "big"
        );
        // The slot freed, the pinned waiter gets it when it asks again, not a newcomer.
        s.release(t(4), &g.lease_id, BuildOutcome::Succeeded)
            .unwrap();
        assert!(matches!(
            s.acquire(t(5), &req("carol", "d", Some("gated"))),
            Decision::Postpone { .. }
        ));
        let g = grant(s.acquire(t(6), &req("bob", "b", Some("gated"))));
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
        assert_eq!(s.lease_count(), 1);
        // Another derivation is not attached: `gated` is full.
        assert!(matches!(
            s.acquire(t(3), &req("alice", "y", Some("gated"))),
            Decision::Postpone { .. }
        ));
        // The hook releases; the waiting `y` is handed the slot, nothing of `x` is left.
        s.release(t(4), &h.lease_id, BuildOutcome::Succeeded)
            .unwrap();
        let y = grant(s.acquire(t(5), &req("alice", "y", Some("gated"))));
        assert!(!y.attached);
        assert_eq!(s.lease_count(), 1);
        s.release(t(6), &y.lease_id, BuildOutcome::Succeeded)
            .unwrap();
        let g = grant(s.acquire(t(7), &req("alice", "x", Some("gated"))));
        assert!(!g.attached, "a released lease is not attached to");
        // A pinned lease is never attached to: a second gate session waits.
        assert!(matches!(
            s.acquire(t(8), &req("alice", "x", Some("gated"))),
            Decision::Postpone { .. }
        ));
    }

    /// The member's quota is the one cap on every path that takes a slot: a pinned request
    /// of a member at its quota waits like an unpinned one, while a gate attaching to the
    /// member's own lease takes no slot and is granted.
    #[test]
    fn the_member_quota_caps_pinned_grants_but_not_attaching() {
        let mut s = two_hosts();
        let mut q = s.quotas().clone();
        q.default_member_max_slots = Some(1);
        s.set_quotas(t(0), q);
        let mut hook = req("alice", "x", None);
        hook.exclude_hosts.insert(HostId::new("big"));
        let h = grant(s.acquire(t(1), &hook));
        assert_eq!(h.host.id.as_str(), "gated");
        match s.acquire(t(2), &req("alice", "y", Some("big"))) {
            Decision::Postpone { reason, .. } => assert!(reason.contains("quota of 1"), "{reason}"),
            other => panic!("expected the quota to hold, got {other:?}"),
        }
        assert!(matches!(
            s.wait(t(2), &req("alice", "z", Some("big")), None),
            WaitAnswer::Queued { .. }
        ));
        let g = grant(s.acquire(t(3), &req("alice", "x", Some("gated"))));
        assert_eq!((g.attached, g.lease_id), (true, h.lease_id));
    }

    /// `WaitForLease` pinned to the host attaches exactly like `Acquire`: one pin, one path.
    #[test]
    fn a_pinned_wait_attaches_to_the_hooks_lease_too() {
        let mut s = two_hosts();
        let mut hook = req("member-laptop", "x", None);
        hook.exclude_hosts.insert(HostId::new("big"));
        let h = grant(s.acquire(t(1), &hook));
        let gated = HostId::new("gated");
        match s.wait(t(2), &req("alice", "x", None), Some(&gated)) {
            WaitAnswer::Granted(g) => {
                assert!(g.attached);
                assert_eq!(g.lease_id, h.lease_id);
            }
            other => panic!("expected an attached grant, got {other:?}"),
        }
        // The same through the request's own pin.
        match s.wait(t(3), &req("alice", "x", Some("gated")), None) {
            WaitAnswer::Granted(g) => assert!(g.attached),
            other => panic!("expected an attached grant, got {other:?}"),
        }
        assert_eq!(s.lease_count(), 1);
    }

    /// Attaching takes no slot, so a pinned `WaitForLease` attaches even in the startup
    /// window, when other waiters are queued rather than placed.
    #[test]
    fn a_pinned_wait_attaches_in_the_startup_window() {
        let mut s = Scheduler::new(CoreConfig::default(), PolicyKind::LeastLoaded.build(), 1);
        s.connect(t(0), spec("gated", 1));
        let h = grant(s.acquire(t(1), &req("member-laptop", "x", None)));
        match s.wait(t(2), &req("alice", "x", Some("gated")), None) {
            WaitAnswer::Granted(g) => assert_eq!((g.attached, g.lease_id), (true, h.lease_id)),
            other => panic!("expected an attached grant, got {other:?}"),
        }
    }

    /// An expired hook lease leaves the attach index with it: the gate then takes a slot.
    #[test]
    fn an_expired_hook_lease_is_not_attached_to() {
        let mut s = two_hosts();
        let mut hook = req("member-laptop", "x", None);
        hook.exclude_hosts.insert(HostId::new("big"));
        grant(s.acquire(t(1), &hook));
        let late = t(1).after(CoreConfig::default().lease_ttl + Duration::from_secs(1));
        // The agent reconnects (reports) then, so the host is not late itself.
        s.connect(late, spec("gated", 1));
        let g = grant(s.acquire(late, &req("alice", "x", Some("gated"))));
        assert!(!g.attached);
        assert_eq!(s.lease_count(), 1);
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
