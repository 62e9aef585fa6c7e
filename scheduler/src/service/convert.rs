//! The boundary: wire messages in, validated domain types out, and back.
//!
//! Every field is checked here once, and a bad one becomes `Error::InvalidArgument` naming
//! it (`register.systems[1]`), so the core never sees unvalidated input or a prost type.

use std::collections::BTreeSet;

use base64::Engine as _;
use nixdispatch::{proto, validate};

use crate::Error;
use crate::core::{
    BuildOutcome, CapacityView, ClientId, Decision, DiskSpace, Explanation, Feature, Grant, HostId,
    HostReport, HostSpec, HostState, HostView, LeaseId, LeaseRequest, LeaseView, LoadAverage,
    MemberQuota, MemberView, Pressure, Quotas, System, WaitAnswer, WaitStatus, WaitingCursor,
    WaitingView,
};

/// Most systems one host may serve.
const MAX_SYSTEMS: usize = 16;
/// Most features in one list.
const MAX_FEATURES: usize = 64;
/// Most hosts a client may exclude.
const MAX_EXCLUDED: usize = 64;
/// Most builds a report may claim: far above any real host, low enough to catch garbage.
const MAX_RUNNING_BUILDS: u32 = 100_000;

/// Checks that `v` is 1 to `max` characters, all accepted by `ok` (the shared rule).
fn token(
    field: &str,
    v: &str,
    max: usize,
    ok: fn(char) -> bool,
    allowed: &str,
) -> Result<(), Error> {
    validate::word(v, max, ok, allowed).map_err(|e| Error::invalid(field, e.0))
}

fn host_id(field: &str, v: &str) -> Result<HostId, Error> {
    validate::host_id(v).map_err(|e| Error::invalid(field, e.0))?;
    Ok(HostId::new(v))
}

/// A lone `-` is a valid token but means "unset" to Nix in a machines line.
fn not_dash(field: &str, v: &str) -> Result<(), Error> {
    if v == "-" {
        return Err(Error::invalid(field, "`-` means \"unset\" to Nix"));
    }
    Ok(())
}

fn system(field: &str, v: &str) -> Result<System, Error> {
    not_dash(field, v)?;
    token(
        field,
        v,
        64,
        |c| c.is_ascii_alphanumeric() || "_.-".contains(c),
        "letters, digits and _.-",
    )?;
    Ok(System::new(v))
}

fn feature_set(field: &str, vs: &[String]) -> Result<BTreeSet<Feature>, Error> {
    if vs.len() > MAX_FEATURES {
        return Err(Error::invalid(
            field,
            format!("has {} entries, at most {MAX_FEATURES} allowed", vs.len()),
        ));
    }
    vs.iter()
        .enumerate()
        .map(|(i, f)| {
            not_dash(&format!("{field}[{i}]"), f)?;
            token(
                &format!("{field}[{i}]"),
                f,
                64,
                |c| c.is_ascii_alphanumeric() || "_.+-".contains(c),
                "letters, digits and _.+-",
            )?;
            Ok(Feature::new(f.as_str()))
        })
        .collect()
}

fn lease_id(field: &str, v: &str) -> Result<LeaseId, Error> {
    token(
        field,
        v,
        64,
        |c| c.is_ascii_graphic(),
        "printable ASCII characters",
    )?;
    Ok(LeaseId::new(v))
}

fn finite(field: &str, v: f64, lo: f64, hi: f64) -> Result<f64, Error> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(Error::invalid(
            field,
            format!("{v} is outside {lo} to {hi}"),
        ))
    }
}

/// Validates an OpenSSH public key line and returns it as `<type> <base64>` (the shared
/// rule in `nixdispatch::validate`).
pub(crate) fn public_key(field: &str, v: &str) -> Result<String, Error> {
    validate::host_key(v).map_err(|e| Error::invalid(field, e.0))
}

/// Validates a store URI (the shared rule in `nixdispatch::validate`, which the hook
/// applies to every grant too).
pub(crate) fn store_uri(field: &str, v: &str) -> Result<String, Error> {
    validate::store_uri(v).map_err(|e| Error::invalid(field, e.0))?;
    Ok(v.to_owned())
}

impl TryFrom<proto::Register> for HostSpec {
    type Error = Error;

    fn try_from(r: proto::Register) -> Result<Self, Error> {
        let id = host_id("register.host_id", &r.host_id)?;
        let store_uri = store_uri("register.store_uri", &r.store_uri)?;
        let public_key = public_key("register.host_public_key", &r.host_public_key)?;
        if r.systems.is_empty() {
            return Err(Error::invalid(
                "register.systems",
                "must name at least one system",
            ));
        }
        if r.systems.len() > MAX_SYSTEMS {
            return Err(Error::invalid(
                "register.systems",
                format!(
                    "has {} entries, at most {MAX_SYSTEMS} allowed",
                    r.systems.len()
                ),
            ));
        }
        let systems = r
            .systems
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let s = system(&format!("register.systems[{i}]"), s)?;
                if s.is_builtin() {
                    return Err(Error::invalid(
                        format!("register.systems[{i}]"),
                        "`builtin` is not a real system; every host builds it",
                    ));
                }
                Ok(s)
            })
            .collect::<Result<_, _>>()?;
        let supported_features = feature_set("register.supported_features", &r.supported_features)?;
        let mandatory_features = feature_set("register.mandatory_features", &r.mandatory_features)?;
        if !(1..=1024).contains(&r.max_jobs) {
            return Err(Error::invalid(
                "register.max_jobs",
                format!("{} is outside 1 to 1024", r.max_jobs),
            ));
        }
        let speed_factor = if r.speed_factor == 0.0 {
            1.0
        } else {
            finite(
                "register.speed_factor",
                r.speed_factor,
                f64::MIN_POSITIVE,
                1000.0,
            )?
        };
        if r.agent_version.len() > 64 || r.agent_version.chars().any(char::is_control) {
            return Err(Error::invalid(
                "register.agent_version",
                "must be at most 64 printable characters",
            ));
        }
        Ok(HostSpec {
            id,
            store_uri,
            public_key,
            systems,
            supported_features,
            mandatory_features,
            max_jobs: r.max_jobs,
            speed_factor,
            cpu_count: r.cpu_count,
            total_memory_bytes: r.total_memory_bytes,
            agent_version: r.agent_version,
        })
    }
}

fn disk(field: &str, d: proto::DiskSpace) -> Result<DiskSpace, Error> {
    if d.total_bytes == 0 {
        return Err(Error::invalid(
            format!("{field}.total_bytes"),
            "must be greater than 0",
        ));
    }
    if d.free_bytes > d.total_bytes {
        return Err(Error::invalid(
            format!("{field}.free_bytes"),
            format!("{} exceeds total_bytes {}", d.free_bytes, d.total_bytes),
        ));
    }
    Ok(DiskSpace {
        free_bytes: d.free_bytes,
        total_bytes: d.total_bytes,
    })
}

impl TryFrom<proto::Report> for HostReport {
    type Error = Error;

    fn try_from(r: proto::Report) -> Result<Self, Error> {
        if let Some(n) = r.running_builds.filter(|n| *n > MAX_RUNNING_BUILDS) {
            return Err(Error::invalid(
                "report.running_builds",
                format!("{n} is above {MAX_RUNNING_BUILDS}"),
            ));
        }
        let load = r
            .load
            .map(|l| {
                Ok::<_, Error>(LoadAverage {
                    load1: finite("report.load.load1", l.load1, 0.0, 1e6)?,
                    load5: finite("report.load.load5", l.load5, 0.0, 1e6)?,
                    load15: finite("report.load.load15", l.load15, 0.0, 1e6)?,
                })
            })
            .transpose()?;
        let pct = |field: &str, v: Option<f64>| v.map(|v| finite(field, v, 0.0, 100.0)).transpose();
        let pressure = r
            .pressure
            .map(|p| {
                Ok::<_, Error>(Pressure {
                    cpu_some: pct("report.pressure.cpu_some_avg10", p.cpu_some_avg10)?,
                    memory_some: pct("report.pressure.memory_some_avg10", p.memory_some_avg10)?,
                    memory_full: pct("report.pressure.memory_full_avg10", p.memory_full_avg10)?,
                    io_some: pct("report.pressure.io_some_avg10", p.io_some_avg10)?,
                    io_full: pct("report.pressure.io_full_avg10", p.io_full_avg10)?,
                })
            })
            .transpose()?;
        Ok(HostReport {
            running_builds: r.running_builds,
            load,
            pressure,
            available_memory_bytes: r.available_memory_bytes,
            store: r.store.map(|d| disk("report.store", d)).transpose()?,
            build_dir: r
                .build_dir
                .map(|d| disk("report.build_dir", d))
                .transpose()?,
        })
    }
}

impl TryFrom<proto::AcquireRequest> for LeaseRequest {
    type Error = Error;

    fn try_from(r: proto::AcquireRequest) -> Result<Self, Error> {
        let system = system("system", &r.system)?;
        let required_features = feature_set("required_features", &r.required_features)?;
        drv_path("drv_path", &r.drv_path)?;
        let client = client_id("client_id", &r.client_id)?;
        if r.exclude_hosts.len() > MAX_EXCLUDED {
            return Err(Error::invalid(
                "exclude_hosts",
                format!(
                    "has {} entries, at most {MAX_EXCLUDED} allowed",
                    r.exclude_hosts.len()
                ),
            ));
        }
        let exclude_hosts = r
            .exclude_hosts
            .iter()
            .enumerate()
            .map(|(i, h)| host_id(&format!("exclude_hosts[{i}]"), h))
            .collect::<Result<_, _>>()?;
        let pin_host = match r.pin_host.as_str() {
            "" => None,
            h => Some(host_id("pin_host", h)?),
        };
        Ok(LeaseRequest {
            system,
            required_features,
            drv_path: r.drv_path,
            client,
            can_build_locally: r.can_build_locally,
            exclude_hosts,
            pin_host,
        })
    }
}

fn drv_path(field: &str, v: &str) -> Result<(), Error> {
    if !v.starts_with('/') || !v.ends_with(".drv") {
        return Err(Error::invalid(
            field,
            format!(
                "`{}` is not an absolute path ending in .drv",
                v.escape_debug()
            ),
        ));
    }
    if v.len() > 4096 || v.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            "must be at most 4096 bytes without control characters",
        ));
    }
    Ok(())
}

fn client_id(field: &str, v: &str) -> Result<ClientId, Error> {
    token(
        field,
        v,
        128,
        |c| c.is_ascii_graphic(),
        "printable ASCII characters without spaces",
    )?;
    Ok(ClientId::new(v))
}

/// The validated request of a `WaitForLease`, and the host it is pinned to.
pub(crate) fn wait(r: proto::WaitForLeaseRequest) -> Result<(LeaseRequest, Option<HostId>), Error> {
    let pin = if r.pin_host_id.is_empty() {
        None
    } else {
        Some(host_id("pin_host_id", &r.pin_host_id)?)
    };
    let req = LeaseRequest::try_from(proto::AcquireRequest {
        system: r.system,
        required_features: r.required_features,
        drv_path: r.drv_path,
        client_id: r.client_id,
        can_build_locally: r.can_build_locally,
        exclude_hosts: r.exclude_hosts,
        pin_host: String::new(),
    })?;
    // One pin, whichever RPC carried it: the core reads `LeaseRequest::pin_host`.
    Ok((
        LeaseRequest {
            pin_host: pin.clone(),
            ..req
        },
        pin,
    ))
}

/// What a `KeepAlive` carries to re-attach a lease after a restart.
#[derive(Debug)]
pub(crate) struct Reattach {
    pub(crate) host: HostId,
    pub(crate) client: ClientId,
    pub(crate) system: System,
    pub(crate) drv_path: String,
}

/// The validated lease id of a `KeepAlive`, and its details when it carries them.
pub(crate) fn keep_alive(
    r: &proto::KeepAliveRequest,
) -> Result<(LeaseId, Option<Reattach>), Error> {
    let id = lease_id("lease_id", &r.lease_id)?;
    let set = [&r.host_id, &r.client_id, &r.system, &r.drv_path]
        .iter()
        .filter(|v| !v.is_empty())
        .count();
    if set == 0 {
        return Ok((id, None));
    }
    if set < 4 {
        let missing = [
            ("host_id", &r.host_id),
            ("client_id", &r.client_id),
            ("system", &r.system),
            ("drv_path", &r.drv_path),
        ]
        .into_iter()
        .find(|(_, v)| v.is_empty())
        .map_or("host_id", |(f, _)| f);
        return Err(Error::invalid(
            missing,
            "must be set when any of host_id, client_id, system, drv_path is",
        ));
    }
    drv_path("drv_path", &r.drv_path)?;
    let details = Reattach {
        host: host_id("host_id", &r.host_id)?,
        client: client_id("client_id", &r.client_id)?,
        system: system("system", &r.system)?,
        drv_path: r.drv_path.clone(),
    };
    Ok((id, Some(details)))
}

/// Highest priority magnitude an operator may set.
const MAX_PRIORITY: i32 = 10_000;

/// A validated `SetQuota`, applied to `quotas`.
pub(crate) fn set_quota(r: &proto::SetQuotaRequest, quotas: &mut Quotas) -> Result<(), Error> {
    use proto::set_quota_request::Target;
    match &r.target {
        Some(Target::ClientId(c)) => {
            let member = client_id("client_id", c)?;
            if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&r.priority) {
                return Err(Error::invalid(
                    "priority",
                    format!(
                        "{} is outside -{MAX_PRIORITY} to {MAX_PRIORITY}",
                        r.priority
                    ),
                ));
            }
            let q = MemberQuota {
                max_slots: r.max_slots,
                priority: r.priority,
            };
            if q == MemberQuota::default() {
                quotas.members.remove(&member);
            } else {
                quotas.members.insert(member, q);
            }
        }
        Some(Target::System(s)) => {
            let s = system("system", s)?;
            match r.max_slots {
                Some(n) => quotas.systems.insert(s, n),
                None => quotas.systems.remove(&s),
            };
        }
        Some(Target::DefaultMember(true)) => quotas.default_member_max_slots = r.max_slots,
        Some(Target::DefaultMember(false)) | None => {
            return Err(Error::invalid(
                "target",
                "set one of client_id, system, default_member = true",
            ));
        }
    }
    Ok(())
}

impl From<&Quotas> for proto::Quotas {
    fn from(q: &Quotas) -> Self {
        proto::Quotas {
            default_member_max_slots: q.default_member_max_slots,
            members: q
                .members
                .iter()
                .map(|(m, x)| proto::MemberQuota {
                    client_id: m.to_string(),
                    max_slots: x.max_slots,
                    priority: x.priority,
                })
                .collect(),
            systems: q
                .systems
                .iter()
                .map(|(s, n)| proto::SystemQuota {
                    system: s.to_string(),
                    max_slots: *n,
                })
                .collect(),
        }
    }
}

impl From<MemberView> for proto::MemberUsage {
    fn from(m: MemberView) -> Self {
        proto::MemberUsage {
            client_id: m.member.to_string(),
            running: m.running,
            max_slots: m.max_slots,
            priority: m.priority,
            builds: m.usage.builds,
            build_seconds: m.usage.build_millis as f64 / 1000.0,
            wait_seconds: m.usage.wait_millis as f64 / 1000.0,
        }
    }
}

/// A `waiting` event.
pub(crate) fn waiting(status: WaitStatus, reason: String) -> proto::WaitForLeaseResponse {
    proto::WaitForLeaseResponse {
        event: Some(proto::wait_for_lease_response::Event::Waiting(
            proto::Waiting {
                queue_position: status.position,
                estimated_wait_millis: millis(status.estimate),
                reason,
            },
        )),
    }
}

/// The final event of a `WaitForLease` that did not queue.
impl From<WaitAnswer> for proto::WaitForLeaseResponse {
    fn from(a: WaitAnswer) -> Self {
        use proto::wait_for_lease_response::Event;
        let event = match a {
            WaitAnswer::Granted(g) => Event::Granted(g.into()),
            WaitAnswer::Queued { status, reason, .. } => return waiting(status, reason),
            WaitAnswer::Decline { reason } => Event::Decline(proto::Decline { reason }),
            WaitAnswer::DeclinePermanently { reason } => {
                Event::DeclinePermanently(proto::DeclinePermanently { reason })
            }
        };
        proto::WaitForLeaseResponse { event: Some(event) }
    }
}

/// The validated lease id and outcome of a `Release`.
pub(crate) fn release(r: &proto::ReleaseRequest) -> Result<(LeaseId, BuildOutcome), Error> {
    let id = lease_id("lease_id", &r.lease_id)?;
    let outcome = match proto::BuildOutcome::try_from(r.outcome) {
        Ok(proto::BuildOutcome::Succeeded) => BuildOutcome::Succeeded,
        Ok(proto::BuildOutcome::BuildFailed) => BuildOutcome::BuildFailed,
        Ok(proto::BuildOutcome::HostUnreachable) => BuildOutcome::HostUnreachable,
        Ok(proto::BuildOutcome::Cancelled) => BuildOutcome::Cancelled,
        Ok(proto::BuildOutcome::Unspecified) => {
            return Err(Error::invalid(
                "outcome",
                "must be set (not BUILD_OUTCOME_UNSPECIFIED)",
            ));
        }
        Err(_) => {
            return Err(Error::invalid(
                "outcome",
                format!("{} is not a known outcome", r.outcome),
            ));
        }
    };
    Ok((id, outcome))
}

/// A validated host id for the admin calls.
pub(crate) fn admin_host_id(v: &str) -> Result<HostId, Error> {
    host_id("host_id", v)
}

/// The validated builder of `ProvisionHost` (each field named in `INVALID_ARGUMENT`).
pub(crate) fn provision(r: &proto::ProvisionHostRequest) -> Result<crate::auth::HostEntry, Error> {
    host_id("host_id", &r.host_id)?;
    store_uri("store_uri", &r.store_uri)?;
    public_key("host_public_key", &r.host_public_key)?;
    if crate::auth::Digest::from_hex(&r.token_sha256).is_none() {
        return Err(Error::invalid(
            "token_sha256",
            "must be the SHA-256 of the token, 64 hex digits, never the token itself",
        ));
    }
    Ok(crate::auth::HostEntry {
        id: r.host_id.clone(),
        store_uri: r.store_uri.clone(),
        public_key: r.host_public_key.clone(),
        token_sha256: r.token_sha256.to_ascii_lowercase(),
    })
}

/// The validated system and features of `ExplainPlacement`.
pub(crate) fn explain(
    r: &proto::ExplainPlacementRequest,
) -> Result<(System, BTreeSet<Feature>), Error> {
    Ok((
        system("system", &r.system)?,
        feature_set("required_features", &r.required_features)?,
    ))
}

fn strings<T: ToString>(items: impl IntoIterator<Item = T>) -> Vec<String> {
    items.into_iter().map(|s| s.to_string()).collect()
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<Grant> for proto::Granted {
    fn from(g: Grant) -> Self {
        proto::Granted {
            lease_id: g.lease_id.to_string(),
            host_id: g.host.id.to_string(),
            store_uri: g.host.store_uri,
            systems: strings(&g.host.systems),
            max_jobs: g.host.max_jobs,
            speed_factor: g.host.speed_factor,
            supported_features: strings(&g.host.supported_features),
            mandatory_features: strings(&g.host.mandatory_features),
            host_public_key_base64: base64::engine::general_purpose::STANDARD
                .encode(&g.host.public_key),
            lease_ttl_millis: millis(g.ttl),
            slots_used: g.slots_used,
            slots_total: g.slots_total,
            attached: g.attached,
        }
    }
}

impl From<Decision> for proto::AcquireResponse {
    fn from(d: Decision) -> Self {
        use proto::acquire_response::Outcome;
        let outcome = match d {
            Decision::Granted(g) => Outcome::Granted(g.into()),
            Decision::Postpone {
                retry_after,
                position,
                reason,
            } => Outcome::Postpone(proto::Postpone {
                retry_after_millis: millis(retry_after),
                queue_position: position,
                reason,
            }),
            Decision::Decline { reason } => Outcome::Decline(proto::Decline { reason }),
            Decision::DeclinePermanently { reason } => {
                Outcome::DeclinePermanently(proto::DeclinePermanently { reason })
            }
        };
        proto::AcquireResponse {
            outcome: Some(outcome),
        }
    }
}

/// What `DrainHost` and `UndrainHost` answer for a host whose agent has not registered
/// since the scheduler started: its id and the operator's decision.
pub(crate) fn unregistered_host(id: &HostId, draining: bool) -> proto::HostStatus {
    proto::HostStatus {
        host_id: id.to_string(),
        state: proto::HostState::NotRegistered as i32,
        draining,
        unavailable_reason: "its agent has not registered since the scheduler started".into(),
        ..proto::HostStatus::default()
    }
}

fn state(s: HostState) -> proto::HostState {
    match s {
        HostState::Ready => proto::HostState::Ready,
        HostState::Stale => proto::HostState::Stale,
        HostState::Disconnected => proto::HostState::Disconnected,
        HostState::Gone => proto::HostState::Gone,
    }
}

impl From<HostView> for proto::HostStatus {
    fn from(h: HostView) -> Self {
        let r = h.report;
        proto::HostStatus {
            host_id: h.spec.id.to_string(),
            store_uri: h.spec.store_uri,
            systems: strings(&h.spec.systems),
            supported_features: strings(&h.spec.supported_features),
            mandatory_features: strings(&h.spec.mandatory_features),
            state: state(h.state) as i32,
            draining: h.draining,
            slots_total: h.spec.max_jobs,
            slots_used: h.slots_used,
            leases: h.leases,
            running_builds: r.running_builds,
            speed_factor: h.spec.speed_factor,
            load: r.load.map(|l| proto::LoadAverage {
                load1: l.load1,
                load5: l.load5,
                load15: l.load15,
            }),
            pressure: r.pressure.map(|p| proto::Pressure {
                cpu_some_avg10: p.cpu_some,
                memory_some_avg10: p.memory_some,
                memory_full_avg10: p.memory_full,
                io_some_avg10: p.io_some,
                io_full_avg10: p.io_full,
            }),
            available_memory_bytes: r.available_memory_bytes,
            total_memory_bytes: h.spec.total_memory_bytes,
            store: r.store.map(|d| proto::DiskSpace {
                free_bytes: d.free_bytes,
                total_bytes: d.total_bytes,
            }),
            build_dir: r.build_dir.map(|d| proto::DiskSpace {
                free_bytes: d.free_bytes,
                total_bytes: d.total_bytes,
            }),
            millis_since_last_report: millis(h.since_last_report),
            cpu_count: h.spec.cpu_count,
            agent_version: h.spec.agent_version,
            unavailable_reason: h.unavailable_reason.unwrap_or_default(),
        }
    }
}

/// A host as a member's machine reaches it: its machines-line fields, nothing else.
impl From<HostView> for proto::Builder {
    fn from(h: HostView) -> Self {
        proto::Builder {
            host_id: h.spec.id.to_string(),
            host_public_key_base64: base64::engine::general_purpose::STANDARD
                .encode(&h.spec.public_key),
            store_uri: h.spec.store_uri,
            systems: strings(&h.spec.systems),
            supported_features: strings(&h.spec.supported_features),
            mandatory_features: strings(&h.spec.mandatory_features),
            unavailable_reason: h.unavailable_reason.unwrap_or_default(),
        }
    }
}

impl From<LeaseView> for proto::LeaseStatus {
    fn from(l: LeaseView) -> Self {
        proto::LeaseStatus {
            lease_id: l.id.to_string(),
            host_id: l.host.to_string(),
            client_id: l.client.to_string(),
            system: l.system.to_string(),
            drv_path: l.drv_path,
            age_millis: millis(l.age),
            expires_in_millis: millis(l.expires_in),
        }
    }
}

impl From<WaitingView> for proto::WaitingRequest {
    fn from(w: WaitingView) -> Self {
        proto::WaitingRequest {
            client_id: w.client.to_string(),
            system: w.system.to_string(),
            required_features: w.features.iter().map(|f| f.as_str().to_owned()).collect(),
            drv_path: w.drv_path,
            position: w.status.position,
            waited_millis: millis(w.waited),
            estimated_wait_millis: millis(w.status.estimate),
            pin_host_id: w.pin.map(|p| p.to_string()).unwrap_or_default(),
            streaming: w.streaming,
        }
    }
}

/// `ListWaiting`'s page size when the request leaves it unset: about a millisecond of the
/// core's time per page (positions cost `O(members)` each).
pub(crate) const WAITING_PAGE: usize = 256;
/// The largest page `ListWaiting` answers: bounds how long one page holds the core.
pub(crate) const MAX_WAITING_PAGE: usize = 1000;

/// The validated page of a `ListWaiting`: its size, and where it starts.
pub(crate) fn waiting_page(
    r: &proto::ListWaitingRequest,
) -> Result<(usize, Option<WaitingCursor>), Error> {
    let size = match usize::try_from(r.page_size).unwrap_or(usize::MAX) {
        0 => WAITING_PAGE,
        n if n > MAX_WAITING_PAGE => {
            return Err(Error::invalid(
                "page_size",
                format!("{n} is over the largest page, {MAX_WAITING_PAGE}"),
            ));
        }
        n => n,
    };
    if r.page_token.is_empty() {
        return Ok((size, None));
    }
    let bad = || {
        Error::invalid(
            "page_token",
            "not a `next_page_token` of ListWaiting (send it back unchanged, or empty for the \
             first page)",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&r.page_token)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let [client, sys, drv] = text
        .split('\0')
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| bad())?;
    let cursor = WaitingCursor {
        client: client_id("page_token", client).map_err(|_| bad())?,
        system: system("page_token", sys).map_err(|_| bad())?,
        drv_path: drv.to_owned(),
    };
    drv_path("page_token", drv).map_err(|_| bad())?;
    Ok((size, Some(cursor)))
}

/// The `next_page_token` that starts a `ListWaiting` page after `c`: opaque to clients,
/// the cursor's three parts (none can hold a NUL) in URL-safe base64.
pub(crate) fn waiting_token(c: &WaitingCursor) -> String {
    let raw = format!("{}\0{}\0{}", c.client, c.system, c.drv_path);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

impl From<CapacityView> for proto::SystemCapacity {
    fn from(c: CapacityView) -> Self {
        proto::SystemCapacity {
            system: c.system,
            hosts: c.hosts,
            hosts_available: c.hosts_available,
            slots_total: c.slots_total,
            slots_free: c.slots_free,
            leases: c.leases,
            waiting: c.waiting,
        }
    }
}

impl From<Explanation> for proto::ExplainPlacementResponse {
    fn from(e: Explanation) -> Self {
        proto::ExplainPlacementResponse {
            hosts: e
                .verdicts
                .into_iter()
                .map(|v| match v.result {
                    Ok(score) => proto::HostVerdict {
                        host_id: v.host.to_string(),
                        eligible: true,
                        reason: String::new(),
                        score,
                    },
                    Err(reason) => proto::HostVerdict {
                        host_id: v.host.to_string(),
                        eligible: false,
                        reason,
                        score: 0.0,
                    },
                })
                .collect(),
            chosen_host_id: e.chosen.map(|h| h.to_string()).unwrap_or_default(),
            outcome: e.outcome.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ed25519 host key line (generated for these tests).
    pub(crate) const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv root@builder";

    fn register() -> proto::Register {
        proto::Register {
            host_id: "build01".into(),
            store_uri: "ssh-ng://nix@build01.nix-community.org".into(),
            host_public_key: KEY.into(),
            systems: vec!["x86_64-linux".into()],
            supported_features: vec!["kvm".into(), "big-parallel".into()],
            mandatory_features: vec![],
            max_jobs: 6,
            speed_factor: 0.0,
            cpu_count: 24,
            total_memory_bytes: 1 << 36,
            agent_version: "0.1.0".into(),
        }
    }

    /// Expected field name, and how to spoil a good message.
    type Cases<M> = Vec<(&'static str, Box<dyn Fn(&mut M)>)>;

    fn field_of(e: Error) -> String {
        match e {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("{other:?}"),
        }
    }

    /// A good registration converts; the comment is dropped from the key and speed 0 is 1.
    #[test]
    fn good_register_converts() {
        let spec = HostSpec::try_from(register()).unwrap();
        assert_eq!(spec.public_key, KEY.rsplit_once(' ').unwrap().0);
        assert_eq!(spec.speed_factor, 1.0);
    }

    /// Each bad registration field is rejected with its own name.
    #[test]
    fn bad_register_fields_are_named() {
        let cases: Cases<proto::Register> = vec![
            ("register.host_id", Box::new(|r| r.host_id = "a b".into())),
            (
                "register.host_id",
                Box::new(|r| r.host_id = "x".repeat(129)),
            ),
            (
                "register.store_uri",
                Box::new(|r| r.store_uri = "http://x".into()),
            ),
            (
                "register.store_uri",
                Box::new(|r| r.store_uri = "ssh://".into()),
            ),
            (
                "register.host_public_key",
                Box::new(|r| r.host_public_key = "ssh-ed25519".into()),
            ),
            (
                "register.host_public_key",
                Box::new(|r| r.host_public_key = "ssh-dss AAAA".into()),
            ),
            (
                "register.host_public_key",
                Box::new(|r| {
                    r.host_public_key = "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv".into()
                }),
            ),
            (
                "register.host_public_key",
                Box::new(|r| r.host_public_key = "ssh-ed25519 !!!".into()),
            ),
            ("register.systems", Box::new(|r| r.systems.clear())),
            (
                "register.systems",
                Box::new(|r| r.systems = vec!["x".into(); 17]),
            ),
            (
                "register.systems[1]",
                Box::new(|r| r.systems.push("".into())),
            ),
            (
                "register.systems[1]",
                Box::new(|r| r.systems.push("builtin".into())),
            ),
            (
                "register.supported_features",
                Box::new(|r| r.supported_features = vec!["f".into(); 65]),
            ),
            (
                "register.mandatory_features[0]",
                Box::new(|r| r.mandatory_features = vec!["a,b".into()]),
            ),
            ("register.max_jobs", Box::new(|r| r.max_jobs = 0)),
            ("register.max_jobs", Box::new(|r| r.max_jobs = 5000)),
            (
                "register.speed_factor",
                Box::new(|r| r.speed_factor = f64::NAN),
            ),
            ("register.speed_factor", Box::new(|r| r.speed_factor = -1.0)),
            (
                "register.agent_version",
                Box::new(|r| r.agent_version = "v".repeat(65)),
            ),
        ];
        for (field, mutate) in cases {
            let mut r = register();
            mutate(&mut r);
            assert_eq!(field_of(HostSpec::try_from(r).unwrap_err()), field);
        }
    }

    /// What the `scheduler_convert` fuzz target checks (a registration accepted here gives a
    /// grant the hook accepts and Nix reads back as that host): a store URI with `;` or `#`,
    /// or a system or feature that is just `-`, broke that, so they are refused here.
    #[test]
    fn register_refuses_what_a_machines_line_cannot_carry() {
        let cases: Cases<proto::Register> = vec![
            (
                "register.store_uri",
                Box::new(|r| r.store_uri = "ssh://b1;ssh://evil".into()),
            ),
            (
                "register.store_uri",
                Box::new(|r| r.store_uri = "ssh://b1#".into()),
            ),
            (
                "register.systems[0]",
                Box::new(|r| r.systems = vec!["-".into()]),
            ),
            (
                "register.supported_features[0]",
                Box::new(|r| r.supported_features = vec!["-".into()]),
            ),
        ];
        for (field, mutate) in cases {
            let mut r = register();
            mutate(&mut r);
            assert_eq!(field_of(HostSpec::try_from(r).unwrap_err()), field);
        }
    }

    /// Bad reports are rejected with the field named; absent values stay absent.
    #[test]
    fn reports_are_validated() {
        assert_eq!(
            HostReport::try_from(proto::Report::default()).unwrap(),
            HostReport::default()
        );
        let bad = proto::Report {
            pressure: Some(proto::Pressure {
                io_full_avg10: Some(101.0),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            field_of(HostReport::try_from(bad).unwrap_err()),
            "report.pressure.io_full_avg10"
        );
        let bad = proto::Report {
            load: Some(proto::LoadAverage {
                load1: f64::INFINITY,
                load5: 0.0,
                load15: 0.0,
            }),
            ..Default::default()
        };
        assert_eq!(
            field_of(HostReport::try_from(bad).unwrap_err()),
            "report.load.load1"
        );
        let bad = proto::Report {
            store: Some(proto::DiskSpace {
                free_bytes: 2,
                total_bytes: 1,
            }),
            ..Default::default()
        };
        assert_eq!(
            field_of(HostReport::try_from(bad).unwrap_err()),
            "report.store.free_bytes"
        );
        let bad = proto::Report {
            build_dir: Some(proto::DiskSpace {
                free_bytes: 0,
                total_bytes: 0,
            }),
            ..Default::default()
        };
        assert_eq!(
            field_of(HostReport::try_from(bad).unwrap_err()),
            "report.build_dir.total_bytes"
        );
        let bad = proto::Report {
            running_builds: Some(u32::MAX),
            ..Default::default()
        };
        assert_eq!(
            field_of(HostReport::try_from(bad).unwrap_err()),
            "report.running_builds"
        );
    }

    /// Bad acquire fields are rejected with their names.
    #[test]
    fn bad_acquire_fields_are_named() {
        let good = proto::AcquireRequest {
            system: "x86_64-linux".into(),
            required_features: vec!["kvm".into()],
            drv_path: "/nix/store/abc-hello.drv".into(),
            client_id: "alice-laptop".into(),
            can_build_locally: true,
            exclude_hosts: vec!["b1".into()],
            pin_host: "b1".into(),
        };
        assert_eq!(
            LeaseRequest::try_from(good.clone()).unwrap().pin_host,
            Some(HostId::new("b1"))
        );
        let cases: Cases<proto::AcquireRequest> = vec![
            ("system", Box::new(|r| r.system.clear())),
            ("system", Box::new(|r| r.system = "x86_64 linux".into())),
            ("system", Box::new(|r| r.system = "s".repeat(65))),
            (
                "required_features",
                Box::new(|r| r.required_features = vec!["f".into(); 65]),
            ),
            (
                "required_features[0]",
                Box::new(|r| r.required_features = vec!["".into()]),
            ),
            ("drv_path", Box::new(|r| r.drv_path = "hello.drv".into())),
            ("drv_path", Box::new(|r| r.drv_path = "/nix/store/x".into())),
            (
                "drv_path",
                Box::new(|r| r.drv_path = format!("/{}.drv", "a".repeat(5000))),
            ),
            ("client_id", Box::new(|r| r.client_id.clear())),
            ("client_id", Box::new(|r| r.client_id = "a b".into())),
            (
                "exclude_hosts[0]",
                Box::new(|r| r.exclude_hosts = vec!["!".into()]),
            ),
            (
                "exclude_hosts",
                Box::new(|r| r.exclude_hosts = vec!["h".into(); 65]),
            ),
            ("pin_host", Box::new(|r| r.pin_host = "a b".into())),
        ];
        for (field, mutate) in cases {
            let mut r = good.clone();
            mutate(&mut r);
            assert_eq!(field_of(LeaseRequest::try_from(r).unwrap_err()), field);
        }
    }

    /// A release needs a lease id and a real outcome.
    #[test]
    fn release_is_validated() {
        let r = proto::ReleaseRequest {
            lease_id: "x".into(),
            outcome: 0,
            duration_millis: 0,
        };
        assert_eq!(field_of(release(&r).unwrap_err()), "outcome");
        let r = proto::ReleaseRequest {
            lease_id: "x".into(),
            outcome: 99,
            duration_millis: 0,
        };
        assert_eq!(field_of(release(&r).unwrap_err()), "outcome");
        let r = proto::ReleaseRequest {
            lease_id: "".into(),
            outcome: 1,
            duration_millis: 0,
        };
        assert_eq!(field_of(release(&r).unwrap_err()), "lease_id");
    }

    /// A `ListWaiting` token names the request it follows and reads back as that cursor;
    /// a page size of 0 is the default and one over the largest is refused.
    #[test]
    fn waiting_pages_round_trip_and_bad_ones_name_their_field() {
        let cursor = WaitingCursor {
            client: ClientId::new("alice@example"),
            system: System::new("x86_64-linux"),
            drv_path: "/nix/store/abc-hello-2.12.drv".into(),
        };
        let request = |page_size, page_token: String| proto::ListWaitingRequest {
            page_size,
            page_token,
        };
        assert_eq!(
            waiting_page(&request(0, String::new())).unwrap(),
            (WAITING_PAGE, None)
        );
        assert_eq!(
            waiting_page(&request(7, waiting_token(&cursor))).unwrap(),
            (7, Some(cursor.clone()))
        );
        assert_eq!(
            waiting_page(&request(1000, String::new())).unwrap().0,
            MAX_WAITING_PAGE
        );
        assert_eq!(
            field_of(waiting_page(&request(1001, String::new())).unwrap_err()),
            "page_size"
        );
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        for token in [
            "%%%".to_owned(),
            b64("alice\0x86_64-linux"),
            b64("alice\0x86_64-linux\0/nix/store/a.drv\0more"),
            b64("alice\0x86 64\0/nix/store/a.drv"),
            b64("\0x86_64-linux\0/nix/store/a.drv"),
            b64("alice\0x86_64-linux\0relative.drv"),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            assert_eq!(
                field_of(waiting_page(&request(0, token.clone())).unwrap_err()),
                "page_token",
                "{token}"
            );
        }
    }

    /// The granted host key is the base64 of the key line, as Nix's machines file wants it.
    #[test]
    fn granted_key_is_base64_of_the_line() {
        let spec = HostSpec::try_from(register()).unwrap();
        let g = proto::Granted::from(Grant {
            lease_id: LeaseId::new("l"),
            host: spec.clone(),
            ttl: std::time::Duration::from_secs(60),
            slots_used: 1,
            slots_total: 6,
            attached: false,
        });
        let line = base64::engine::general_purpose::STANDARD
            .decode(g.host_public_key_base64)
            .unwrap();
        assert_eq!(String::from_utf8(line).unwrap(), spec.public_key);
        assert_eq!(g.lease_ttl_millis, 60_000);
    }

    /// A waiting request validates like an acquire and names its pin; a keep-alive either
    /// carries all four re-attach details or none, naming the first one missing.
    #[test]
    fn wait_and_keep_alive_fields_are_named() {
        let good = proto::WaitForLeaseRequest {
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/abc-hello.drv".into(),
            client_id: "m".into(),
            pin_host_id: "b1".into(),
            ..Default::default()
        };
        let (req, pin) = wait(good.clone()).unwrap();
        assert_eq!((req.client.as_str(), pin), ("m", Some(HostId::new("b1"))));
        let cases: Cases<proto::WaitForLeaseRequest> = vec![
            ("pin_host_id", Box::new(|r| r.pin_host_id = "a/b".into())),
            ("drv_path", Box::new(|r| r.drv_path = "x".into())),
            ("client_id", Box::new(|r| r.client_id.clear())),
        ];
        for (field, mutate) in cases {
            let mut r = good.clone();
            mutate(&mut r);
            assert_eq!(field_of(wait(r).unwrap_err()), field);
        }
        let full = proto::KeepAliveRequest {
            lease_id: "l".into(),
            host_id: "b1".into(),
            client_id: "m".into(),
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/abc-hello.drv".into(),
        };
        assert!(keep_alive(&full).unwrap().1.is_some());
        let bare = proto::KeepAliveRequest {
            lease_id: "l".into(),
            ..Default::default()
        };
        assert!(keep_alive(&bare).unwrap().1.is_none());
        let cases: Cases<proto::KeepAliveRequest> = vec![
            ("system", Box::new(|r| r.system.clear())),
            ("host_id", Box::new(|r| r.host_id = "a b".into())),
            ("drv_path", Box::new(|r| r.drv_path = "rel.drv".into())),
            ("lease_id", Box::new(|r| r.lease_id.clear())),
        ];
        for (field, mutate) in cases {
            let mut r = full.clone();
            mutate(&mut r);
            assert_eq!(field_of(keep_alive(&r).unwrap_err()), field);
        }
    }

    /// `SetQuota` sets and clears member, system and default quotas, and names bad fields.
    #[test]
    fn set_quota_applies_and_names_fields() {
        use proto::set_quota_request::Target;
        let mut q = Quotas::default();
        let set = |target, max_slots, priority| proto::SetQuotaRequest {
            target: Some(target),
            max_slots,
            priority,
        };
        set_quota(&set(Target::ClientId("m".into()), Some(3), -50), &mut q).unwrap();
        set_quota(
            &set(Target::System("x86_64-linux".into()), Some(9), 0),
            &mut q,
        )
        .unwrap();
        set_quota(&set(Target::DefaultMember(true), Some(2), 0), &mut q).unwrap();
        assert_eq!(q.member_max(&ClientId::new("m")), Some(3));
        assert_eq!(q.member_max(&ClientId::new("n")), Some(2));
        assert_eq!(q.systems[&System::new("x86_64-linux")], 9);
        set_quota(&set(Target::ClientId("m".into()), None, 0), &mut q).unwrap();
        set_quota(&set(Target::System("x86_64-linux".into()), None, 0), &mut q).unwrap();
        assert!(q.members.is_empty() && q.systems.is_empty());
        let bad = |r| field_of(set_quota(&r, &mut Quotas::default()).unwrap_err());
        assert_eq!(
            bad(set(Target::ClientId("m".into()), None, 20_000)),
            "priority"
        );
        assert_eq!(bad(set(Target::ClientId("".into()), None, 0)), "client_id");
        assert_eq!(bad(set(Target::DefaultMember(false), None, 0)), "target");
        assert_eq!(bad(proto::SetQuotaRequest::default()), "target");
    }

    mod arbitrary {
        use proptest::prelude::*;

        use super::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                ".{0,80}",
                "[a-z0-9_-]{1,20}",
                Just("builtin".to_owned()),
                Just(KEY.to_owned()),
                Just("ssh-ng://b1".to_owned()),
                Just("/nix/store/x.drv".to_owned()),
            ]
        }

        fn float() -> impl Strategy<Value = f64> {
            prop_oneof![
                any::<f64>(),
                0.0..200.0,
                Just(f64::NAN),
                Just(f64::INFINITY),
                Just(-0.0)
            ]
        }

        fn disk() -> impl Strategy<Value = Option<proto::DiskSpace>> {
            proptest::option::of((any::<u64>(), any::<u64>()).prop_map(
                |(free_bytes, total_bytes)| proto::DiskSpace {
                    free_bytes,
                    total_bytes,
                },
            ))
        }

        proptest! {
            /// Any registration either converts into a spec that satisfies the core's
            /// assumptions or is refused with a field name; it never panics.
            #[test]
            fn any_register_is_valid_or_named(
                host_id in text(), store_uri in text(), key in text(),
                systems in proptest::collection::vec(text(), 0..20),
                features in proptest::collection::vec(text(), 0..70),
                max_jobs in any::<u32>(), speed in float(), version in text(),
            ) {
                let r = proto::Register {
                    host_id, store_uri, host_public_key: key, systems,
                    supported_features: features.clone(), mandatory_features: features,
                    max_jobs, speed_factor: speed, cpu_count: 1, total_memory_bytes: 1, agent_version: version,
                };
                match HostSpec::try_from(r) {
                    Ok(h) => {
                        prop_assert!((1..=1024).contains(&h.max_jobs));
                        prop_assert!(h.speed_factor.is_finite() && h.speed_factor > 0.0);
                        prop_assert!(!h.systems.is_empty() && h.systems.len() <= MAX_SYSTEMS);
                        prop_assert!(h.systems.iter().all(|s| !s.is_builtin()));
                    }
                    Err(e) => prop_assert!(field_of(e).starts_with("register.")),
                }
            }

            /// Any report either converts into one whose numbers are sane or is refused with a
            /// field name.
            #[test]
            fn any_report_is_valid_or_named(
                running in proptest::option::of(any::<u32>()),
                l1 in float(), p in proptest::option::of(float()), store in disk(), build in disk(),
            ) {
                let r = proto::Report {
                    running_builds: running,
                    load: Some(proto::LoadAverage { load1: l1, load5: 0.0, load15: 0.0 }),
                    pressure: Some(proto::Pressure { memory_full_avg10: p, ..Default::default() }),
                    available_memory_bytes: None, store, build_dir: build,
                };
                match HostReport::try_from(r) {
                    Ok(h) => {
                        prop_assert!(h.load.unwrap().load1.is_finite());
                        prop_assert!(h.pressure.unwrap().memory_full.is_none_or(|v| (0.0..=100.0).contains(&v)));
                        for d in [h.store, h.build_dir].into_iter().flatten() {
                            prop_assert!(d.total_bytes > 0 && d.free_bytes <= d.total_bytes);
                            prop_assert!((0.0..=100.0).contains(&d.free_percent()));
                        }
                    }
                    Err(e) => prop_assert!(field_of(e).starts_with("report.")),
                }
            }

            /// Any acquire request either converts or is refused with a field name.
            #[test]
            fn any_acquire_is_valid_or_named(
                system in text(), features in proptest::collection::vec(text(), 0..70),
                drv in text(), client in text(), exclude in proptest::collection::vec(text(), 0..70),
                pin in text(),
            ) {
                let r = proto::AcquireRequest { system, required_features: features, drv_path: drv, client_id: client, can_build_locally: false, exclude_hosts: exclude, pin_host: pin };
                if let Err(e) = LeaseRequest::try_from(r) {
                    let f = field_of(e);
                    prop_assert!(["system", "required_features", "drv_path", "client_id", "exclude_hosts", "pin_host"].iter().any(|p| f.starts_with(p)), "{}", f);
                }
            }
        }
    }
}
