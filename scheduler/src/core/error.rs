//! The core's one error type. The server wraps it (`crate::Error::Core`) and maps it to a
//! `tonic::Status` in `crate::error`, the one place where codes are chosen.

/// What a core operation can refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No lease with this id is known (never granted, expired and forgotten, or granted
    /// before a scheduler restart).
    #[error("unknown lease `{lease_id}`")]
    UnknownLease {
        /// The lease id asked for.
        lease_id: String,
    },
    /// No host with this id has registered since the scheduler started.
    #[error("unknown host `{host_id}`")]
    UnknownHost {
        /// The host id asked for.
        host_id: String,
    },
    /// A newer agent stream took over this host; the older one must stop.
    #[error("the agent stream of host `{host_id}` was replaced by a newer connection")]
    Superseded {
        /// The host.
        host_id: String,
    },
    /// The lease is held by another client: only its holder may keep it alive or end it.
    #[error("lease `{lease_id}` is held by another member")]
    NotHolder {
        /// The lease id asked for.
        lease_id: String,
    },
    /// The member already has its limit of requests waiting in the queue, and this one
    /// would wait too (`CoreConfig::max_waiting_per_member`).
    #[error("member {member} already has {limit} requests waiting, its limit")]
    TooManyWaiting {
        /// The member.
        member: String,
        /// The limit in force.
        limit: usize,
    },
}
