//! Connecting to the scheduler, for every client of it: the agent, the build hook, the
//! operator CLI (and the builder-side gate). One place holds the endpoint, TLS with a pinned
//! CA, the credential and the timeouts:
//!
//! - `https://` endpoints use TLS (rustls with ring) and trust only the CA in `ca_file`
//!   (no system roots: the community's scheduler has its own CA, and pinning it means a
//!   certificate any public CA issued for the name does not pass);
//! - a credential file's trimmed content is sent as `authorization: Bearer <token>` on every
//!   call, marked sensitive so that nothing that prints headers shows it; the file is read
//!   once, when the connection is prepared (systemd's `LoadCredential=` puts it in
//!   `$CREDENTIALS_DIRECTORY`); a token is never taken from the command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::agent_service_client::AgentServiceClient;
use crate::proto::lease_service_client::LeaseServiceClient;

/// The longest pause between two keep-alives of a lease, whatever its TTL (the protocol's
/// rule, see `Granted.lease_ttl_millis`). A scheduler restarted mid-build holds its queue
/// until every lease granted before the restart has had its next keep-alive (which
/// re-attaches it), so this bounds that hold: 5 s, against 20 s for a third of the default
/// 60 s TTL; a thousand running builds cost 200 calls a second.
pub const KEEP_ALIVE_EVERY_MAX: Duration = Duration::from_secs(5);

/// How often a lease holder (the hook, the gate, the agent's gate socket) keeps alive a
/// lease of `ttl`: a third of it, at most
/// [`KEEP_ALIVE_EVERY_MAX`], at least 100 ms.
pub fn keep_alive_every(ttl: Duration) -> Duration {
    if ttl.is_zero() {
        KEEP_ALIVE_EVERY_MAX
    } else {
        (ttl / 3).clamp(Duration::from_millis(100), KEEP_ALIVE_EVERY_MAX)
    }
}

/// How to reach the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port`.
    pub endpoint: String,
    /// A file whose content (trimmed) is the bearer token. `None`: no credential is sent.
    pub credential_file: Option<PathBuf>,
    /// Bound on establishing the connection.
    pub connect_timeout: Duration,
    /// Bound on each call, when set (callers may also bound calls themselves).
    pub request_timeout: Option<Duration>,
    /// PEM file of the CA that signed the scheduler's certificate, the only one trusted for
    /// an `https://` endpoint (required there).
    pub ca_file: Option<PathBuf>,
    /// The name the scheduler's certificate must carry, when it is not the endpoint's host
    /// (e.g. an endpoint given by IP address).
    pub tls_domain: Option<String>,
    /// HTTP/2 ping interval and timeout, for long-lived streams (the agent): a connection
    /// that died without a FIN is found long before TCP would.
    pub keepalive: Option<(Duration, Duration)>,
}

impl ClientConfig {
    /// A configuration for `endpoint` with no credential, a 1 s connect timeout and no call
    /// timeout.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig {
            endpoint: endpoint.into(),
            credential_file: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: None,
            ca_file: None,
            tls_domain: None,
            keepalive: None,
        }
    }
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI.
    #[error("invalid scheduler endpoint {endpoint:?}")]
    InvalidEndpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// The parser's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The credential file cannot be read.
    #[error("cannot read the credential file {path}")]
    Credential {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The token cannot be an HTTP header value.
    #[error("the credential in {path} is not a valid token (printable ASCII, one line)")]
    BadToken {
        /// The file.
        path: PathBuf,
    },
    /// The CA file cannot be read.
    #[error("cannot read the CA file {path}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An `https://` endpoint needs the CA to pin.
    #[error("the endpoint {endpoint} uses TLS: set the scheduler's CA file (ca_file)")]
    MissingCa {
        /// The endpoint.
        endpoint: String,
    },
    /// The TLS settings were refused.
    #[error("TLS settings for {endpoint}")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting failed or timed out.
    #[error("cannot connect to the scheduler at {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Adds the bearer token, if any, to every request.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    header: Option<MetadataValue<Ascii>>,
}

impl Auth {
    /// Reads the token from `path` (surrounding whitespace trimmed).
    pub fn from_file(path: &Path) -> Result<Self, ClientError> {
        let token = std::fs::read_to_string(path).map_err(|source| ClientError::Credential {
            path: path.to_owned(),
            source,
        })?;
        let token = token.trim();
        if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ClientError::BadToken {
                path: path.to_owned(),
            });
        }
        let mut header: MetadataValue<Ascii> =
            format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::BadToken {
                    path: path.to_owned(),
                })?;
        header.set_sensitive(true);
        Ok(Auth {
            header: Some(header),
        })
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// A channel to the scheduler that carries the credential.
pub type AuthChannel = InterceptedService<Channel, Auth>;

/// A connection made ready: files read and validated, not yet connected. The agent
/// prepares once and connects again after each lost session.
#[derive(Debug, Clone)]
pub struct Prepared {
    endpoint: Endpoint,
    auth: Auth,
    name: String,
}

impl Prepared {
    /// Reads the credential and CA files and builds the endpoint; no network yet.
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        let auth = match &config.credential_file {
            Some(path) => Auth::from_file(path)?,
            None => Auth::default(),
        };
        let name = config.endpoint.clone();
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|source| ClientError::InvalidEndpoint {
                endpoint: name.clone(),
                source,
            })?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true);
        if let Some(t) = config.request_timeout {
            endpoint = endpoint.timeout(t);
        }
        if let Some((interval, timeout)) = config.keepalive {
            endpoint = endpoint
                .http2_keep_alive_interval(interval)
                .keep_alive_timeout(timeout)
                .keep_alive_while_idle(true);
        }
        if config.endpoint.starts_with("https://") {
            let path = config
                .ca_file
                .as_ref()
                .ok_or_else(|| ClientError::MissingCa {
                    endpoint: name.clone(),
                })?;
            let pem = std::fs::read(path).map_err(|source| ClientError::Ca {
                path: path.clone(),
                source,
            })?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(domain) = &config.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::Tls {
                    endpoint: name.clone(),
                    source,
                })?;
        }
        Ok(Prepared {
            endpoint,
            auth,
            name,
        })
    }

    /// Connects (eagerly, so that an unreachable scheduler is known now).
    pub async fn connect(&self) -> Result<AuthChannel, ClientError> {
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: self.name.clone(),
                source,
            })?;
        Ok(InterceptedService::new(channel, self.auth.clone()))
    }

    /// The endpoint as configured, for logs.
    pub fn endpoint(&self) -> &str {
        &self.name
    }
}

/// Connects to the scheduler (eagerly, so that an unreachable scheduler is known now).
pub async fn connect(config: &ClientConfig) -> Result<AuthChannel, ClientError> {
    Prepared::new(config)?.connect().await
}

/// An agent client over `channel`.
pub fn agent_client(channel: AuthChannel) -> AgentServiceClient<AuthChannel> {
    AgentServiceClient::new(channel)
}

/// A lease client over `channel`.
pub fn lease_client(channel: AuthChannel) -> LeaseServiceClient<AuthChannel> {
    LeaseServiceClient::new(channel)
}

/// An admin client over `channel`.
pub fn admin_client(channel: AuthChannel) -> AdminServiceClient<AuthChannel> {
    AdminServiceClient::new(channel)
}

/// Every waiting request the caller may see, following `ListWaiting`'s pages of
/// `page_size` requests (0: the scheduler's default) until the last. Each page is one call,
/// so the scheduler lets go of its queue between pages; a request that starts or stops
/// waiting meanwhile may be missing, no other is missing or listed twice.
pub async fn list_waiting(
    admin: &mut AdminServiceClient<AuthChannel>,
    page_size: u32,
) -> Result<Vec<crate::proto::WaitingRequest>, tonic::Status> {
    let mut waiting = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_waiting(crate::proto::ListWaitingRequest {
                page_size,
                page_token: page_token.clone(),
            })
            .await?
            .into_inner();
        waiting.extend(page.waiting);
        if page.next_page_token.is_empty() {
            return Ok(waiting);
        }
        // A scheduler that hands back the token it was sent would keep this asking forever.
        if page.next_page_token == page_token {
            return Err(tonic::Status::internal(
                "ListWaiting answered the page token it was sent: the listing does not advance",
            ));
        }
        page_token = page.next_page_token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A third of the TTL, but never more than 5 s apart (a restarted scheduler's hold) nor
    /// less than 100 ms.
    #[test]
    fn keep_alives_come_every_third_of_the_ttl_at_most_5_s_apart() {
        let s = Duration::from_secs;
        assert_eq!(keep_alive_every(s(3)), s(1));
        assert_eq!(keep_alive_every(s(60)), s(5));
        assert_eq!(keep_alive_every(Duration::ZERO), s(5));
        assert_eq!(
            keep_alive_every(Duration::from_millis(30)),
            Duration::from_millis(100)
        );
    }

    /// The token is trimmed and sent as a bearer header; bad tokens are refused.
    #[test]
    fn bearer_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "s3cret\n").unwrap();
        let mut auth = Auth::from_file(&p).unwrap();
        let req = auth.call(tonic::Request::new(())).unwrap();
        let value = req.metadata().get("authorization").unwrap();
        assert_eq!(value, "Bearer s3cret");
        assert!(value.is_sensitive());
        std::fs::write(&p, "two words").unwrap();
        assert!(matches!(
            Auth::from_file(&p),
            Err(ClientError::BadToken { .. })
        ));
        assert!(matches!(
            Auth::from_file(&dir.path().join("none")),
            Err(ClientError::Credential { .. })
        ));
    }

    /// Without a credential no header is added.
    #[test]
    fn no_credential_no_header() {
        let req = Auth::default().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    /// An `https://` endpoint without a CA to pin is refused before any connection.
    #[test]
    fn tls_needs_a_pinned_ca() {
        let e = Prepared::new(&ClientConfig::new("https://127.0.0.1:1")).unwrap_err();
        assert!(matches!(e, ClientError::MissingCa { .. }), "{e:?}");
    }

    /// Connecting to a closed port fails quickly with a connect error.
    #[tokio::test]
    async fn closed_port_fails() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = connect(&ClientConfig::new(format!("http://{addr}")))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    }
}
