//! The host registry: what each builder is (its spec), what it last reported, whether its
//! agent is connected, and the counts the scheduler keeps per host (leases, outside builds,
//! clients' unreachable reports).
//!
//! Liveness lives here too: a host is `Ready` while its agent reports on time, `Stale` when
//! it is late beyond the grace, `Disconnected` for a grace after its stream ends, then `Gone`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::eligibility::SystemBits;
use super::probe::ProbeState;
use super::{
    ClientId, CoreConfig, Error, Generation, HostId, HostReport, HostSpec, HostState, Time,
    UNREACHABLE_QUORUM,
};

/// Whether an agent stream is attached to a host.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Link {
    Connected(Generation),
    Disconnected { since: Time },
    Left { since: Time },
}

/// One known host.
#[derive(Clone, Debug)]
pub(super) struct Host {
    pub(super) spec: HostSpec,
    pub(super) report: HostReport,
    pub(super) last_seen: Time,
    pub(super) link: Link,
    /// A copy of the operator state's drain of this host (the operator state is the source of
    /// truth, see `super::operator`), kept here so the hot path needs no lookup by id.
    pub(super) draining: bool,
    pub(super) leases: u32,
    /// `leases` when the last report arrived, to tell outside builds from ours.
    pub(super) leases_at_report: u32,
    pub(super) leases_by_client: HashMap<ClientId, u32>,
    /// Clients that reported the host unreachable, and until when that holds.
    pub(super) unreachable_until: HashMap<ClientId, Time>,
    /// Whether an admission gate is closed, decided when the report arrives (it depends only
    /// on the report and the configuration), so requests do not recompute it per host.
    pub(super) gate_closed: bool,
    /// The host's systems as bits of [`SystemBits`]: a cheap first test on the hot path.
    pub(super) system_mask: u64,
    /// What the scheduler's own SSH probes found, and the circuit breaker.
    pub(super) probe: ProbeState,
}

impl Host {
    /// Liveness now.
    pub(super) fn state(&self, now: Time, cfg: &CoreConfig) -> HostState {
        match self.link {
            Link::Connected(_) => {
                if now.since(self.last_seen) > cfg.report_interval + cfg.grace {
                    HostState::Stale
                } else {
                    HostState::Ready
                }
            }
            Link::Disconnected { since } => {
                if now.since(since) > cfg.grace {
                    HostState::Gone
                } else {
                    HostState::Disconnected
                }
            }
            Link::Left { .. } => HostState::Gone,
        }
    }

    /// Slots counted as busy.
    ///
    /// `leases + outside`, where `outside` is the builds the agent saw beyond the leases the
    /// scheduler held when that report was made: builds from members who bypass the
    /// scheduler. Our own leases count exactly and at once, so a released slot is free
    /// immediately rather than after the next report, while outside load is as fresh as the
    /// last report.
    pub(super) fn used(&self) -> u32 {
        self.leases + self.outside_builds()
    }

    /// Builds on the host that are not the scheduler's, as of the last report.
    fn outside_builds(&self) -> u32 {
        self.report
            .running_builds
            .map_or(0, |n| n.saturating_sub(self.leases_at_report))
    }

    /// Counts a new lease of `client` on this host; per client too when `per_client` (only
    /// a policy blind to other clients' load reads those counts, so the others skip the
    /// hashing and the memory).
    pub(super) fn count_lease(&mut self, client: &ClientId, per_client: bool) {
        self.leases += 1;
        if per_client {
            *self.leases_by_client.entry(client.clone()).or_default() += 1;
        }
    }

    /// Stops counting an ended lease of `client`.
    pub(super) fn uncount_lease(&mut self, client: &ClientId) {
        self.leases -= 1;
        if !self.leases_by_client.is_empty()
            && let Some(n) = self.leases_by_client.get_mut(client)
        {
            *n -= 1;
            if *n == 0 {
                self.leases_by_client.remove(client);
            }
        }
    }

    /// Records that `client` could not reach this host; it holds until `until`.
    pub(super) fn note_unreachable(&mut self, now: Time, client: ClientId, until: Time) {
        self.unreachable_until.retain(|_, t| *t > now);
        self.unreachable_until.insert(client, until);
    }

    /// How many clients reported the host unreachable recently.
    pub(super) fn unreachable_reports(&self, now: Time) -> usize {
        if self.unreachable_until.is_empty() {
            return 0;
        }
        self.unreachable_until
            .values()
            .filter(|t| **t > now)
            .count()
    }

    /// Whether enough clients reported it unreachable to hold it back for everyone.
    pub(super) fn unreachable_for_all(&self, now: Time) -> bool {
        self.unreachable_reports(now) >= UNREACHABLE_QUORUM
    }

    /// Whether `client` reported it unreachable recently.
    pub(super) fn unreachable_for(&self, now: Time, client: &ClientId) -> bool {
        !self.unreachable_until.is_empty()
            && self.unreachable_until.get(client).is_some_and(|t| *t > now)
    }
}

/// How often the registry looks for hosts to forget: the sweep visits every host, so it
/// runs rarely; a gone host may stay listed this much longer than the retention.
const FORGET_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Every host that has registered and not been forgotten.
#[derive(Debug, Default)]
pub(super) struct Registry {
    hosts: BTreeMap<HostId, Host>,
    system_bits: SystemBits,
    next_generation: u64,
    last_sweep: Option<Time>,
}

impl Registry {
    /// Attaches an agent stream to a host, registering it or updating its spec. A host that
    /// was already known keeps its leases; a previous stream of the same host is superseded.
    /// `draining` is the operator state's drain of the host.
    pub(super) fn connect(&mut self, now: Time, spec: HostSpec, draining: bool) -> Generation {
        self.next_generation += 1;
        let generation = Generation(self.next_generation);
        let id = spec.id.clone();
        let system_mask = self.system_bits.mask(&spec.systems);
        match self.hosts.get_mut(&id) {
            Some(host) => {
                host.system_mask = system_mask;
                if host.spec.public_key != spec.public_key {
                    // Verdicts about another key say nothing about this one.
                    host.probe = ProbeState::default();
                }
                host.spec = spec;
                host.last_seen = now;
                host.link = Link::Connected(generation);
                host.draining = draining;
            }
            None => {
                self.hosts.insert(
                    id,
                    Host {
                        spec,
                        report: HostReport::default(),
                        last_seen: now,
                        link: Link::Connected(generation),
                        draining,
                        leases: 0,
                        leases_at_report: 0,
                        leases_by_client: HashMap::new(),
                        unreachable_until: HashMap::new(),
                        gate_closed: false,
                        system_mask,
                        probe: ProbeState::default(),
                    },
                );
            }
        }
        generation
    }

    /// Host `id`, if its stream `generation` is the connected one.
    pub(super) fn connected_mut(
        &mut self,
        id: &HostId,
        generation: Generation,
    ) -> Result<&mut Host, Error> {
        let host = self.hosts.get_mut(id).ok_or_else(|| Error::UnknownHost {
            host_id: id.to_string(),
        })?;
        if host.link != Link::Connected(generation) {
            return Err(Error::Superseded {
                host_id: id.to_string(),
            });
        }
        Ok(host)
    }

    /// Host `id`.
    pub(super) fn get(&self, id: &HostId) -> Option<&Host> {
        self.hosts.get(id)
    }

    /// Host `id`, to change.
    pub(super) fn get_mut(&mut self, id: &HostId) -> Option<&mut Host> {
        self.hosts.get_mut(id)
    }

    /// Every host, by id.
    pub(super) fn iter(&self) -> impl ExactSizeIterator<Item = &Host> {
        self.hosts.values()
    }

    /// The hosts after `after` (all of them for `None`), by id.
    pub(super) fn after<'a>(&'a self, after: Option<&HostId>) -> impl Iterator<Item = &'a Host> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, |id| Bound::Excluded(id.clone()));
        self.hosts.range((start, Bound::Unbounded)).map(|(_, h)| h)
    }

    /// Forgets hosts whose agent has been gone for longer than `retention` and that hold no
    /// lease; returns their ids. Runs at most once per [`FORGET_SWEEP_EVERY`].
    pub(super) fn forget_gone(&mut self, now: Time, retention: Duration) -> Vec<HostId> {
        if self
            .last_sweep
            .is_some_and(|t| now.since(t) < FORGET_SWEEP_EVERY)
        {
            return Vec::new();
        }
        self.last_sweep = Some(now);
        let mut gone = Vec::new();
        self.hosts.retain(|id, h| {
            let since = match h.link {
                Link::Connected(_) => return true,
                Link::Disconnected { since } | Link::Left { since } => since,
            };
            let keep = h.leases > 0 || now.since(since) <= retention;
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        gone
    }

    /// The systems' bits, for requests.
    pub(super) fn system_bits(&self) -> &SystemBits {
        &self.system_bits
    }
}
