//! Placement, in named stages: **find candidates** (every host that is eligible for the
//! request now, see `super::eligibility`), **admit** (the request's own limits; this is
//! where per-member quotas and reservations plug in), **choose** (the placement
//! [`Policy`](super::Policy) picks one). When no host is left, the request is postponed,
//! declined or declined permanently.

use std::fmt::Write as _;

use super::eligibility::{self, Ask, Unfit};
use super::index::FreeKey;
use super::policy::Candidate;
use super::registry::{Host, Registry};
use super::{
    CoreConfig, Decision, Feature, Grant, HostId, HostState, LeaseRequest, Scheduler, Time,
};

/// The hosts that could take a request now.
struct Found<'r> {
    ids: Vec<&'r HostId>,
    candidates: Vec<Candidate>,
    /// One example of why a host that builds the system said no, rendered only if nothing
    /// fits: under saturation most requests end here, so no string is built per host.
    example: Option<(&'r Host, Unfit)>,
}

/// Stage one: every host eligible for `req` now.
fn find_candidates<'r>(
    now: Time,
    cfg: &CoreConfig,
    global: bool,
    registry: &'r Registry,
    req: &LeaseRequest,
) -> Found<'r> {
    let ask = Ask {
        system: &req.system,
        mask: registry.system_bits().request_mask(&req.system),
        features: &req.required_features,
        client: Some(&req.client),
        exclude: &req.exclude_hosts,
    };
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

/// Stage two: the request's own limits on the candidates. Nothing limits a request yet;
/// per-member quotas and reservations go here.
fn admit<'r>(_req: &LeaseRequest, found: Found<'r>) -> Found<'r> {
    found
}

impl Scheduler {
    /// Decides a request. See [`Decision`].
    pub fn acquire(&mut self, now: Time, req: &LeaseRequest) -> Decision {
        self.expire(now);
        if let Some(pin) = &req.pin_host {
            return self.acquire_pinned(now, req, pin);
        }
        if self.policy.least_loaded() {
            return match self.choose_indexed(now, req) {
                Some(id) => self.granted(now, &id, req),
                None => {
                    let reason = self.example_unfit(now, req);
                    self.no_host(now, req, reason)
                }
            };
        }
        let global = self.policy.sees_global_load();
        let found = admit(
            req,
            find_candidates(now, &self.config, global, &self.registry, req),
        );
        if found.candidates.is_empty() {
            let reason = found.example.map(|(host, unfit)| {
                format!(
                    "{}: {}",
                    host.spec.id,
                    eligibility::describe(
                        now,
                        &self.config,
                        host,
                        unfit,
                        &req.system,
                        &req.required_features
                    )
                )
            });
            return self.no_host(now, req, reason);
        }
        // Stage three: the policy chooses.
        let i = self.policy.choose(&found.candidates, &mut self.rng);
        let id = found.ids[i].clone();
        self.granted(now, &id, req)
    }

    /// Stages one to three for the least-loaded policy, from the index: the best free host
    /// of each class that serves the request, checked by `eligibility::assess` for what the
    /// index cannot know (lateness, exclusions, the client's own unreachable reports), and
    /// the best of those. Hosts found late leave the free set until they report again.
    pub(super) fn choose_indexed(&mut self, now: Time, req: &LeaseRequest) -> Option<HostId> {
        let classes = self.index.classes_for(&req.system, &req.required_features);
        let ask = Ask {
            system: &req.system,
            mask: self.registry.system_bits().request_mask(&req.system),
            features: &req.required_features,
            client: Some(&req.client),
            exclude: &req.exclude_hosts,
        };
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
    fn example_unfit(&self, now: Time, req: &LeaseRequest) -> Option<String> {
        let ask = Ask {
            system: &req.system,
            mask: self.registry.system_bits().request_mask(&req.system),
            features: &req.required_features,
            client: Some(&req.client),
            exclude: &req.exclude_hosts,
        };
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
        example.map(|(host, unfit)| {
            format!(
                "{}: {}",
                host.spec.id,
                eligibility::describe(
                    now,
                    &self.config,
                    host,
                    unfit,
                    &req.system,
                    &req.required_features
                )
            )
        })
    }

    /// Records the grant of `id` to `req`.
    pub(super) fn granted(&mut self, now: Time, id: &HostId, req: &LeaseRequest) -> Decision {
        self.waiters.remove(&req.client, &req.drv_path);
        Decision::Granted(self.grant(now, id, req))
    }

    /// The answer when no host can take `req` now.
    fn no_host(&mut self, now: Time, req: &LeaseRequest, example: Option<String>) -> Decision {
        if !self.could_ever_build(now, &req.system, &req.required_features) {
            self.waiters.remove(&req.client, &req.drv_path);
            let mut reason = format!("no live builder builds {}", req.system);
            if !req.required_features.is_empty() {
                let fs: Vec<&str> = req.required_features.iter().map(Feature::as_str).collect();
                let _ = write!(reason, " with features {}", fs.join(","));
            }
            return Decision::DeclinePermanently { reason };
        }
        let reason = match example {
            Some(why) => format!("no builder free for {} (e.g. {why})", req.system),
            None => format!("no builder free for {}", req.system),
        };
        if req.can_build_locally {
            self.waiters.remove(&req.client, &req.drv_path);
            return Decision::Decline { reason };
        }
        self.postpone(now, req, reason)
    }

    /// Puts `req` in the wait queue (or keeps it there) and says so.
    pub(super) fn postpone(&mut self, now: Time, req: &LeaseRequest, reason: String) -> Decision {
        self.waiters.expire(now, self.config.waiter_ttl);
        let position = self
            .waiters
            .touch(now, &req.client, &req.drv_path, &req.system);
        Decision::Postpone {
            retry_after: self.config.postpone_retry,
            position,
            reason,
        }
    }

    /// Whether some host that is not gone (drained ones included) could ever build this.
    /// Looks only at the classes that serve the request, usually at one host of each.
    pub(super) fn could_ever_build(
        &self,
        now: Time,
        system: &super::System,
        features: &std::collections::BTreeSet<Feature>,
    ) -> bool {
        self.index.classes_serving(system, features).any(|c| {
            self.index.members(c).any(|id| {
                self.registry
                    .get(id)
                    .is_some_and(|h| h.state(now, &self.config) != HostState::Gone)
            })
        })
    }

    /// Leases host `host_id` to `req`.
    fn grant(&mut self, now: Time, host_id: &HostId, req: &LeaseRequest) -> Grant {
        let ttl = self.config.lease_ttl;
        let lease_id = self.ledger.grant(
            now,
            ttl,
            host_id.clone(),
            req.client.clone(),
            req.system.clone(),
            req.drv_path.clone(),
            req.pin_host.is_none(),
        );
        let host = self
            .registry
            .get_mut(host_id)
            .expect("candidate hosts exist");
        host.count_lease(&req.client);
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
