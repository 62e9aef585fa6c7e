//! Placement, in named stages: **find candidates** (every host that is eligible for the
//! request now, see `super::eligibility`), **admit** (the request's own limits: its
//! member's and its system's quotas, and the one host it may be pinned to), **choose**
//! (the last slot rule of `super::dispatch` first, then the placement
//! [`Policy`](super::Policy) picks one). When no host is left, the request is postponed
//! (and waits in the queue), declined or declined permanently.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::Duration;

use super::accounts::Accounts;
use super::dispatch::{self, class_of};
use super::eligibility::{self, Ask, Unfit};
use super::index::FreeKey;
use super::policy::Candidate;
use super::registry::{Host, Registry};
use super::waiters::Via;
use super::{
    ClientId, CoreConfig, Decision, Error, Feature, Grant, HostId, HostState, LeaseRequest,
    Scheduler, System, Time,
};

/// The hosts that could take a request now.
struct Found<'r> {
    ids: Vec<&'r HostId>,
    candidates: Vec<Candidate>,
    /// One example of why a host that builds the system said no, rendered only if nothing
    /// fits: under saturation most requests end here, so no string is built per host.
    example: Option<(&'r Host, Unfit)>,
}

/// What `req` asks of a host, as `eligibility::assess` takes it.
fn ask<'a>(registry: &Registry, req: &'a LeaseRequest) -> Ask<'a> {
    Ask {
        system: &req.system,
        mask: registry.system_bits().request_mask(&req.system),
        features: &req.required_features,
        client: Some(&req.client),
        exclude: &req.exclude_hosts,
    }
}

/// Why `host` cannot take `req`, for the user: `"<host>: <reason>"`.
fn unfit_reason(
    now: Time,
    cfg: &CoreConfig,
    host: &Host,
    unfit: Unfit,
    req: &LeaseRequest,
) -> String {
    format!(
        "{}: {}",
        host.spec.id,
        eligibility::describe(now, cfg, host, unfit, &req.system, &req.required_features)
    )
}

/// Stage one: every host eligible for `req` now.
fn find_candidates<'r>(
    now: Time,
    cfg: &CoreConfig,
    global: bool,
    registry: &'r Registry,
    req: &LeaseRequest,
) -> Found<'r> {
    let ask = ask(registry, req);
    let mut found = Found {
        ids: Vec::new(),
        candidates: Vec::new(),
        example: None,
    };
    for host in registry.iter() {
        match eligibility::assess(now, cfg, global, host, &ask) {
            Ok(c) => {
                found.ids.push(&host.spec.id);
                found.candidates.push(c);
            }
            Err(Unfit::System) => {}
            Err(unfit) => found.example = Some((host, unfit)),
        }
    }
    found
}

/// Stage two, the request's own limits: its member and its system must be under their
/// quotas (else the refusal, for the user). A pinned request then keeps only its host.
fn admit(accounts: &Accounts, req: &LeaseRequest) -> Result<(), String> {
    accounts
        .admits(&req.client, &req.system)
        .map_err(|r| r.describe(&req.client, &req.system))
}

/// Keeps the candidates for which `f` holds.
fn keep(found: &mut Found<'_>, mut f: impl FnMut(&HostId, &Candidate) -> bool) {
    let mut i = 0;
    while i < found.ids.len() {
        if f(found.ids[i], &found.candidates[i]) {
            i += 1;
        } else {
            found.ids.swap_remove(i);
            found.candidates.swap_remove(i);
        }
    }
}

impl Scheduler {
    /// Decides a request. See [`Decision`]. A postponed request waits in the same queue as
    /// the streams of `WaitForLease`; when its turn comes its grant is held until it asks
    /// again (within the claim TTL).
    pub fn acquire(&mut self, now: Time, req: &LeaseRequest) -> Decision {
        // Without a cap nothing is refused; the fallback only keeps the types honest.
        self.acquire_in(now, req, None)
            .unwrap_or_else(|e| Decision::Decline {
                reason: e.to_string(),
            })
    }

    /// [`acquire`](Self::acquire) under the member's cap on waiting requests
    /// (`CoreConfig::max_waiting_per_member`): a request that would be postponed (and wait
    /// in the queue) while its member already has that many waiting is refused with
    /// [`Error::TooManyWaiting`] and not queued. A poller asking again for a request that
    /// already waits is never refused.
    pub fn acquire_capped(&mut self, now: Time, req: &LeaseRequest) -> Result<Decision, Error> {
        let cap = self.config.max_waiting_per_member;
        self.acquire_in(now, req, Some(cap))
    }

    fn acquire_in(
        &mut self,
        now: Time,
        req: &LeaseRequest,
        cap: Option<usize>,
    ) -> Result<Decision, Error> {
        self.expire(now);
        self.accounts.arrive(&req.client);
        if let Some(g) = self.claim_held(now, req) {
            return Ok(Decision::Granted(g));
        }
        let pin = req.pin_host.as_ref();
        match self.place(now, req, pin) {
            Ok(g) => {
                self.waiters.remove_request(&req.client, &req.drv_path);
                Ok(Decision::Granted(g))
            }
            Err(reason) => self.no_host(now, req, pin, reason, cap),
        }
    }

    /// Runs the stages for `req` and grants the chosen host, or says why none (`None`: no
    /// particular reason to give). With `pin`, that host only, and first the live lease
    /// `req` may attach to there (see [`Self::attach`]).
    pub(super) fn place(
        &mut self,
        now: Time,
        req: &LeaseRequest,
        pin: Option<&HostId>,
    ) -> Result<Grant, Option<String>> {
        if let Some(g) = pin.and_then(|p| self.attach(now, p, req)) {
            return Ok(g);
        }
        if let Err(refusal) = admit(&self.accounts, req) {
            self.refusal_cause = "quota";
            return Err(Some(refusal));
        }
        let global = self.policy.sees_global_load();
        if let Some(pin) = pin {
            // One host to look at: no index, no scan.
            let Some(host) = self.registry.get(pin) else {
                return Err(Some(format!("{pin}: not registered")));
            };
            let ask = ask(&self.registry, req);
            return match eligibility::assess(now, &self.config, global, host, &ask) {
                Ok(_) => Ok(self.grant(now, pin, req, true)),
                Err(unfit) => {
                    self.refusal_cause = unfit.as_str();
                    Err(Some(unfit_reason(now, &self.config, host, unfit, req)))
                }
            };
        }
        // The index serves the common case. Only when the host it offers is one whose last
        // slot the last slot rule keeps for a narrower waiting class does the scan below
        // look for another.
        if self.policy.least_loaded() {
            match self.choose_indexed(now, req) {
                Some(id) if !self.last_slot_kept(&id, req) => {
                    return Ok(self.grant(now, &id, req, false));
                }
                Some(_) => {}
                None => {
                    let example = self.example_unfit(now, req);
                    self.refusal_cause = example.as_ref().map_or("none", |(u, _)| u.as_str());
                    return Err(example.map(|(_, why)| why));
                }
            }
        }
        let mut found = find_candidates(now, &self.config, global, &self.registry, req);
        // Stage three: the last slot rule, then the policy chooses.
        if global && self.waiters.len() > 0 {
            let class = class_of(req, pin);
            let waiting = self.waiting_classes();
            let (registry, waiters) = (&self.registry, &mut self.waiters);
            keep(&mut found, |id, c| {
                c.slots - c.used > 1
                    || !registry.get(id).is_some_and(|h| {
                        waiting.iter().any(|k| {
                            *k != class
                                && dispatch::fits(h, k)
                                && dispatch::narrower(registry, waiters, k, &class)
                        })
                    })
            });
        }
        if found.candidates.is_empty() {
            self.refusal_cause = found.example.map_or("none", |(_, u)| u.as_str());
            return Err(found
                .example
                .map(|(host, unfit)| unfit_reason(now, &self.config, host, unfit, req)));
        }
        let i = self.policy.choose(&found.candidates, &mut self.rng);
        let id = found.ids[i].clone();
        Ok(self.grant(now, &id, req, false))
    }

    /// Whether the last slot rule keeps host `id`'s last free slot from `req`: a class
    /// narrower than the request's, with a member under quota, waits and fits the host.
    fn last_slot_kept(&mut self, id: &HostId, req: &LeaseRequest) -> bool {
        if self.waiters.len() == 0 || !self.policy.sees_global_load() {
            return false;
        }
        let Some(host) = self.registry.get(id) else {
            return false;
        };
        if host.spec.max_jobs.saturating_sub(host.used()) > 1 {
            return false;
        }
        let class = class_of(req, None);
        let waiting = self.waiting_classes();
        let (registry, waiters) = (&self.registry, &mut self.waiters);
        waiting.iter().any(|k| {
            *k != class
                && dispatch::fits(host, k)
                && dispatch::narrower(registry, waiters, k, &class)
        })
    }

    /// The classes with a waiter whose member is under quota: the ones the last slot rule
    /// protects.
    fn waiting_classes(&self) -> Vec<super::waiters::Class> {
        self.waiters
            .classes()
            .filter(|(_, q)| {
                q.members
                    .keys()
                    .any(|m| self.accounts.admits(m, &q.class.system).is_ok())
            })
            .map(|(_, q)| q.class.clone())
            .collect()
    }

    /// Stages one to three for the least-loaded policy, from the index: the best free host
    /// of each class that serves the request, checked by `eligibility::assess` for what the
    /// index cannot know (lateness, exclusions, the client's own unreachable reports), and
    /// the best of those. Hosts found late leave the free set until they report again.
    pub(super) fn choose_indexed(&mut self, now: Time, req: &LeaseRequest) -> Option<HostId> {
        let classes = self.index.classes_for(&req.system, &req.required_features);
        let ask = ask(&self.registry, req);
        let mut best: Option<&FreeKey> = None;
        let mut late = Vec::new();
        for &c in classes.iter() {
            for key in self.index.free(c) {
                if best.is_some_and(|b| key >= b) {
                    break;
                }
                let Some(host) = self.registry.get(&key.2) else {
                    continue;
                };
                match eligibility::assess(now, &self.config, true, host, &ask) {
                    Ok(_) => {
                        best = Some(key);
                        break;
                    }
                    Err(Unfit::Late) => late.push(key.2.clone()),
                    Err(_) => {}
                }
            }
        }
        let chosen = best.map(|k| k.2.clone());
        for id in late {
            self.index.close(&id);
        }
        chosen
    }

    /// The lowest least-loaded score among the hosts a full scan finds eligible for `req`:
    /// what [`Self::choose_indexed`] must agree with.
    #[cfg(test)]
    pub(super) fn scan_best_score(&self, now: Time, req: &LeaseRequest) -> Option<f64> {
        find_candidates(now, &self.config, true, &self.registry, req)
            .candidates
            .iter()
            .map(Candidate::score)
            .min_by(f64::total_cmp)
    }

    /// The least-loaded score of host `id` now.
    #[cfg(test)]
    pub(super) fn score_of(&self, id: &HostId) -> Option<f64> {
        let h = self.registry.get(id)?;
        Some((f64::from(h.used()) + 1.0) / (f64::from(h.spec.max_jobs) * h.spec.speed_factor))
    }

    /// Why a host that serves `req` cannot take it now, as `"<host>: <reason>"`, for the
    /// user's message when nothing is free; looks at the serving classes' hosts only.
    fn example_unfit(&self, now: Time, req: &LeaseRequest) -> Option<(Unfit, String)> {
        let ask = ask(&self.registry, req);
        let global = self.policy.sees_global_load();
        let mut example = None;
        for c in self
            .index
            .classes_serving(&req.system, &req.required_features)
        {
            for id in self.index.members(c) {
                let Some(host) = self.registry.get(id) else {
                    continue;
                };
                if let Err(unfit) = eligibility::assess(now, &self.config, global, host, &ask) {
                    example = Some((host, unfit));
                    // A live host's reason says more than a gone one's.
                    if host.state(now, &self.config) != HostState::Gone {
                        break;
                    }
                }
            }
        }
        example.map(|(host, unfit)| (unfit, unfit_reason(now, &self.config, host, unfit, req)))
    }

    /// The answer when no host (or not the one it is pinned to) can take `req` now.
    fn no_host(
        &mut self,
        now: Time,
        req: &LeaseRequest,
        pin: Option<&HostId>,
        example: Option<String>,
        cap: Option<usize>,
    ) -> Result<Decision, Error> {
        if let Some(p) = pin {
            if !self.could_ever_serve(now, req, pin) {
                self.refusal_cause = "no_builder";
                self.waiters.remove_request(&req.client, &req.drv_path);
                return Ok(Decision::DeclinePermanently {
                    reason: self.never_reason(req, Some(p)),
                });
            }
        } else if !self.could_ever_build(now, &req.system, &req.required_features) {
            self.refusal_cause = "no_builder";
            self.waiters.remove_request(&req.client, &req.drv_path);
            let mut reason = format!("no live builder builds {}", req.system);
            if !req.required_features.is_empty() {
                let fs: Vec<&str> = req.required_features.iter().map(Feature::as_str).collect();
                let _ = write!(reason, " with features {}", fs.join(","));
            }
            return Ok(Decision::DeclinePermanently { reason });
        }
        let reason = match example {
            Some(why) => format!("no builder free for {} (e.g. {why})", req.system),
            None => format!("no builder free for {}", req.system),
        };
        if req.can_build_locally {
            self.waiters.remove_request(&req.client, &req.drv_path);
            return Ok(Decision::Decline { reason });
        }
        if let Err(e) = self.check_waiting_cap(req, cap) {
            self.refusal_cause = "waiting_cap";
            return Err(e);
        }
        let waiter = self.enqueue(now, req, pin, Via::Poll);
        let position = self.position(waiter);
        Ok(Decision::Postpone {
            retry_after: self.config.postpone_retry,
            position,
            reason,
        })
    }

    /// Whether some host that is not gone (drained ones included) could ever build this.
    /// Looks only at the classes that serve the request, usually at one host of each.
    pub(super) fn could_ever_build(
        &self,
        now: Time,
        system: &super::System,
        features: &BTreeSet<Feature>,
    ) -> bool {
        self.index.classes_serving(system, features).any(|c| {
            self.index.members(c).any(|id| {
                self.registry
                    .get(id)
                    .is_some_and(|h| h.state(now, &self.config) != HostState::Gone)
            })
        })
    }

    /// Leases host `host_id` to `req` (`pinned`: only that host was asked for).
    fn grant(&mut self, now: Time, host_id: &HostId, req: &LeaseRequest, pinned: bool) -> Grant {
        let ttl = self.config.lease_ttl;
        self.grant_lease(
            now,
            host_id,
            &req.client,
            &req.system,
            &req.drv_path,
            ttl,
            Duration::ZERO,
            pinned,
        )
    }

    /// The live lease a request pinned to `pin` attaches to instead of taking a slot: the
    /// one a member's build hook holds there for the same derivation (its build-remote is
    /// now running that build on `pin` through the gate). Granted again, marked attached;
    /// nothing is counted, and the hook keeps and releases it.
    pub(super) fn attach(&self, now: Time, pin: &HostId, req: &LeaseRequest) -> Option<Grant> {
        let host = self.registry.get(pin)?;
        let (lease_id, lease) = self.ledger.attachable(pin, &req.drv_path)?;
        Some(Grant {
            lease_id: lease_id.clone(),
            host: host.spec.clone(),
            ttl: lease.expires_at.since(now),
            slots_used: host.used(),
            slots_total: host.spec.max_jobs,
            attached: true,
        })
    }

    /// Leases host `host_id` to `client` for a build of `system`, expiring `ttl` from now
    /// unless kept alive; the request waited `waited` for it. A lease that was not
    /// `pinned` is one a later pinned request for the same derivation attaches to.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grant_lease(
        &mut self,
        now: Time,
        host_id: &HostId,
        client: &ClientId,
        system: &System,
        drv_path: &str,
        ttl: Duration,
        waited: Duration,
        pinned: bool,
    ) -> Grant {
        let lease_id = self.ledger.grant(
            now,
            ttl,
            host_id.clone(),
            client.clone(),
            system.clone(),
            drv_path.to_owned(),
            !pinned,
        );
        self.accounts.count_grant(now, client, system, waited);
        let per_client = !self.policy.sees_global_load();
        let host = self
            .registry
            .get_mut(host_id)
            .expect("candidate hosts exist");
        host.count_lease(client, per_client);
        let grant = Grant {
            lease_id,
            host: host.spec.clone(),
            ttl,
            slots_used: host.used(),
            slots_total: host.spec.max_jobs,
            attached: false,
        };
        self.reindex(host_id);
        grant
    }
}
