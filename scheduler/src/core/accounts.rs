//! Accounts: who runs how much, what each member and system may run (quotas), each member's
//! share of the queue (its fair key) and its usage record.
//!
//! Fair order (Buildbarn's): when a slot frees, the member with the smallest
//! `(running + 1) × 2^(0.01 × priority)` is served first, ties to the one served least
//! recently, then to the one that arrived first. `running` counts the member's live leases on
//! every host, so a member already holding many slots anywhere yields to one holding few.
//! A priority of `-100` doubles a member's share, `+100` halves it. Which of the member's
//! waiters goes is `super::waiters`' order (shortest expected first, with aging).

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use super::{ClientId, System, Time};

/// What one member may run and how its turns are weighted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberQuota {
    /// At most this many live leases at once; `None` is the default of [`Quotas`].
    pub max_slots: Option<u32>,
    /// Weight of the member's turns: `2^(0.01 × priority)` multiplies its fair key, so a
    /// lower priority is served sooner. Default 0.
    pub priority: i32,
}

/// Quotas: at most so many concurrent slots per member and per system. Set by the
/// configuration, changed by operators at run time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quotas {
    /// The limit of a member without its own `max_slots`; `None`: unlimited.
    pub default_member_max_slots: Option<u32>,
    /// Members with their own limit or priority.
    pub members: BTreeMap<ClientId, MemberQuota>,
    /// At most this many live leases for builds of each system (summed over members).
    pub systems: BTreeMap<System, u32>,
}

impl Quotas {
    /// The limit of `member`, if any.
    pub fn member_max(&self, member: &ClientId) -> Option<u32> {
        self.members
            .get(member)
            .and_then(|q| q.max_slots)
            .or(self.default_member_max_slots)
    }

    /// The priority of `member`.
    pub fn priority(&self, member: &ClientId) -> i32 {
        self.members.get(member).map_or(0, |q| q.priority)
    }
}

/// A member's usage record, summed since it was first seen (or restored).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Leases that ended after a build ran (released as succeeded or failed).
    pub builds: u64,
    /// Milliseconds those leases held their slots.
    pub build_millis: u64,
    /// Milliseconds the member's requests waited in the queue before their grants.
    pub wait_millis: u64,
}

/// Why a request is not admitted now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The member holds its quota.
    Member { max: u32 },
    /// The system's builds hold its quota.
    System { max: u32 },
}

impl Refusal {
    /// In words, for the user.
    pub(super) fn describe(&self, member: &ClientId, system: &System) -> String {
        match self {
            Refusal::Member { max } => {
                format!("member {member} holds its quota of {max} live leases (its limit)")
            }
            Refusal::System { max } => format!("{system} builds hold their quota of {max} slots"),
        }
    }
}

/// A member's place in fair order; smaller is served first.
#[derive(Copy, Clone, Debug, PartialEq)]
pub(super) struct FairKey {
    weight: f64,
    last_served: Time,
    arrival: u64,
}

impl FairKey {
    /// Total order: weight, then least recently served, then first arrived.
    pub(super) fn cmp(&self, other: &FairKey) -> Ordering {
        self.weight
            .total_cmp(&other.weight)
            .then(self.last_served.cmp(&other.last_served))
            .then(self.arrival.cmp(&other.arrival))
    }
}

#[derive(Clone, Debug, Default)]
struct Member {
    running: u32,
    last_served: Time,
    arrival: u64,
    usage: Usage,
}

/// Running counts, quotas and usage.
#[derive(Debug, Default)]
pub(super) struct Accounts {
    quotas: Quotas,
    members: HashMap<ClientId, Member>,
    systems: HashMap<System, u32>,
    arrivals: u64,
    /// Members whose usage changed since the last [`Accounts::take_changed_usage`].
    changed: HashSet<ClientId>,
}

/// One member as operators see it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    /// The member.
    pub member: ClientId,
    /// Live leases now.
    pub running: u32,
    /// Its limit, if any.
    pub max_slots: Option<u32>,
    /// Its priority.
    pub priority: i32,
    /// Its usage record.
    pub usage: Usage,
}

impl Accounts {
    /// Accounts under `quotas`.
    pub(super) fn new(quotas: Quotas) -> Self {
        Self {
            quotas,
            ..Self::default()
        }
    }

    fn member(&mut self, m: &ClientId) -> &mut Member {
        if !self.members.contains_key(m) {
            self.arrivals += 1;
            let arrival = self.arrivals;
            self.members.insert(
                m.clone(),
                Member {
                    arrival,
                    ..Member::default()
                },
            );
        }
        self.members.get_mut(m).expect("inserted above")
    }

    /// Makes `m` known, so that its arrival order is fixed from its first request.
    pub(super) fn arrive(&mut self, m: &ClientId) {
        self.member(m);
    }

    /// Whether `m` may take one more slot for `system` now.
    pub(super) fn admits(&self, m: &ClientId, system: &System) -> Result<(), Refusal> {
        if let Some(max) = self.quotas.member_max(m) {
            let running = self.members.get(m).map_or(0, |x| x.running);
            if running >= max {
                return Err(Refusal::Member { max });
            }
        }
        if let Some(&max) = self.quotas.systems.get(system)
            && self.systems.get(system).copied().unwrap_or(0) >= max
        {
            return Err(Refusal::System { max });
        }
        Ok(())
    }

    /// The fair key of `m` now.
    pub(super) fn fair_key(&self, m: &ClientId) -> FairKey {
        let (running, last_served, arrival) =
            self.members.get(m).map_or((0, Time::ZERO, u64::MAX), |x| {
                (x.running, x.last_served, x.arrival)
            });
        let priority = f64::from(self.quotas.priority(m));
        FairKey {
            weight: (f64::from(running) + 1.0) * (0.01 * priority).exp2(),
            last_served,
            arrival,
        }
    }

    /// A lease was granted to `m` for `system` after waiting `waited`.
    pub(super) fn count_grant(
        &mut self,
        now: Time,
        m: &ClientId,
        system: &System,
        waited: Duration,
    ) {
        *self.systems.entry(system.clone()).or_default() += 1;
        let member = self.member(m);
        member.running += 1;
        member.last_served = now;
        member.usage.wait_millis = member.usage.wait_millis.saturating_add(millis(waited));
        if !waited.is_zero() {
            self.changed.insert(m.clone());
        }
    }

    /// A lease of `m` for `system` ended after holding its slot for `held`; `built` when a
    /// build ran (released as succeeded or failed).
    pub(super) fn count_end(&mut self, m: &ClientId, system: &System, held: Duration, built: bool) {
        if let Some(n) = self.systems.get_mut(system) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.systems.remove(system);
            }
        }
        let member = self.member(m);
        member.running = member.running.saturating_sub(1);
        if built {
            member.usage.builds += 1;
            member.usage.build_millis = member.usage.build_millis.saturating_add(millis(held));
            self.changed.insert(m.clone());
        }
    }

    /// The usage records changed since the last call, sorted by member.
    pub(super) fn take_changed_usage(&mut self) -> Vec<(ClientId, Usage)> {
        let mut v: Vec<_> = self
            .changed
            .drain()
            .filter_map(|m| self.members.get(&m).map(|x| (m, x.usage)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The quotas in force.
    pub(super) fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// Replaces the quotas (an operator's change); running leases are not touched.
    pub(super) fn set_quotas(&mut self, quotas: Quotas) {
        self.quotas = quotas;
    }

    /// Every member seen, by id.
    pub(super) fn views(&self) -> Vec<MemberView> {
        let mut v: Vec<MemberView> = self
            .members
            .iter()
            .map(|(m, x)| MemberView {
                member: m.clone(),
                running: x.running,
                max_slots: self.quotas.member_max(m),
                priority: self.quotas.priority(m),
                usage: x.usage,
            })
            .collect();
        v.sort_by(|a, b| a.member.cmp(&b.member));
        v
    }

    /// Every usage record, for persistence.
    pub(super) fn usage(&self) -> Vec<(ClientId, Usage)> {
        let mut v: Vec<_> = self
            .members
            .iter()
            .filter(|(_, x)| x.usage != Usage::default())
            .map(|(m, x)| (m.clone(), x.usage))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Restores usage records (after a restart), adding to what this run counted.
    pub(super) fn restore_usage(&mut self, records: impl IntoIterator<Item = (ClientId, Usage)>) {
        for (m, u) in records {
            let x = &mut self.member(&m).usage;
            x.builds += u.builds;
            x.build_millis = x.build_millis.saturating_add(u.build_millis);
            x.wait_millis = x.wait_millis.saturating_add(u.wait_millis);
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClientId {
        ClientId::new(s)
    }

    /// The member with fewer running builds comes first; a negative priority weighs like
    /// half the running builds; ties go to the one served least recently.
    #[test]
    fn fair_keys_follow_running_priority_and_recency() {
        let x86 = System::new("x86_64-linux");
        let mut q = Quotas::default();
        q.members.insert(
            c("vip"),
            MemberQuota {
                max_slots: None,
                priority: -100,
            },
        );
        let mut a = Accounts::new(q);
        for _ in 0..3 {
            a.count_grant(Time::from_millis(1), &c("busy"), &x86, Duration::ZERO);
        }
        a.count_grant(Time::from_millis(2), &c("vip"), &x86, Duration::ZERO);
        a.count_grant(Time::from_millis(3), &c("one"), &x86, Duration::ZERO);
        let k = |a: &Accounts, m: &str| a.fair_key(&c(m));
        // vip: (1+1)/2 = 1; one: 2; busy: 4.
        assert_eq!(k(&a, "vip").cmp(&k(&a, "one")), Ordering::Less);
        assert_eq!(k(&a, "one").cmp(&k(&a, "busy")), Ordering::Less);
        a.count_grant(Time::from_millis(4), &c("two"), &x86, Duration::ZERO);
        // `one` and `two` both run one build; `one` was served earlier.
        assert_eq!(k(&a, "one").cmp(&k(&a, "two")), Ordering::Less);
    }

    /// Quotas refuse the member at its limit and the system at its limit, and free again
    /// when a lease ends.
    #[test]
    fn quotas_admit_until_the_limit() {
        let x86 = System::new("x86_64-linux");
        let arm = System::new("aarch64-linux");
        let mut q = Quotas {
            default_member_max_slots: Some(2),
            ..Quotas::default()
        };
        q.systems.insert(arm.clone(), 1);
        let mut a = Accounts::new(q);
        let m = c("m");
        a.count_grant(Time::ZERO, &m, &x86, Duration::ZERO);
        assert_eq!(a.admits(&m, &x86), Ok(()));
        a.count_grant(Time::ZERO, &m, &x86, Duration::ZERO);
        assert_eq!(a.admits(&m, &x86), Err(Refusal::Member { max: 2 }));
        a.count_end(&m, &x86, Duration::from_secs(3), true);
        assert_eq!(a.admits(&m, &x86), Ok(()));
        a.count_grant(Time::ZERO, &c("n"), &arm, Duration::ZERO);
        assert_eq!(a.admits(&m, &arm), Err(Refusal::System { max: 1 }));
        assert_eq!(
            a.usage(),
            vec![(
                m,
                Usage {
                    builds: 1,
                    build_millis: 3000,
                    wait_millis: 0
                }
            )]
        );
    }
}
