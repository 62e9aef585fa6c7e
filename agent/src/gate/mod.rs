//! The gate socket: a local Unix socket on which the agent serves the part of
//! `nixdispatch.v1.LeaseService` that the builder-side gate uses (`WaitForLease`,
//! `Acquire`, `KeepAlive`, `Release`), so that the gate, which sshd runs as the member,
//! never holds this builder's credential.
//!
//! - The member is the connecting process's user, from the socket's peer credentials
//!   (`SO_PEERCRED`), never what the client says: a `client_id` naming anybody else is
//!   refused, unless the user is listed in `[gate] may_name_members` (a shared login user
//!   whose forced command names the member).
//! - Every request is pinned to this host and forwarded with the agent's own credential;
//!   the scheduler accepts member names from a builder only for its own host.
//! - A lease granted through the socket is bound to the connecting uid: only that uid may
//!   keep it alive or release it here. Keep-alives are forwarded with the lease's details,
//!   so that after a scheduler restart the lease is re-attached and its build stays counted.
//! - The bindings live in memory. After an agent restart, a keep-alive or release of a
//!   lease the agent does not know makes it ask the scheduler (with the builder's
//!   credential, which lists the leases on this host) who holds it; it binds the lease to
//!   the asking uid only when the lease is on this host and held by the member that uid
//!   acts for: its user name, or the member a `may_name_members` user names unless that
//!   member is another local user (whose own gate may have held it). Another uid still
//!   cannot keep alive or release it.
//! - Bounds: at most `max_connections` connections (and `max_connections_per_user` per
//!   uid), a few streams per connection, every forwarded call within `rpc_timeout_millis`;
//!   the socket's tasks never wait on the capacity stream's and the reverse.

mod passwd;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nixdispatch::client::{AuthChannel, Prepared};
use nixdispatch::proto::lease_service_client::LeaseServiceClient;
use nixdispatch::proto::lease_service_server::{LeaseService, LeaseServiceServer};
use nixdispatch::proto::{
    AcquireRequest, AcquireResponse, BuildOutcome, KeepAliveRequest, KeepAliveResponse,
    ListBuildersRequest, ListBuildersResponse, ListLeasesRequest, ReleaseRequest, ReleaseResponse,
    WaitForLeaseRequest, WaitForLeaseResponse, acquire_response, wait_for_lease_response,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::GateSocketConfig;
use crate::error::{Error, Result};

/// Streams one connection may carry at once: a gate holds one `WaitForLease` and sends a
/// keep-alive or a release now and then.
const STREAMS_PER_CONNECTION: u32 = 8;

/// A lease bound here that has not been kept alive for this long has expired at the
/// scheduler long ago (its TTL is seconds to minutes): it is forgotten.
const STALE: Duration = Duration::from_secs(3600);

/// At most this many leases are bound at once (a builder runs tens of builds); past it the
/// stalest are forgotten first.
const MAX_BOUND: usize = 4096;

/// Binds the socket at `config.socket` (a stale socket file left by a previous run is
/// replaced) and sets its permission bits. `None` when no socket is configured.
pub fn bind(config: &GateSocketConfig) -> Result<Option<UnixListener>> {
    let Some(path) = &config.socket else {
        return Ok(None);
    };
    let err = |source| Error::GateSocket {
        path: path.clone(),
        source,
    };
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode)).map_err(err)?;
    Ok(Some(listener))
}

/// The connecting process, as the kernel says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its uid.
    pub uid: u32,
    /// Its user name; `None` when the uid has none.
    pub name: Option<String>,
}

/// Counts connections, in total and per uid.
#[derive(Debug, Default)]
struct Connections {
    total: u32,
    per_uid: HashMap<u32, u32>,
}

/// One accepted connection; gives its place back when dropped.
#[derive(Debug)]
struct PeerStream {
    inner: UnixStream,
    peer: Peer,
    counts: Arc<Mutex<Connections>>,
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        let mut c = self.counts.lock().expect("connections lock");
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_uid.get_mut(&self.peer.uid) {
            *n -= 1;
            if *n == 0 {
                c.per_uid.remove(&self.peer.uid);
            }
        }
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts connections within the bounds, and resolves each peer's user name (off the
/// runtime's thread: NSS may ask a directory server) before handing it to the server.
async fn accept(
    listener: UnixListener,
    config: GateSocketConfig,
    out: mpsc::Sender<std::io::Result<PeerStream>>,
) {
    let counts = Arc::new(Mutex::new(Connections::default()));
    let bound = Duration::from_millis(config.rpc_timeout_millis);
    loop {
        let stream = tokio::select! {
            () = out.closed() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, typically: wait a little rather than spin.
                    tracing::warn!(error = %e, "gate socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(cred) = stream.peer_cred() else {
            tracing::warn!("gate socket: a connection without peer credentials; closed");
            continue;
        };
        let uid = cred.uid();
        {
            let mut c = counts.lock().expect("connections lock");
            let mine = c.per_uid.get(&uid).copied().unwrap_or(0);
            if c.total >= config.max_connections || mine >= config.max_connections_per_user {
                tracing::warn!(
                    uid,
                    total = c.total,
                    of_this_user = mine,
                    "gate socket: connection limit reached; closed (that gate fails open or closed as configured)"
                );
                continue;
            }
            c.total += 1;
            *c.per_uid.entry(uid).or_insert(0) += 1;
        }
        // Counted from here: the stream's drop gives the place back.
        let mut conn = PeerStream {
            inner: stream,
            peer: Peer { uid, name: None },
            counts: counts.clone(),
        };
        let out = out.clone();
        tokio::spawn(async move {
            let lookup = tokio::task::spawn_blocking(move || passwd::user_name(uid));
            conn.peer.name = match tokio::time::timeout(bound, lookup).await {
                Ok(Ok(name)) => name,
                _ => None,
            };
            let _ = out.send(Ok(conn)).await;
        });
    }
}

/// Serves the gate socket on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    config: GateSocketConfig,
    client: Prepared,
    host_id: String,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = tokio::spawn(accept(listener, config.clone(), tx));
    let service = GateService::new(config, client, host_id);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION))
        // A connection whose peer stopped answering (a frozen or killed gate) is closed.
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(LeaseServiceServer::new(service))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await;
    acceptor.abort();
    if let Err(e) = served {
        tracing::error!(error = %e, "gate socket: the server stopped");
    }
}

/// A lease granted through the socket.
#[derive(Debug, Clone)]
struct Bound {
    /// The uid it is bound to.
    uid: u32,
    /// The member it is held for, and the details to re-attach it after a restart.
    member: String,
    system: String,
    drv_path: String,
    /// Last granted or kept alive.
    seen: Instant,
}

/// The gate socket's `LeaseService`: checks, pins and forwards.
#[derive(Debug, Clone)]
pub struct GateService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: GateSocketConfig,
    prepared: Prepared,
    host_id: String,
    /// The connection to the scheduler, made on first use and forgotten when it breaks.
    upstream: tokio::sync::Mutex<Option<AuthChannel>>,
    bound: Mutex<HashMap<String, Bound>>,
}

/// The peer of a request (set by [`PeerStream`]'s connect info).
fn peer_of<T>(request: &Request<T>) -> std::result::Result<Peer, Status> {
    request
        .extensions()
        .get::<Peer>()
        .cloned()
        .ok_or_else(|| Status::internal("no peer credentials on this connection"))
}

fn refused(peer: &Peer, action: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::GateRefused {
        user: peer.name.clone().unwrap_or_else(|| "?".to_owned()),
        uid: peer.uid,
        action: action.into(),
        reason: reason.into(),
    }
}

fn status_text(s: &Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl GateService {
    /// A service for host `host_id` forwarding with `prepared`'s connection and credential.
    pub fn new(config: GateSocketConfig, prepared: Prepared, host_id: String) -> Self {
        GateService {
            inner: Arc::new(Inner {
                config,
                prepared,
                host_id,
                upstream: tokio::sync::Mutex::new(None),
                bound: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn bound_for(&self) -> Duration {
        Duration::from_millis(self.inner.config.rpc_timeout_millis)
    }

    /// The member `peer` acts for when it states `stated` (empty: itself).
    fn member(&self, peer: &Peer, stated: &str) -> Result<String> {
        let Some(name) = &peer.name else {
            return Err(refused(peer, "queue builds", "the uid has no user name"));
        };
        if stated.is_empty() || stated == name {
            return Ok(name.clone());
        }
        if !self.inner.config.may_name_members.contains(name) {
            return Err(refused(
                peer,
                format!("act for member {stated:?} (client_id)"),
                "the gate socket acts for the connecting user only; \
                 [gate] may_name_members lists the users that may name members",
            ));
        }
        if stated.len() > 128 || !stated.chars().all(|c| c.is_ascii_graphic()) {
            return Err(Error::GateRequest {
                field: "client_id",
                reason: "must be 1 to 128 printable ASCII characters".to_owned(),
            });
        }
        Ok(stated.to_owned())
    }

    /// The pin of a request: this host, whether the gate said so or left it empty.
    fn pin(&self, field: &'static str, stated: &str) -> Result<String> {
        if stated.is_empty() || stated == self.inner.host_id {
            Ok(self.inner.host_id.clone())
        } else {
            Err(Error::GateRequest {
                field,
                reason: format!(
                    "{stated:?} is not this agent's host {:?} (set the gate's host_id to it)",
                    self.inner.host_id
                ),
            })
        }
    }

    /// A connection to the scheduler, within the call bound.
    async fn upstream(&self) -> Result<AuthChannel> {
        let mut slot = self.inner.upstream.lock().await;
        if let Some(c) = &*slot {
            return Ok(c.clone());
        }
        let channel = tokio::time::timeout(self.bound_for(), self.inner.prepared.connect())
            .await
            .map_err(|_| Error::GateUpstream {
                reason: "connecting timed out".to_owned(),
            })?
            .map_err(|e| Error::GateUpstream {
                reason: nixdispatch::diag::error_chain(&e),
            })?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Runs one forwarded `LeaseService` call ([`Self::call`]).
    async fn forward<T, F, Fut>(&self, f: F) -> std::result::Result<T, Status>
    where
        F: FnOnce(LeaseServiceClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.call(|ch| f(nixdispatch::client::lease_client(ch)))
            .await
    }

    /// Runs one call to the scheduler within the bound; the scheduler's own answers
    /// (errors included) pass through, a transport failure forgets the connection.
    async fn call<T, F, Fut>(&self, f: F) -> std::result::Result<T, Status>
    where
        F: FnOnce(AuthChannel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let c = self.upstream().await?;
        match tokio::time::timeout(self.bound_for(), f(c)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => {
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    *self.inner.upstream.lock().await = None;
                }
                Err(s)
            }
            Err(_) => {
                *self.inner.upstream.lock().await = None;
                Err(Error::GateUpstream {
                    reason: format!("no answer within {} ms", self.bound_for().as_millis()),
                }
                .into())
            }
        }
    }

    /// Binds a grant to `uid`, unless it is a build hook's lease the gate attached to
    /// (that one is the hook's to keep and release) or for another host.
    fn bind_grant(
        &self,
        g: &nixdispatch::proto::Granted,
        uid: u32,
        member: &str,
        system: &str,
        drv: &str,
    ) {
        if g.attached || g.host_id != self.inner.host_id {
            return;
        }
        tracing::info!(lease_id = %g.lease_id, uid, member, drv, "gate socket: lease granted");
        self.bind(
            &g.lease_id,
            Bound {
                uid,
                member: member.to_owned(),
                system: system.to_owned(),
                drv_path: drv.to_owned(),
                seen: Instant::now(),
            },
        );
    }

    /// Binds `lease_id`, forgetting stale bindings first, and the stalest one when
    /// [`MAX_BOUND`] are bound.
    fn bind(&self, lease_id: &str, b: Bound) {
        let now = b.seen;
        let mut bound = self.inner.bound.lock().expect("bound lock");
        bound.retain(|_, b| now.duration_since(b.seen) < STALE);
        if bound.len() >= MAX_BOUND
            && let Some(oldest) = bound
                .iter()
                .min_by_key(|(_, b)| b.seen)
                .map(|(id, _)| id.clone())
        {
            bound.remove(&oldest);
        }
        bound.insert(lease_id.to_owned(), b);
    }

    /// The binding of `lease_id`, which must be `peer`'s.
    fn bound_to(&self, peer: &Peer, lease_id: &str, action: &str) -> Result<Bound> {
        let bound = self.inner.bound.lock().expect("bound lock");
        match bound.get(lease_id) {
            None => Err(Error::GateUnknownLease {
                lease_id: lease_id.to_owned(),
            }),
            Some(b) if b.uid != peer.uid => Err(refused(
                peer,
                format!("{action} lease {lease_id}"),
                "it was granted to another user's gate",
            )),
            Some(b) => Ok(b.clone()),
        }
    }

    /// The binding of `lease_id` for `peer`, which states member `stated` (a keep-alive's
    /// `client_id`; empty: itself). A lease this agent does not know (it restarted since the
    /// grant) is looked up at the scheduler and bound to `peer` when it is on this host and
    /// held by the member `peer` acts for; otherwise it stays unknown (`NOT_FOUND`), or is
    /// refused when another member holds it.
    async fn binding(
        &self,
        peer: &Peer,
        lease_id: &str,
        stated: &str,
        action: &str,
    ) -> std::result::Result<Bound, Status> {
        match self.bound_to(peer, lease_id, action) {
            Err(Error::GateUnknownLease { .. }) => {}
            known => return known.map_err(Status::from),
        }
        let member = self.member(peer, stated)?;
        let unknown = || {
            Status::from(Error::GateUnknownLease {
                lease_id: lease_id.to_owned(),
            })
        };
        // The builder's credential lists the leases on this host only.
        let listed = self
            .call(|ch| async move {
                nixdispatch::client::admin_client(ch)
                    .list_leases(ListLeasesRequest {})
                    .await
            })
            .await;
        let leases = match listed {
            Ok(r) => r.leases,
            // A scheduler that predates builders listing their leases: unknown, as before.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::PermissionDenied | tonic::Code::Unimplemented
                ) =>
            {
                tracing::warn!(lease_id, error = %status_text(&s), "gate socket: the scheduler does not say who holds a lease");
                return Err(unknown());
            }
            Err(s) => return Err(s),
        };
        let Some(lease) = leases
            .into_iter()
            .find(|l| l.lease_id == lease_id && l.host_id == self.inner.host_id)
        else {
            return Err(unknown());
        };
        if lease.client_id != member {
            return Err(refused(
                peer,
                format!("{action} lease {lease_id}"),
                "the scheduler says another member holds it",
            )
            .into());
        }
        // A `may_name_members` user acts for members it names, but a member that is a local
        // user of its own may have got the lease through its own gate, and then the naming
        // user could not touch it before the restart: refused, never handed over.
        if peer.name.as_deref() != Some(member.as_str()) {
            let name = member.clone();
            let lookup = tokio::task::spawn_blocking(move || passwd::uid_of(&name));
            let owner = match tokio::time::timeout(self.bound_for(), lookup).await {
                Ok(Ok(uid)) => uid,
                // NSS did not answer: the lease stays unknown rather than guessed.
                _ => return Err(unknown()),
            };
            if owner.is_some_and(|uid| uid != peer.uid) {
                return Err(refused(
                    peer,
                    format!("{action} lease {lease_id}"),
                    format!("{member} is a user of this host; only its own gates may"),
                )
                .into());
            }
        }
        let b = Bound {
            uid: peer.uid,
            member,
            system: lease.system,
            drv_path: lease.drv_path,
            seen: Instant::now(),
        };
        tracing::info!(lease_id, uid = peer.uid, member = %b.member, drv = %b.drv_path, "gate socket: lease bound again (the agent restarted since its grant)");
        self.bind(lease_id, b.clone());
        Ok(b)
    }
}

#[tonic::async_trait]
impl LeaseService for GateService {
    type WaitForLeaseStream = ReceiverStream<std::result::Result<WaitForLeaseResponse, Status>>;

    async fn wait_for_lease(
        &self,
        request: Request<WaitForLeaseRequest>,
    ) -> std::result::Result<Response<Self::WaitForLeaseStream>, Status> {
        let peer = peer_of(&request)?;
        let mut req = request.into_inner();
        req.client_id = self.member(&peer, &req.client_id)?;
        req.pin_host_id = self.pin("pin_host_id", &req.pin_host_id)?;
        let (member, system, drv) = (
            req.client_id.clone(),
            req.system.clone(),
            req.drv_path.clone(),
        );
        let mut upstream = self
            .forward(|mut c| async move { c.wait_for_lease(req).await })
            .await?;
        let (tx, rx) = mpsc::channel(4);
        let service = self.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    // The gate left: dropping the upstream stream takes the waiter out of the
                    // scheduler's queue at once.
                    () = tx.closed() => return,
                    m = upstream.message() => m,
                };
                match message {
                    Ok(Some(m)) => {
                        let grant = match &m.event {
                            Some(wait_for_lease_response::Event::Granted(g)) => Some(g.clone()),
                            _ => None,
                        };
                        if let Some(g) = &grant {
                            service.bind_grant(g, peer.uid, &member, &system, &drv);
                        }
                        if tx.send(Ok(m)).await.is_err() {
                            // Granted to a gate that has just left: hand the slot back.
                            if let Some(g) = grant.filter(|g| !g.attached) {
                                service
                                    .inner
                                    .bound
                                    .lock()
                                    .expect("bound lock")
                                    .remove(&g.lease_id);
                                let request = ReleaseRequest {
                                    lease_id: g.lease_id,
                                    outcome: BuildOutcome::Cancelled as i32,
                                    duration_millis: 0,
                                };
                                let _ = service
                                    .forward(|mut c| async move { c.release(request).await })
                                    .await;
                            }
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(s) => {
                        tracing::debug!(error = %status_text(&s), "gate socket: the wait stream broke");
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn acquire(
        &self,
        request: Request<AcquireRequest>,
    ) -> std::result::Result<Response<AcquireResponse>, Status> {
        let peer = peer_of(&request)?;
        let mut req = request.into_inner();
        req.client_id = self.member(&peer, &req.client_id)?;
        req.pin_host = self.pin("pin_host", &req.pin_host)?;
        let (member, system, drv) = (
            req.client_id.clone(),
            req.system.clone(),
            req.drv_path.clone(),
        );
        let answer = self
            .forward(|mut c| async move { c.acquire(req).await })
            .await?;
        if let Some(acquire_response::Outcome::Granted(g)) = &answer.outcome {
            self.bind_grant(g, peer.uid, &member, &system, &drv);
        }
        Ok(Response::new(answer))
    }

    async fn keep_alive(
        &self,
        request: Request<KeepAliveRequest>,
    ) -> std::result::Result<Response<KeepAliveResponse>, Status> {
        let peer = peer_of(&request)?;
        let KeepAliveRequest {
            lease_id,
            client_id,
            ..
        } = request.into_inner();
        let b = self
            .binding(&peer, &lease_id, &client_id, "keep alive")
            .await?;
        // With the details from the binding (never the gate's), so that a scheduler that
        // restarted re-attaches the lease and the build stays counted.
        let req = KeepAliveRequest {
            lease_id: lease_id.clone(),
            host_id: self.inner.host_id.clone(),
            client_id: b.member,
            system: b.system,
            drv_path: b.drv_path,
        };
        let answer = self
            .forward(|mut c| async move { c.keep_alive(req).await })
            .await?;
        if let Some(b) = self
            .inner
            .bound
            .lock()
            .expect("bound lock")
            .get_mut(&lease_id)
        {
            b.seen = Instant::now();
        }
        Ok(Response::new(answer))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> std::result::Result<Response<ReleaseResponse>, Status> {
        let peer = peer_of(&request)?;
        let req = request.into_inner();
        let lease_id = req.lease_id.clone();
        self.binding(&peer, &lease_id, "", "release").await?;
        let answer = self.forward(|mut c| async move { c.release(req).await });
        let answer = answer.await;
        if answer.is_ok()
            || answer
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::NotFound)
        {
            self.inner
                .bound
                .lock()
                .expect("bound lock")
                .remove(&lease_id);
        }
        Ok(Response::new(answer?))
    }

    /// Not served here: the gate never needs it, and a member lists its builders from its
    /// own machine with its own credential (`nixdispatch doctor`).
    async fn list_builders(
        &self,
        _request: Request<ListBuildersRequest>,
    ) -> std::result::Result<Response<ListBuildersResponse>, Status> {
        Err(Status::unimplemented(
            "the agent's gate socket serves only what the gate needs; ask the scheduler",
        ))
    }
}
